"""Build small model folders (ONNX graph + model.yaml) for runtime tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx
import yaml
from onnx import TensorProto, helper


def sigmoid_graph(center: float = 100.0, width: float = 10.0) -> onnx.ModelProto:
    """Pointwise network: two channels (1 - p, p) with p = sigmoid((x - center) / width).

    Pointwise, so a sliding-window run must equal a whole-volume run.
    """
    c = helper.make_tensor("c", TensorProto.FLOAT, [], [center])
    w = helper.make_tensor("w", TensorProto.FLOAT, [], [1.0 / width])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Sub", ["x", "c"], ["d"]),
        helper.make_node("Mul", ["d", "w"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], ["y"], axis=1),
    ]
    dims = ["N", 1, "D", "H", "W"]
    g = helper.make_graph(nodes, "sigmoid", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                         ["N", 2, "D", "H", "W"])],
                          [c, w, one])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def base_manifest(name: str, weights: str, sha: str, **overrides: Any) -> dict[str, Any]:
    """A valid segmentation manifest; ``overrides`` replace top-level keys."""
    m: dict[str, Any] = {
        "name": name,
        "version": "0.0.1",
        "family": "rule-based",
        "description": "test model",
        "intended_use": "tests only",
        "authors": "dicomnode tests",
        "licence": "Apache-2.0",
        "weights": [{"file": weights, "sha256": sha}],
        "applies_to": {"modalities": ["CT"]},
        "input": {"orientation": "source"},
        "output": {
            "task": "segmentation",
            "activation": "none",
            "labels": [{
                "value": 1, "name": "Bright", "channel": 1,
                "category": {"value": "91723000", "scheme": "SCT",
                             "meaning": "Anatomical Structure"},
                "type": {"value": "3138006", "scheme": "SCT", "meaning": "Bone"},
            }],
        },
        "measurements": [{"name": "volume"}],
    }
    m.update(overrides)
    return m


def write_model(root: Path, name: str, model: onnx.ModelProto | bytes,
                weights: str = "model.onnx", **overrides: Any) -> Path:
    """Write ``root/name/{weights, model.yaml}``; returns the manifest path."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    (folder / weights).write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    manifest = base_manifest(name, weights, sha, **overrides)
    path = folder / "model.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path
