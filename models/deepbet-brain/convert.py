"""Convert deepbet's TorchScript U-Nets to ONNX (reproducible; run from the repo root).

deepbet (MIT licence, Fisch et al. 2024) ships two TorchScript 3D U-Nets in
its wheel: ``bbox_model.pt`` (a localizer run at 128^3) and ``model.pt``
(the brain mask network run at 256^3 on the cropped head). This script:

1. checks that the installed wheel's weights are the ones this model was
   built from (SHA-256 from the wheel's RECORD, pinned below);
2. exports both to ONNX (opset 17, TorchScript exporter: the modules are
   ``torch.jit`` scripts, which the dynamo exporter cannot trace), with
   dynamic batch and spatial axes;
3. rewrites every ``InstanceNormalization`` as explicit mean / variance
   ops that reduce one spatial axis at a time: onnxruntime's fused
   InstanceNormalization (and a single ReduceMean over D*H*W) accumulates
   the statistics of 10^5-10^6 voxels in float32 and drifts by up to 1e-2 in
   the output probabilities, where torch stays within 2e-5 of a float64
   reference; with short per-axis sums onnxruntime matches torch again;
4. checks that onnxruntime reproduces torch's outputs on the same input
   (max |difference| <= 1e-4 on the network outputs);
5. copies deepbet's licence next to the weights, puts the SHA-256 into
   ``model.yaml`` and records the model's answer on a synthetic head phantom
   in ``sample.npz`` (used by ``dicomnode models verify``).

    .venv/bin/pip install deepbet==1.0.2   # already in the dev extra
    .venv/bin/python models/deepbet-brain/convert.py
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEEPBET_VERSION = "1.0.2"
# sha256 of the wheel's TorchScript files (hex of RECORD's urlsafe-base64 digests)
SOURCE_SHA256 = {
    "bbox_model.pt": "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
    "model.pt": "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
}
OPSET = 17
TOLERANCE = 1e-4


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_dir() -> Path:
    from importlib.metadata import version as dist_version

    from deepbet.utils import DATA_PATH

    version = dist_version("deepbet")
    if version != DEEPBET_VERSION:
        sys.exit(f"deepbet {version} installed; this conversion is pinned to {DEEPBET_VERSION}")
    return Path(DATA_PATH) / "models"


def accurate_instance_norm(model: Any) -> Any:
    """Replace InstanceNormalization by mean/variance computed with per-axis reductions."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    for a in (2, 3, 4):
        g.initializer.append(numpy_helper.from_array(np.array([a], np.int64), f"in_axis_{a}"))
    g.initializer.append(numpy_helper.from_array(np.array([1, -1, 1, 1, 1], np.int64),
                                                 "in_cshape"))

    def mean(src: str, dst: str, p: str) -> list[onnx.NodeProto]:
        # One spatial axis at a time: each sum has <= 256 terms, accurate in float32.
        return [helper.make_node("ReduceMean", [src, "in_axis_4"], [p + "_m4"], keepdims=1),
                helper.make_node("ReduceMean", [p + "_m4", "in_axis_3"], [p + "_m3"], keepdims=1),
                helper.make_node("ReduceMean", [p + "_m3", "in_axis_2"], [dst], keepdims=1)]

    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type != "InstanceNormalization":
            nodes.append(n)
            continue
        x, scale, bias = n.input
        eps = next(a.f for a in n.attribute if a.name == "epsilon")
        p = n.name or n.output[0]
        g.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), p + "_eps"))
        nodes += mean(x, p + "_mean", p + "_a")
        nodes += [helper.make_node("Sub", [x, p + "_mean"], [p + "_c"]),
                  helper.make_node("Mul", [p + "_c", p + "_c"], [p + "_sq"])]
        nodes += mean(p + "_sq", p + "_var", p + "_b")
        nodes += [
            helper.make_node("Add", [p + "_var", p + "_eps"], [p + "_ve"]),
            helper.make_node("Sqrt", [p + "_ve"], [p + "_std"]),
            helper.make_node("Reshape", [scale, "in_cshape"], [p + "_s"]),
            helper.make_node("Reshape", [bias, "in_cshape"], [p + "_bb"]),
            # scale / std is per channel (tiny): one full-size multiply instead of two
            helper.make_node("Div", [p + "_s", p + "_std"], [p + "_f"]),
            helper.make_node("Mul", [p + "_c", p + "_f"], [p + "_ns"]),
            helper.make_node("Add", [p + "_ns", p + "_bb"], [n.output[0]]),
        ]
    del g.node[:]
    g.node.extend(nodes)
    # ReduceMean with axes as an input needs opset 18.
    out = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    out.ir_version = model.ir_version
    return out


def export(src: Path, dst: Path, example_shape: tuple[int, ...]) -> float:
    """Export one TorchScript module; return the max |torch - onnxruntime| on a real-ish input."""
    import onnxruntime as ort
    import torch

    module = torch.jit.load(str(src), map_location="cpu").eval()
    # A synthetic T1-like head, normalised as deepbet does (percentiles, z-score,
    # mean 0.449 / std 0.226): deterministic and close to what the networks see.
    sys.path.insert(0, str(HERE.parents[1]))
    from dicomnode.infer.preprocess import resize_nearest
    from dicomnode.infer.samples import phantom_mr

    head = resize_nearest(phantom_mr(), example_shape[2:]).astype(np.float32)
    lo, hi = np.percentile(head, [0.5, 99.5])
    head = np.clip((head - lo) / (hi - lo), 0, 1)
    head = (head - head.mean()) / head.std() * 0.226 + 0.449
    x = torch.from_numpy(np.ascontiguousarray(head, np.float32))[None, None]
    with torch.no_grad():
        expected = module(x).numpy()
    dyn = {0: "batch", 2: "d", 3: "h", 4: "w"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(dst), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["probabilities"],
                          dynamic_axes={"input": dyn, "probabilities": dyn})
    import onnx

    model = accurate_instance_norm(onnx.load(str(dst)))
    model.doc_string = (f"deepbet {DEEPBET_VERSION} {src.name} (MIT, Fisch et al. 2024), "
                        "converted by dicomnode models/deepbet-brain/convert.py")
    onnx.checker.check_model(model, full_check=True)
    dst.write_bytes(model.SerializeToString(deterministic=True))
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    return float(np.abs(got - expected).max())


def main() -> int:
    src = source_dir()
    for name, digest in SOURCE_SHA256.items():
        actual = sha256(src / name)
        if actual != digest:
            sys.exit(f"{src / name}: sha256 {actual} != pinned {digest}")
    results = {}
    for name, out, shape in (("bbox_model.pt", "bbox_model.onnx", (1, 1, 128, 128, 128)),
                             ("model.pt", "model.onnx", (1, 1, 128, 128, 128))):
        diff = export(src / name, HERE / out, shape)
        print(f"{out}: max |onnxruntime - torch| = {diff:.2e}, sha256 {sha256(HERE / out)}")
        results[out] = diff
    lic = Path(src).parents[1] / f"deepbet-{DEEPBET_VERSION}.dist-info" / "LICENSE"
    shutil.copyfile(lic, HERE / "LICENSE")
    bad = {k: v for k, v in results.items() if v > TOLERANCE}
    if bad:
        print(f"outputs differ by more than {TOLERANCE}: {bad}")
        return 1
    sys.path.insert(0, str(HERE.parents[1]))
    from dicomnode.infer.manifest import load_manifest
    from dicomnode.infer.runner import ModelRunner
    from dicomnode.infer.samples import phantom_mr, update_manifest_sha256, write_sample

    for out in results:
        if update_manifest_sha256(HERE / "model.yaml", out, sha256(HERE / out)):
            print(f"model.yaml: sha256 of {out} updated")
    runner = ModelRunner(load_manifest(HERE / "model.yaml"))
    expected = write_sample(HERE / "sample.npz", phantom_mr(), "MR", 2.0, runner.run)
    print(f"sample.npz: expected volumes (mL) {expected}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
