"""Pre/post-processing building blocks: reorientation, resizing, normalisation, sliding window."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.infer import ModelRegistry
from dicomnode.infer.manifest import NormStep
from dicomnode.infer.postprocess import fill_holes, largest_component, remove_small
from dicomnode.infer.preprocess import (
    nearest_indices,
    normalize,
    reorientation,
    resize_nearest,
)
from dicomnode.infer.samples import sample_volume
from dicomnode.infer.sliding import blend_weights, patch_starts, sliding_window
from tests.support.infer_models import sigmoid_graph, write_model
from tests.support.series import AXIAL, CORONAL, SAGITTAL, affine_for, oblique


@pytest.mark.parametrize("orientation", [AXIAL, CORONAL, SAGITTAL, oblique(20)],
                         ids=["axial", "coronal", "sagittal", "oblique"])
@pytest.mark.parametrize("code", ["RAS", "LPS", "SPL", "IAR"])
def test_reorientation_is_exact_and_points_the_right_way(orientation, code: str) -> None:  # type: ignore[no-untyped-def]
    aff = affine_for(orientation, (2.0, 1.0, 0.5), (3, -4, 5))
    a = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    reo = reorientation(aff, code)
    net = reo.forward(a)
    np.testing.assert_array_equal(reo.inverse(net), a)
    # network axis t must increase towards the patient direction code[t]
    lps = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
    src_index = np.indices(a.shape).reshape(3, -1)
    world = (aff[:3, :3] @ src_index).reshape(3, *a.shape)
    world_net = reo.forward(np.moveaxis(world, 0, -1).reshape(*a.shape, 3).transpose(3, 0, 1, 2))
    for t, letter in enumerate(code):
        w, sign = lps[letter]
        step = np.diff(world_net[w], axis=t).mean() * sign
        assert step > 0, (code, t)


def test_nearest_exact_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    a = np.random.default_rng(1).random((17, 23, 11)).astype(np.float32)
    for shape in [(8, 8, 8), (32, 40, 20), (17, 5, 30)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(a)[None, None], shape,
                                              mode="nearest-exact")[0, 0].numpy()
        np.testing.assert_array_equal(resize_nearest(a, shape), ref)
    assert list(nearest_indices(4, 2)) == [1, 3]


def test_normalisation_steps() -> None:
    x = np.arange(1001, dtype=np.float32)
    out = normalize(x.copy(), [NormStep("percentile", {"low": 10, "high": 90})])
    assert out.min() == 0 and out.max() == 1 and out[500] == pytest.approx(0.5)
    out = normalize(x.copy(), [NormStep("zscore", {})])
    assert out.mean() == pytest.approx(0, abs=1e-5) and out.std() == pytest.approx(1, abs=1e-5)
    out = normalize(x.copy(), [NormStep("clip", {"min": -100, "max": 300}),
                               NormStep("scale", {"offset": 100, "factor": 0.005})])
    assert out.min() == pytest.approx(-0.5) and out.max() == pytest.approx(1.0)
    out = normalize(x.copy(), [NormStep("affine", {"scale": 2, "offset": 1})])
    assert out[3] == 7
    out = normalize(x.copy(), [NormStep("zscore", {"mask_above": 500})])
    assert out[751] == pytest.approx(0.0, abs=0.01)  # mean of 501..1000 is 750.5


def test_patch_grid_covers_and_weights_are_positive() -> None:
    assert patch_starts(100, 32, 0.5) == [0, 16, 32, 48, 64, 68]
    assert patch_starts(20, 32, 0.5) == [0]
    w = blend_weights((8, 8, 8))
    assert w.min() > 0 and w.max() == 1.0 and w[4, 4, 4] > w[0, 0, 0]


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_sliding_window_blends_to_the_whole_volume_answer(blend: str) -> None:
    x = np.random.default_rng(2).normal(size=(1, 37, 29, 41)).astype(np.float32)
    calls = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        return np.concatenate([np.tanh(batch), batch * 2], axis=1)

    out = sliding_window(run, x, (16, 16, 16), overlap=0.5, batch_size=3, blend=blend)
    np.testing.assert_allclose(out[0], np.tanh(x[0]), atol=1e-6)
    np.testing.assert_allclose(out[1], 2 * x[0], atol=1e-5)
    assert all(s[0] <= 3 and s[2:] == (16, 16, 16) for s in calls)
    assert len(calls) > 1
    # smaller than the patch: padded, then cropped
    small = x[:, :5, :6, :7]
    np.testing.assert_allclose(sliding_window(run, small, (8, 8, 8))[0], np.tanh(small[0]),
                               atol=1e-6)


def test_sliding_window_through_the_registry(tmp_path: Path) -> None:
    """A pointwise ONNX model with a small patch gives exactly the whole-volume masks."""
    arr = np.random.default_rng(3).normal(100, 30, (20, 33, 27)).astype(np.float32)
    vol = sample_volume(arr, affine_for(AXIAL, (2, 1, 1), (0, 0, 0)), "CT")
    write_model(tmp_path, "whole", sigmoid_graph())
    write_model(tmp_path, "patched", sigmoid_graph(),
                input={"orientation": "RAS", "patch_size": [8, 16, 8], "overlap": 0.5,
                       "batch_size": 2})
    reg = ModelRegistry(tmp_path)
    whole = reg.run("whole", vol).segmentation
    patched = reg.run("patched", vol).segmentation
    assert whole is not None and patched is not None
    np.testing.assert_array_equal(whole.masks, patched.masks)
    np.testing.assert_array_equal(whole.masks[0], arr > 100)


def test_target_spacing_resamples_and_comes_back_on_the_source_grid(tmp_path: Path) -> None:
    arr = np.zeros((30, 40, 40), np.float32)
    arr[8:22, 10:30, 12:28] = 200.0
    vol = sample_volume(arr, affine_for(AXIAL, (1.0, 0.5, 0.5), (0, 0, 0)), "CT")
    write_model(tmp_path, "iso", sigmoid_graph(), input={"spacing": [2.0, 2.0, 2.0]})
    res = ModelRegistry(tmp_path).run("iso", vol)
    assert res.segmentation is not None
    mask = res.segmentation.masks[0]
    assert mask.shape == arr.shape
    dice = 2 * (mask & (arr > 100)).sum() / (mask.sum() + (arr > 100).sum())
    assert dice > 0.9
    vol_ml = next(m.value for m in res.measurements if m.name == "volume")
    assert vol_ml == pytest.approx(mask.sum() * 0.25 / 1000)


def test_postprocess_against_scipy() -> None:
    rng = np.random.default_rng(4)
    m = ndimage.binary_opening(rng.random((20, 30, 30)) > 0.6)
    labels, n = ndimage.label(m, structure=np.ones((3, 3, 3)))
    assert n > 1
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    np.testing.assert_array_equal(largest_component(m.copy()), labels == counts.argmax())
    keep = counts >= 5
    keep[0] = False
    np.testing.assert_array_equal(remove_small(m.copy(), 5), keep[labels])
    shell = np.zeros((9, 9, 9), bool)
    shell[1:8, 1:8, 1:8] = True
    shell[3:6, 3:6, 3:6] = False
    np.testing.assert_array_equal(fill_holes(shell.copy(), "3d"), ndimage.binary_fill_holes(shell))
    tube = np.zeros((6, 9, 9), bool)
    tube[:, 2:7, 2:7] = True
    tube[:, 4, 4] = False  # a channel open at both ends: a hole only slice by slice
    assert not fill_holes(tube.copy(), "3d")[:, 4, 4].any()
    assert fill_holes(tube.copy(), "2d")[:, 4, 4].all()


def test_all_axis_permutations_round_trip() -> None:
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    for perm in itertools.permutations(range(3)):
        aff = np.eye(4)
        aff[:3, :3] = np.eye(3)[:, list(perm)] * -1
        for code in ("RAS", "LPI"):
            reo = reorientation(aff, code)
            np.testing.assert_array_equal(reo.inverse(reo.forward(a)), a)
