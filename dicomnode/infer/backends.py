"""Inference backends behind one interface: float32 array in, arrays out.

* :class:`OnnxBackend` (default): one onnxruntime ``InferenceSession`` per
  weights file, created once and reused (sessions are thread-safe for
  ``run``).
* :class:`TorchScriptBackend` (optional extra ``dicomnode[torch]``): a
  ``torch.jit`` module in eval mode; also gives Grad-CAM access to layers.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from dicomnode.errors import ModelError


class Backend(Protocol):
    """What the runtime needs from a backend."""

    path: Path

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Run the network on ``x`` (N, C, D, H, W); return its outputs as arrays."""
        ...


class OnnxBackend:
    """onnxruntime on CPU (or the first available execution provider asked for)."""

    def __init__(self, path: Path, threads: int = 0, providers: tuple[str, ...] = ()):
        # Imported on first use (0.2 s): the CLI and processes that load no model skip it.
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Arena growth keeps freed activations mapped; for one big 3D volume per
        # call that is wasted RSS, so memory is returned between runs.
        opts.enable_cpu_mem_arena = False
        available = ort.get_available_providers()
        chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{self.path}: onnxruntime cannot load the model ({exc})") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: expected one input, the graph has {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_type = inputs[0].type  # e.g. "tensor(float)"
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.input_type == "tensor(float16)":
            x = x.astype(np.float16)
        elif x.dtype != np.float32:
            x = x.astype(np.float32)
        try:
            return list(self.session.run(None, {self.input_name: x}))
        except Exception as exc:
            raise ModelError(f"{self.path.name}: inference failed on input {x.shape} ({exc})") \
                from exc


class TorchScriptBackend:
    """A TorchScript module (``torch.jit.save``), run under ``torch.inference_mode``."""

    _lock = threading.Lock()  # torch.set_num_threads is process-wide

    def __init__(self, path: Path, threads: int = 0):
        try:
            import torch  # optional dependency (the torch extra); 1.8 s to import
        except ImportError as exc:  # optional extra
            raise ModelError(f"{path}: runtime.backend torchscript needs the torch extra "
                             "(pip install 'dicomnode[torch]')") from exc
        self.path = Path(path)
        self.threads = threads
        try:
            self.module = torch.jit.load(str(self.path), map_location="cpu").eval()
        except Exception as exc:
            raise ModelError(f"{self.path}: torch cannot load the TorchScript module ({exc})") \
                from exc

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        import torch  # optional dependency: present once __init__ succeeded

        with self._lock:
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                with torch.inference_mode():
                    out = self.module(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
            except Exception as exc:
                raise ModelError(f"{self.path.name}: inference failed on input {x.shape} "
                                 f"({exc})") from exc
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.detach().cpu().numpy() for o in outs]


def create_backend(kind: str, path: Path, threads: int = 0) -> Backend:
    """Make the backend a manifest names (``onnx`` or ``torchscript``)."""
    if kind == "onnx":
        return OnnxBackend(path, threads)
    if kind == "torchscript":
        return TorchScriptBackend(path, threads)
    raise ModelError(f"unknown backend {kind!r} (use onnx or torchscript)")
