"""Series as scanners send them: scouts, several orientations, echoes, acquisitions.

Every series here is written by pydicom (tests/support/series.py) as a scanner
would send it: one Series Instance UID, one Frame of Reference, the odd images
mixed into the same folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.errors import VolumeError
from dicomnode.infer import StackChoice, VolumeBuffer, load_volume
from tests.support.series import CORONAL, write_series


def _edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(path)


@pytest.fixture
def uids() -> dict[str, str]:
    return {"study_uid": generate_uid(), "series_uid": generate_uid(),
            "frame_of_reference_uid": generate_uid()}


def _axial(tmp_path: Path, uids: dict[str, str], n: int = 12, **kw: object) -> tuple[
        np.ndarray, list[Path]]:
    arr = np.arange(n * 8 * 6, dtype=float).reshape(n, 8, 6) % 997
    return arr, write_series(arr, tmp_path / "axial", modality="MR", spacing=(2.0, 1.0, 1.0),
                             **uids, **kw)  # type: ignore[arg-type]


def _scout(tmp_path: Path, uids: dict[str, str], shape: tuple[int, int] = (16, 16)) -> Path:
    """A coronal LOCALIZER image of the same series (another matrix, as scanners do)."""
    [p] = write_series(np.full((1, *shape), 300.0), tmp_path / "scout", modality="MR",
                       orientation=CORONAL, **uids)  # type: ignore[arg-type]
    _edit(p, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], InstanceNumber=999)
    return p


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("buffered", [False, True])
def test_scout_mixed_in_is_left_out(tmp_path: Path, uids: dict[str, str], where: str,
                                    buffered: bool) -> None:
    arr, paths = _axial(tmp_path, uids)
    scout = _scout(tmp_path, uids)
    at = {"first": 0, "middle": len(paths) // 2, "last": len(paths)}[where]
    files = paths[:at] + [scout] + paths[at:]
    v = load_volume(files, buffer=VolumeBuffer() if buffered else None)
    np.testing.assert_array_equal(v.array, arr)
    assert v.shape == arr.shape
    assert [e.reason for e in v.excluded] == ["LOCALIZER (scout) image"]
    assert v.excluded[0].instances == (str(pydicom.dcmread(scout).SOPInstanceUID),)
    assert v.plane == "axial"
    assert scout not in v.paths


def test_scout_with_the_same_matrix_is_left_out_too(tmp_path: Path,
                                                    uids: dict[str, str]) -> None:
    arr, paths = _axial(tmp_path, uids)
    scout = _scout(tmp_path, uids, shape=(8, 6))
    v = load_volume([scout, *paths], buffer=VolumeBuffer())
    np.testing.assert_array_equal(v.array, arr)
    assert v.excluded[0].describe() == "1 image: LOCALIZER (scout) image"


def test_two_orientations_keep_the_largest_stack(tmp_path: Path, uids: dict[str, str]) -> None:
    arr, axial = _axial(tmp_path, uids, n=12)
    cor = np.ones((5, 8, 6)) * 7
    coronal = write_series(cor, tmp_path / "cor", modality="MR", orientation=CORONAL,
                           spacing=(3.0, 1.0, 1.0), **uids)  # type: ignore[arg-type]
    files = [p for pair in zip(axial, coronal, strict=False) for p in pair] + axial[5:]
    v = load_volume(files)
    np.testing.assert_array_equal(v.array, arr)
    [ex] = v.excluded
    assert len(ex.instances) == 5
    assert "coronal" in ex.reason and "differs from the stack used" in ex.reason
    # A model that asks for the coronal stack gets it, and the axial one is left out.
    c = load_volume(files, stack=StackChoice(split_by="orientation", select="coronal"))
    assert c.plane == "coronal" and c.shape == (5, 8, 6)
    np.testing.assert_array_equal(c.array, cor)
    assert [len(e.instances) for e in c.excluded] == [12]
    # A model that handles only sagittal slices: refused, naming what was found.
    with pytest.raises(VolumeError, match=r"no sagittal stack.*12 axial 8x6.*5 coronal"):
        load_volume(files, stack=StackChoice(planes=("sagittal",)))


def _multi_echo(tmp_path: Path, uids: dict[str, str]) -> tuple[list[np.ndarray], list[Path]]:
    arrays, files = [], []
    for echo in (1, 2, 3):
        arr = np.full((10, 8, 6), 100.0 * echo) + np.arange(10)[:, None, None]
        paths = write_series(arr, tmp_path / f"e{echo}", modality="MR",
                             spacing=(2.0, 1.0, 1.0), **uids)  # type: ignore[arg-type]
        for k, p in enumerate(paths):
            _edit(p, EchoNumbers=echo, EchoTime=3.0 * echo, InstanceNumber=k * 3 + echo)
        arrays.append(arr)
        files += paths
    return arrays, files


def test_multi_echo_series_split_by_echo(tmp_path: Path, uids: dict[str, str]) -> None:
    arrays, files = _multi_echo(tmp_path, uids)
    # Default: the stacks are the same size; the first echo wins, the others are left out.
    v = load_volume(files, buffer=VolumeBuffer())
    np.testing.assert_array_equal(v.array, arrays[0])
    assert sorted(e.reason for e in v.excluded) == [
        "another stack: EchoNumbers 2 (the volume is EchoNumbers 1)",
        "another stack: EchoNumbers 3 (the volume is EchoNumbers 1)"]
    assert all(len(e.instances) == 10 for e in v.excluded)
    # A model asking for the last echo, or echo 2.
    last = load_volume(files, stack=StackChoice(split_by="echo", select="last"))
    np.testing.assert_array_equal(last.array, arrays[2])
    two = load_volume(files, stack=StackChoice(split_by="echo", select="2"))
    np.testing.assert_array_equal(two.array, arrays[1])
    with pytest.raises(VolumeError, match=r"no stack with EchoNumbers 4 .*values found: 1, 2, 3"):
        load_volume(files, stack=StackChoice(split_by="echo", select="4"))


def test_acquisitions_are_one_stack_unless_a_model_splits_them(tmp_path: Path,
                                                               uids: dict[str, str]) -> None:
    # A CT covering the body in two acquisitions: one volume by default.
    arr = np.arange(10 * 4 * 4, dtype=float).reshape(10, 4, 4)
    paths = write_series(arr, tmp_path / "ct", **uids)  # type: ignore[arg-type]
    for k, p in enumerate(paths):
        _edit(p, AcquisitionNumber=1 if k < 6 else 2)
    v = load_volume(paths)
    np.testing.assert_array_equal(v.array, arr)
    assert v.excluded == ()
    first = load_volume(paths, stack=StackChoice(split_by="acquisition", select="largest"))
    np.testing.assert_array_equal(first.array, arr[:6])
    assert [len(e.instances) for e in first.excluded] == [4]
    assert "AcquisitionNumber 2" in first.excluded[0].reason


def test_colour_screen_and_image_without_position_are_left_out(
        tmp_path: Path, uids: dict[str, str]) -> None:
    arr, paths = _axial(tmp_path, uids)
    [extra] = write_series(np.zeros((1, 8, 6)), tmp_path / "x", modality="MR",
                           **uids)  # type: ignore[arg-type]
    ds = pydicom.dcmread(extra)
    del ds.ImagePositionPatient
    ds.save_as(extra)
    v = load_volume([*paths, extra])
    np.testing.assert_array_equal(v.array, arr)
    assert [e.reason for e in v.excluded] == [
        "no Image Position / Orientation (Patient): not a slice of a volume"]


def test_too_few_usable_frames_names_what_was_left_out(tmp_path: Path,
                                                       uids: dict[str, str]) -> None:
    _, paths = _axial(tmp_path, uids, n=3)
    scout = _scout(tmp_path, uids)
    with pytest.raises(VolumeError, match=r"3 usable frame\(s\) cannot be a volume \(need at "
                                          r"least 20\); left out: 1 image: LOCALIZER"):
        load_volume([scout, *paths], min_slices=20)


def test_dynamic_series_split_by_temporal_position(tmp_path: Path,
                                                   uids: dict[str, str]) -> None:
    arrays, files = [], []
    for t in (1, 2, 3, 4):
        arr = np.full((6, 8, 6), 10.0 * t)
        paths = write_series(arr, tmp_path / f"t{t}", modality="MR", spacing=(2.0, 1.0, 1.0),
                             **uids)  # type: ignore[arg-type]
        for p in paths:
            _edit(p, TemporalPositionIdentifier=t, NumberOfTemporalPositions=4)
        arrays.append(arr)
        files += paths
    v = load_volume(files)
    np.testing.assert_array_equal(v.array, arrays[0])
    assert sum(len(e.instances) for e in v.excluded) == 18
    last = load_volume(files, stack=StackChoice(split_by="temporal", select="last"))
    np.testing.assert_array_equal(last.array, arrays[3])
    assert ("another stack: TemporalPositionIdentifier 1 (the volume is "
            "TemporalPositionIdentifier 4)") in {
        e.reason for e in last.excluded}


def test_enhanced_multiframe_with_a_scout_beside_it(tmp_path: Path,
                                                    uids: dict[str, str]) -> None:
    arr = np.arange(6 * 8 * 6, dtype=float).reshape(6, 8, 6) % 503
    [enhanced] = write_series(arr, tmp_path / "mf", modality="MR", spacing=(2.0, 1.0, 1.0),
                              enhanced=True, **uids)  # type: ignore[arg-type]
    series_uid = str(pydicom.dcmread(enhanced).SeriesInstanceUID)  # the converter's own
    scout = _scout(tmp_path, {**uids, "series_uid": series_uid})
    _edit(scout, FrameOfReferenceUID=str(pydicom.dcmread(enhanced).FrameOfReferenceUID))
    for buffer in (None, VolumeBuffer()):
        v = load_volume([scout, enhanced], buffer=buffer)
        np.testing.assert_array_equal(v.array, arr)
        assert [e.reason for e in v.excluded] == ["LOCALIZER (scout) image"]
