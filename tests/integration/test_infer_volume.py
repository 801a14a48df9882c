"""DICOM series -> Volume: real series, enhanced multi-frame, compressed, and refusals."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicomnode.codec.reader import read_fast
from dicomnode.errors import VolumeError
from dicomnode.infer import load_volume
from tests.support.infer_data import SeriesFixture, cranium_ct_series
from tests.support.series import oblique, write_series


def _assert_same_volume(v, fx: SeriesFixture) -> None:  # type: ignore[no-untyped-def]
    assert v.shape == fx.array.shape
    assert v.array.dtype == np.float32
    np.testing.assert_array_equal(v.array, fx.array)
    np.testing.assert_allclose(v.affine, fx.affine, atol=1e-4)


def test_real_ct_loads_exactly(cranium_ct: SeriesFixture) -> None:
    shuffled = list(cranium_ct.paths)
    random.Random(7).shuffle(shuffled)
    v = load_volume(shuffled)
    _assert_same_volume(v, cranium_ct)
    assert v.modality == "CT" and v.series_uid == cranium_ct.series_uid
    assert v.array.min() == -1024  # rescale intercept applied: HU, not stored values
    # voxel -> source instance mapping follows the sorted order
    for k in (0, 50, 107):
        ds = pydicom.dcmread(cranium_ct.paths[k], stop_before_pixels=True)
        assert v.frames[k].sop_instance_uid == ds.SOPInstanceUID
        assert v.frames[k].frame_number is None
        np.testing.assert_allclose(
            v.affine @ [k, 0, 0, 1], [*ds.ImagePositionPatient, 1], atol=1e-4
        )


def test_real_mr_loads_exactly(colin27_mr: SeriesFixture) -> None:
    v = load_volume(colin27_mr.directory)
    _assert_same_volume(v, colin27_mr)
    assert v.spacing == pytest.approx((1.0, 1.0, 1.0))


def test_enhanced_multiframe_equals_single_frame(cranium_ct: SeriesFixture) -> None:
    mf = cranium_ct_series(enhanced=True)
    assert len(mf.paths) == 1
    v = load_volume(mf.paths)
    _assert_same_volume(v, cranium_ct)
    assert {f.frame_number for f in v.frames} == set(range(1, 109))
    assert len({f.sop_instance_uid for f in v.frames}) == 1


@pytest.mark.parametrize(
    "ts", [JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless],
    ids=["jpeg-lossless", "jpeg-ls", "jpeg2000", "rle"],
)
def test_compressed_series_load_identically(ts: str) -> None:
    plain = cranium_ct_series(k_range=(40, 56))
    comp = cranium_ct_series(k_range=(40, 56), transfer_syntax=ts)
    assert str(pydicom.dcmread(comp.paths[0]).file_meta.TransferSyntaxUID) == ts
    a, b = load_volume(plain.paths), load_volume(comp.paths)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


def test_oblique_geometry(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).normal(0, 100, (6, 12, 10)).round()
    paths = write_series(arr, tmp_path, orientation=oblique(25), spacing=(2.5, 0.8, 0.7),
                         origin=(10, -20, 30))
    v = load_volume(paths[::-1])
    np.testing.assert_array_equal(v.array, arr.astype(np.float32))
    assert v.spacing == pytest.approx((2.5, 0.8, 0.7), abs=1e-5)
    ds = pydicom.dcmread(paths[-1])
    np.testing.assert_allclose(v.affine @ [5, 0, 0, 1], [*ds.ImagePositionPatient, 1], atol=1e-4)


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def small_series(tmp_path: Path) -> list[Path]:
    arr = np.arange(8 * 6 * 5, dtype=float).reshape(8, 6, 5)
    return write_series(arr, tmp_path / "s", spacing=(3.0, 1.0, 1.0))


def _edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(path)


def test_odd_orientation_inside_the_stack_leaves_a_gap(small_series: list[Path]) -> None:
    # The odd slice is left out of the stack; what is left has a hole: refused, with both.
    _edit(small_series[3], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with pytest.raises(VolumeError, match=r"missing slices.*left out of the stack: 1 image: "
                                          r"orientation .*coronal.* differs"):
        load_volume(small_series)


def test_rejects_irregular_spacing(small_series: list[Path]) -> None:
    ds = pydicom.dcmread(small_series[4])
    _edit(small_series[4], ImagePositionPatient=[*ds.ImagePositionPatient[:2],
                                                 float(ds.ImagePositionPatient[2]) + 1.1])
    with pytest.raises(VolumeError, match="irregular slice spacing"):
        load_volume(small_series)


def test_rejects_missing_slices(small_series: list[Path]) -> None:
    with pytest.raises(VolumeError, match=r"missing slices: 2 slice\(s\) missing"):
        load_volume(small_series[:3] + small_series[5:])


def test_rejects_gantry_tilt_tag(small_series: list[Path]) -> None:
    _edit(small_series[0], GantryDetectorTilt=12.0)
    with pytest.raises(VolumeError, match="gantry tilt of 12 degrees"):
        load_volume(small_series)


def test_rejects_sheared_stack(small_series: list[Path]) -> None:
    # What a tilted acquisition looks like without the tag: each slice shifted in-plane.
    for k, p in enumerate(small_series):
        ds = pydicom.dcmread(p)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(p, ImagePositionPatient=[x, y + k * 3.0 * np.tan(np.radians(15)), z])
    with pytest.raises(VolumeError, match=r"gantry tilt or sheared stack of 15.00 degrees"):
        load_volume(small_series)


def test_a_series_of_localisers_only_is_refused(small_series: list[Path]) -> None:
    for p in small_series:
        _edit(p, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(VolumeError, match=r"no image of the series can be part of a volume: "
                                          r"\d+ images: LOCALIZER \(scout\) image"):
        load_volume(small_series)


def test_rejects_single_frame(small_series: list[Path]) -> None:
    with pytest.raises(VolumeError, match="1 frame.*cannot be a volume"):
        load_volume(small_series[:1])


def test_rejects_mixed_series(small_series: list[Path], tmp_path: Path) -> None:
    other = write_series(np.zeros((3, 6, 5)), tmp_path / "o", spacing=(3.0, 1.0, 1.0))
    with pytest.raises(VolumeError, match="one series at a time"):
        load_volume(small_series + other[:1])


def test_rejects_duplicates(small_series: list[Path], tmp_path: Path) -> None:
    dup = tmp_path / "dup.dcm"
    shutil.copy(small_series[2], dup)
    with pytest.raises(VolumeError, match="same position"):
        load_volume([*small_series, dup])


def test_rejects_mixed_matrix_and_non_images(small_series: list[Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(small_series[1])
    ds.Rows, ds.Columns = 5, 6  # same bytes, different matrix
    ds.save_as(small_series[1])
    with pytest.raises(VolumeError, match=r"missing slices.*1 image: matrix 5x6 differs"):
        load_volume(small_series)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(VolumeError, match="1 image: unreadable: not a DICOM Part 10 file"):
        load_volume([junk])
    with pytest.raises(VolumeError, match="empty series"):
        load_volume([])



def test_unreadable_files_are_left_out_with_the_reason(small_series: list[Path],
                                                       tmp_path: Path) -> None:
    """A file truncated on disk (pydicom would read it silently, short) and one that is
    not DICOM at all are left out; the rest is the volume."""
    full = load_volume(small_series)
    last = small_series[-1]  # an end of the stack: the rest stays regularly spaced
    data = last.read_bytes()
    last.write_bytes(data[:-100])
    junk = tmp_path / "1.2.3.4.dcm"
    junk.write_bytes(b"\0" * 300)
    vol = load_volume([*small_series, junk])
    assert vol.shape[0] == full.shape[0] - 1
    reasons = {e.reason: e.instances for e in vol.excluded}
    [trunc] = [r for r in reasons if r.startswith("unreadable: truncated")]
    assert reasons[trunc] == (last.stem,)
    assert reasons["unreadable: not a DICOM Part 10 file (no DICM prefix)"] == ("1.2.3.4",)
    assert np.array_equal(vol.array, full.array[:-1]) or np.array_equal(vol.array,
                                                                        full.array[1:])


# --------------------------------------------------------------------------- fast header path


def test_fast_path_equals_pydicom_path(cranium_ct: SeriesFixture, colin27_mr: SeriesFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode.infer import volume as volmod

    assert read_fast(cranium_ct.paths[0]) is not None  # the common case is fast
    fast = [load_volume(cranium_ct.directory), load_volume(colin27_mr.directory)]
    monkeypatch.setattr(volmod, "read_fast", lambda path, *_: None)
    slow = [load_volume(cranium_ct.directory), load_volume(colin27_mr.directory)]
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_array_equal(a.affine, b.affine)
        assert a.frames == b.frames and a.paths == b.paths
        assert (a.study_uid, a.series_uid, a.frame_of_reference_uid, a.modality) == (
            b.study_uid, b.series_uid, b.frame_of_reference_uid, b.modality)


def test_implicit_vr_and_unusual_layouts(tmp_path: Path) -> None:
    from pydicom.uid import ImplicitVRLittleEndian


    arr = np.random.default_rng(5).integers(-1000, 2000, (5, 7, 6)).astype(float)
    paths = write_series(arr, tmp_path / "s", spacing=(2.0, 0.5, 0.5), rescale_slope=2.0,
                         rescale_intercept=-1024)
    for p in paths[:2]:  # mixed encodings in one series are legal
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(p, implicit_vr=True, little_endian=True)
    assert read_fast(paths[0]) is not None
    v = load_volume(paths)
    expected = np.rint((arr + 1024) / 2.0) * 2.0 - 1024
    np.testing.assert_array_equal(v.array, expected.astype(np.float32))
    # 12 bits stored in 16: pydicom decodes these (masking the unused high bits)
    ds = pydicom.dcmread(paths[3])
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(paths[3])
    assert read_fast(paths[3]) is not None
    np.testing.assert_array_equal(load_volume(paths).array, expected.astype(np.float32))
