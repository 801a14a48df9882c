"""Secondary Capture: Laterality as the source's body part requires it, and the patient's
study context (Additional Patient History) copied as SEG and SR copy it.

Real series written to disk, real objects checked with dicom3tools: ``dciodvfy``
(no Laterality warning where the source gives none) and ``dcentvfy`` (SC, SEG and SR
consistent with the source series).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from dicomnode.encode import EncodeOptions, encode_results
from tests.support.encode_data import phantom, seg_result, volume_from_paths
from tests.support.peers import dcentvfy, dciodvfy
from tests.support.series import write_series

SHAPE = (8, 32, 40)
HISTORY = "Headache for three weeks; prior craniotomy 2019"


def _series(root: Path, body_part: str | None, laterality: str | None,
            history: str | None = HISTORY) -> list[Path]:
    paths = write_series(phantom(SHAPE, "CT"), root, modality="CT", body_part=body_part,
                         spacing=(2.0, 0.8, 0.8), series_number=4)
    for p in paths:  # as a scanner would send them
        ds = pydicom.dcmread(p)
        if laterality is None:
            del ds.Laterality
        else:
            ds.Laterality = laterality
        if history is not None:
            ds.AdditionalPatientHistory = history
        ds.save_as(p, enforce_file_format=True)
    return paths


def _encode(paths: list[Path], out: Path) -> list[Path]:
    res = seg_result(volume_from_paths(paths))
    objs = encode_results(res, formats=("seg", "sr", "sc"),
                          options=EncodeOptions(sc_max_images=2))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, ds in enumerate(objs):
        f = out / f"{i}-{ds.Modality}.dcm"
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
    return files


def _sc(files: list[Path]) -> list[pydicom.Dataset]:
    objs = [pydicom.dcmread(f) for f in files]
    return [ds for ds in objs if ds.SOPClassUID == SecondaryCaptureImageStorage]


@pytest.mark.parametrize("laterality", ["", None], ids=["empty", "absent"])
def test_an_unpaired_body_part_has_no_laterality_but_image_laterality_u(
        tmp_path: Path, laterality: str | None) -> None:
    files = _encode(_series(tmp_path / "src", "HEAD", laterality), tmp_path / "out")
    scs = _sc(files)
    assert scs, "no secondary capture was encoded"
    for f in files:
        r = dciodvfy(f)
        assert r.errors == (), r.output
        assert not [w for w in r.warnings if "Laterality" in w], r.output
    for ds in scs:
        assert "Laterality" not in ds
        assert ds.ImageLaterality == "U"


def test_an_unknown_body_part_keeps_laterality_empty(tmp_path: Path) -> None:
    # No BodyPartExamined: the node does not claim the part is unpaired.
    files = _encode(_series(tmp_path / "src", None, None), tmp_path / "out")
    for ds in _sc(files):
        assert ds.Laterality == "" and "ImageLaterality" not in ds
    for f in files:
        assert dciodvfy(f).errors == ()


def test_a_paired_body_part_keeps_the_sources_laterality(tmp_path: Path) -> None:
    files = _encode(_series(tmp_path / "src", "KNEE", "L"), tmp_path / "out")
    scs = _sc(files)
    assert scs and all(ds.Laterality == "L" and "ImageLaterality" not in ds for ds in scs)
    for f in files:
        r = dciodvfy(f)
        assert r.errors == (), r.output
        assert not [w for w in r.warnings if "Laterality" in w], r.output


def test_a_paired_body_part_of_unknown_side_has_laterality_present_but_empty(
        tmp_path: Path) -> None:
    # Type 2C: required for a paired part; empty is the DICOM answer for "unknown".
    files = _encode(_series(tmp_path / "src", "BREAST", ""), tmp_path / "out")
    scs = _sc(files)
    assert scs and all("Laterality" in ds and ds.Laterality == "" for ds in scs)
    for f in files:
        assert dciodvfy(f).errors == ()


def test_sc_copies_additional_patient_history_consistently_with_seg_and_sr(
        tmp_path: Path) -> None:
    src = _series(tmp_path / "src", "HEAD", "")
    files = _encode(src, tmp_path / "out")
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.get("AdditionalPatientHistory") == HISTORY, (ds.Modality, f.name)
    r = dcentvfy(*src, *files)
    assert r.errors == (), r.output
    # dicom3tools' own dictionary places AccessionNumber in different IEs for SR and SC;
    # that is the only kind of warning accepted (as in test_encode_objects.py).
    assert all("Different information entities" in w for w in r.warnings), r.output
