"""deepbet-brain on the real Colin27 T1, through the full DICOM path.

deepbet on CPU is the slow part of the suite: the node runs it once per
session (module fixture) and every assertion shares that result.
"""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.domain import InferenceResult
from dicomnode.infer import ModelRegistry, load_volume
from dicomnode.infer.registry import SHIPPED_MODELS_DIR
from tests.support.infer_data import COLIN27_T1, SeriesFixture

pytestmark = pytest.mark.slow


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def brain_result(colin27_mr: SeriesFixture) -> InferenceResult:
    reg = ModelRegistry(SHIPPED_MODELS_DIR, enabled=["deepbet-brain"], threads=2)
    return reg.run("deepbet-brain", load_volume(colin27_mr.directory))


def test_dice_against_ch2bet(brain_result: InferenceResult, colin27_mr: SeriesFixture) -> None:
    seg = brain_result.segmentation
    assert seg is not None and seg.masks.shape == (1, *colin27_mr.array.shape)
    dice = _dice(seg.masks[0], colin27_mr.reference_mask)
    assert dice >= 0.93, dice


def test_result_identity_and_volume(brain_result: InferenceResult) -> None:
    assert brain_result.model.family == "AI"
    assert brain_result.model.name == "deepbet-brain"
    assert len(brain_result.model.weights_sha256) == 2
    seg = brain_result.segmentation
    assert seg is not None
    vol = next(m for m in brain_result.measurements if m.name == "volume")
    assert vol.unit == "ml" and vol.label_value == 1
    assert vol.value == pytest.approx(seg.masks[0].sum() * 1.0 / 1000)  # 1 mm voxels
    assert 1200 < vol.value < 2200  # an adult brain mask incl. ventricles
    mean = next(m for m in brain_result.measurements if m.name == "mean")
    assert mean.unit == "1"  # MR intensities are unitless
    assert seg.labels[0].type.value == "12738006"  # SNOMED CT Brain


@pytest.fixture(scope="module")
def deepbet_reference():  # type: ignore[no-untyped-def]
    """deepbet's own torch pipeline on the NIfTI, with its intermediate tensors."""
    torch = pytest.importorskip("torch")
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("deepbet")
    import torch.nn.functional as F
    from deepbet.bet import BrainExtraction
    from deepbet.utils import normalize

    torch.set_num_threads(2)
    bet = BrainExtraction(no_gpu=True)
    x = nib.as_closest_canonical(nib.load(COLIN27_T1)).get_fdata(dtype=np.float32)
    mask = bet.postprocess(bet.run_model(x.copy()) > 0.5)
    t = torch.from_numpy(x)
    small = F.interpolate(t[None, None], (128, 128, 128), mode="nearest-exact")[0, 0]
    low, high = small.quantile(0.005), small.quantile(0.995)
    crop = F.interpolate(t[bet.bbox][None, None], (256, 256, 256), mode="nearest-exact")[0, 0]
    return {
        "bet": bet,
        "mask_kri": np.ascontiguousarray(mask[::-1, ::-1, :].transpose(2, 1, 0)),
        "bbox_input": normalize(small, low, high)[None, None],
        "main_input": normalize(crop, low, high)[None, None],
    }


def test_same_mask_as_deepbet_itself(brain_result: InferenceResult, deepbet_reference) -> None:  # type: ignore[no-untyped-def]
    """Pre/post-processing reproduce deepbet's: the node's mask equals deepbet's own."""
    seg = brain_result.segmentation
    assert seg is not None
    ours, theirs = seg.masks[0], deepbet_reference["mask_kri"]
    assert _dice(ours, theirs) > 0.9999, int((ours != theirs).sum())


def test_onnx_outputs_match_torch(deepbet_reference) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort
    import torch

    bet = deepbet_reference["bet"]
    for module, onnx_file, key in ((bet.bbox_model, "bbox_model.onnx", "bbox_input"),
                                   (bet.model, "model.onnx", "main_input")):
        x = deepbet_reference[key]
        with torch.no_grad():
            expected = module(x).numpy()
        sess = ort.InferenceSession(str(SHIPPED_MODELS_DIR / "deepbet-brain" / onnx_file),
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == expected.shape
        diff = float(np.abs(got - expected).max())
        assert diff <= 1e-4, (onnx_file, diff)
