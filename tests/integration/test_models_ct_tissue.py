"""ct-tissue on the real InVesalius head CT, through the full DICOM path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.domain import InferenceResult
from dicomnode.infer import ModelRegistry, load_manifest, load_volume
from dicomnode.infer.manifest import sha256_file
from dicomnode.infer.registry import SHIPPED_MODELS_DIR
from tests.support.infer_data import SeriesFixture, cranium_bone_threshold

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ct_result(cranium_ct: SeriesFixture) -> InferenceResult:
    reg = ModelRegistry(SHIPPED_MODELS_DIR, enabled=["ct-tissue"])
    return reg.run("ct-tissue", load_volume(cranium_ct.directory))


def test_invesalius_mask_threshold_is_the_model_threshold() -> None:
    # The stored mask_0 was thresholded at [226, 3071] HU (mask_0.plist), and the
    # volume's maximum is 2986 HU, so the stored mask is exactly HU >= 226.
    assert cranium_bone_threshold() == (226, 3071)


def test_bone_mask_identical_to_invesalius(ct_result: InferenceResult,
                                           cranium_ct: SeriesFixture) -> None:
    seg = ct_result.segmentation
    assert seg is not None
    assert [lab.name for lab in seg.labels] == ["Body", "Bone", "Air inside body"]
    bone = seg.masks[1]
    assert bone.shape == cranium_ct.reference_mask.shape
    assert int(bone.sum()) == 475759
    np.testing.assert_array_equal(bone, cranium_ct.reference_mask)
    assert cranium_ct.array.max() < 3071  # so the upper bound never mattered


def _scipy_reference(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same rules written independently with scipy.ndimage on the whole volume."""
    cube = np.ones((3, 3, 3), bool)
    body = hu > -500
    body = ndimage.binary_dilation(ndimage.binary_erosion(body, cube, border_value=1), cube)
    body = ndimage.binary_erosion(ndimage.binary_dilation(body, cube), cube, border_value=1)
    labels, _ = ndimage.label(body, structure=cube)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    body = labels == counts.argmax()
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    bone = hu >= 226
    air = (hu < -400) & body
    labels, _ = ndimage.label(air, structure=cube)
    counts = np.bincount(labels.ravel())
    voxel_ml = 1.5 * 0.9570312 ** 2 / 1000
    keep = counts >= int(np.ceil(0.05 / voxel_ml))
    keep[0] = False
    return body, bone, keep[labels]


def test_agrees_with_scipy_reference(ct_result: InferenceResult,
                                     cranium_ct: SeriesFixture) -> None:
    seg = ct_result.segmentation
    assert seg is not None
    body, bone, air = _scipy_reference(cranium_ct.array)
    # Same rules, independent implementation: voxel-for-voxel identical (the ONNX
    # graph on the body's bounding box equals scipy's morphology on the whole volume).
    np.testing.assert_array_equal(seg.masks[1], bone)
    np.testing.assert_array_equal(seg.masks[0], body)
    np.testing.assert_array_equal(seg.masks[2], air)
    # sanity of the anatomy: air pockets (sinuses, airway) are inside the head
    assert seg.masks[2].sum() > 10_000 and not (seg.masks[2] & ~seg.masks[0]).any()


def test_measurements_and_identity(ct_result: InferenceResult, cranium_ct: SeriesFixture) -> None:
    assert ct_result.model.family == "rule-based"
    manifest = load_manifest(SHIPPED_MODELS_DIR / "ct-tissue")
    assert ct_result.model.weights_sha256 == (manifest.weights[0].sha256,)
    assert ct_result.model.weights_sha256[0] == sha256_file(
        SHIPPED_MODELS_DIR / "ct-tissue" / "ct_tissue.onnx")
    voxel_ml = float(np.prod(cranium_ct.spacing)) / 1000
    m = {(x.name, x.label_value): x for x in ct_result.measurements}
    assert m[("volume", 2)].value == pytest.approx(475759 * voxel_ml)
    assert m[("volume", 2)].unit == "ml"
    assert m[("min", 2)].value == 226.0 and m[("min", 2)].unit == "[hnsf'U]"
    assert m[("max", 2)].value == cranium_ct.array.max()
    assert m[("mean", 2)].value == pytest.approx(
        float(cranium_ct.array[cranium_ct.reference_mask].mean()), rel=1e-6)
    assert ct_result.volume.frames[0].sop_instance_uid  # per-slice refs for the SEG encoder


def test_cli_run_writes_nifti_and_json(cranium_ct: SeriesFixture, tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dicomnode", "models", "run", "ct-tissue",
         str(cranium_ct.directory), "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    bone = nib.load(out / "mask-2-bone.nii.gz")
    data = np.asanyarray(bone.dataobj).transpose(2, 1, 0).astype(bool)  # (i=col, j=row, k)
    np.testing.assert_array_equal(data, cranium_ct.reference_mask)
    # voxel (k, r, c) lands at the same patient position: RAS = diag(-1,-1,1) LPS
    k, r, c = 40, 100, 120
    ras = bone.affine @ [c, r, k, 1]
    lps = cranium_ct.affine @ [k, r, c, 1]
    np.testing.assert_allclose(ras[:3], lps[:3] * [-1, -1, 1], atol=1e-4)
    labels = np.asanyarray(nib.load(out / "labels.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    summary = json.loads((out / "measurements.json").read_text())
    assert summary["model"]["family"] == "rule-based"
    vol = {m["label_value"]: m["value"] for m in summary["measurements"] if m["name"] == "volume"}
    assert vol[2] == pytest.approx(475759 * float(np.prod(cranium_ct.spacing)) / 1000)
    assert "Bone: volume" in proc.stdout
