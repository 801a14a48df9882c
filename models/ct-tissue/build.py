"""Build ``ct_tissue.onnx``: the rule-based CT tissue graph (no training, no learned weights).

Run from the repository root (reproducible: same onnx version -> same bytes)::

    .venv/bin/python models/ct-tissue/build.py

It writes the graph, puts its SHA-256 into ``model.yaml``, and records the
model's answer on a synthetic CT phantom in ``sample.npz`` (used by
``dicomnode models verify``).

The graph takes CT values in HU, shape (N, 1, D, H, W) float32, and returns
one uint8 tensor (N, 3, D, H, W):

* channel 0, body candidate: ``HU > -500`` after a morphological opening
  (removes thin blankets / cables) and closing (bridges skin folds), both
  3x3x3, written as max-pooling (dilation) and max-pooling of the negated
  image (erosion). The node then keeps the largest component and fills holes
  slice by slice (manifest ``postprocess``).
* channel 1, bone: ``HU >= 226``, the bone threshold of InVesalius (and a
  common CT bone window); no morphology, so it is exactly the threshold mask.
* channel 2, air candidate: ``HU < -400``; the node keeps it only inside the
  filled body (lungs, airways, bowel gas, sinuses).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

BODY_HU = -500.0
BONE_HU = 226.0
AIR_HU = -400.0
OPSET = 17


def build() -> onnx.ModelProto:
    def const(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name + "_v", TensorProto.FLOAT, [], [value]))

    def pool(x: str, y: str) -> onnx.NodeProto:  # 3x3x3 dilation of a 0/1 image
        return helper.make_node("MaxPool", [x], [y], kernel_shape=[3, 3, 3], pads=[1] * 6,
                                strides=[1, 1, 1])

    # Morphology runs on float32 0/1 images: onnxruntime's float MaxPool is
    # vectorised, its uint8 MaxPool measured 5x slower on this graph.
    nodes = [
        const("body_thr", BODY_HU), const("bone_thr", BONE_HU), const("air_thr", AIR_HU),
        # body candidate as float 0/1
        helper.make_node("Greater", ["hu", "body_thr"], ["body_b"]),
        helper.make_node("Cast", ["body_b"], ["body_f"], to=TensorProto.FLOAT),
        # opening = dilate(erode(x)); erode(x) = -dilate(-x)
        helper.make_node("Neg", ["body_f"], ["n1"]),
        pool("n1", "n2"),
        helper.make_node("Neg", ["n2"], ["eroded"]),
        pool("eroded", "opened"),
        # closing = erode(dilate(x))
        pool("opened", "dilated"),
        helper.make_node("Neg", ["dilated"], ["n3"]),
        pool("n3", "n4"),
        helper.make_node("Neg", ["n4"], ["closed"]),
        helper.make_node("Cast", ["closed"], ["body_u8"], to=TensorProto.UINT8),
        # bone and air: plain thresholds
        helper.make_node("GreaterOrEqual", ["hu", "bone_thr"], ["bone_b"]),
        helper.make_node("Cast", ["bone_b"], ["bone_u8"], to=TensorProto.UINT8),
        helper.make_node("Less", ["hu", "air_thr"], ["air_b"]),
        helper.make_node("Cast", ["air_b"], ["air_u8"], to=TensorProto.UINT8),
        helper.make_node("Concat", ["body_u8", "bone_u8", "air_u8"], ["masks"], axis=1),
    ]
    dims = ["N", 1, "D", "H", "W"]
    graph = helper.make_graph(
        nodes, "ct_tissue",
        [helper.make_tensor_value_info("hu", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("masks", TensorProto.UINT8, ["N", 3, "D", "H", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dicomnode models/ct-tissue/build.py",
                              producer_version="1.0.0")
    model.ir_version = 8
    model.doc_string = ("Rule-based CT tissue masks (body, bone >= 226 HU, air inside body). "
                        "Not an AI model.")
    onnx.checker.check_model(model, full_check=True)
    return model


def main(out: Path | None = None) -> str:
    here = Path(__file__).resolve().parent
    out = out or here / "ct_tissue.onnx"
    data = build().SerializeToString(deterministic=True)
    out.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    print(f"{out}: sha256 {digest}")
    if out.parent == here:
        sys.path.insert(0, str(here.parents[1]))
        from dicomnode.infer.manifest import load_manifest
        from dicomnode.infer.runner import ModelRunner
        from dicomnode.infer.samples import phantom_ct, update_manifest_sha256, write_sample

        if update_manifest_sha256(here / "model.yaml", out.name, digest):
            print("model.yaml: sha256 updated")
        runner = ModelRunner(load_manifest(here / "model.yaml"))
        expected = write_sample(here / "sample.npz", phantom_ct(), "CT", 2.0, runner.run)
        print(f"sample.npz: expected volumes (mL) {expected}")
    return digest


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
