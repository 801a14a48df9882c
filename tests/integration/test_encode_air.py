"""IHE AI Results (AIR) encoding: the algorithm's Contributing Equipment item in SEG,
SR and SC, TID 4019 Algorithm Identification in the SR, Verification Flag UNVERIFIED.

Objects are built from a real CT series written to disk, saved as Part 10 files and
checked with dicom3tools' ``dciodvfy`` (zero errors) and read back with pydicom.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode import __version__
from dicomnode.domain import InferenceResult
from dicomnode.encode import EncodeOptions, encode_results
from dicomnode.encode.uids import algorithm_device_uid
from tests.support.encode_data import (
    MODEL,
    classification_result,
    phantom,
    seg_result,
    volume_from_paths,
)
from tests.support.peers import dciodvfy
from tests.support.series import write_series

# dicom3tools 1.00~20220618 (Debian) predates Device UID in the Contributing
# Equipment item, which the IHE AIR profile asks for: its one accepted warning.
DEVICE_UID_WARNING = "ContributingEquipmentSequence(0018,a001)[3]/DeviceUID(0018,1002)> - " \
    "Attribute is not present in standard DICOM IOD"


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> InferenceResult:
    root = tmp_path_factory.mktemp("air-series")
    paths = write_series(phantom((10, 32, 36), "CT"), root / "ct", modality="CT",
                         spacing=(2.5, 0.7, 0.8), series_number=4)
    vol = volume_from_paths(paths)
    return seg_result(vol, classifications=classification_result(vol).classifications)


@pytest.fixture(scope="module")
def objects(result: InferenceResult) -> list[Dataset]:
    out = encode_results(result, formats=("seg", "sr", "sc"),
                         options=EncodeOptions(sc_max_images=2))
    assert [d.Modality for d in out][:2] == ["SEG", "SR"] and len(out) >= 3
    return out


def _algorithm_items(ds: Dataset) -> list[Dataset]:
    return [item for item in ds.ContributingEquipmentSequence
            if any(c.CodeValue == "Newcode1" and c.CodingSchemeDesignator == "99IHE"
                   for c in item.PurposeOfReferenceCodeSequence)]


def _content_items(seq: object) -> Iterator[Dataset]:
    for item in seq or []:  # type: ignore[attr-defined]
        yield item
        yield from _content_items(item.get("ContentSequence"))


def test_every_object_has_one_processing_algorithm_item(objects: list[Dataset],
                                                        tmp_path: Path) -> None:
    uid = algorithm_device_uid(MODEL)
    for i, ds in enumerate(objects):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        items = _algorithm_items(back)
        assert len(items) == 1, back.Modality
        item = items[0]
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == \
            ("Newcode1", "99IHE", "Processing Algorithm")
        assert item.Manufacturer == "dicomnode"  # the test model names no authors
        assert item.ManufacturerModelName == MODEL.name
        assert list(item.SoftwareVersions) == [MODEL.version, f"dicomnode {__version__}"]
        assert item.DeviceUID == uid
        assert MODEL.weights_sha256[0] in item.ContributionDescription
        # The equipment items highdicom already writes are kept, ours comes last.
        purposes = [e.PurposeOfReferenceCodeSequence[0].CodeValue
                    for e in back.ContributingEquipmentSequence]
        assert purposes[-1] == "Newcode1"
        if back.Modality in ("SEG", "OT"):
            assert "109101" in purposes  # acquisition equipment of the source images

        r = dciodvfy(path)
        assert r.errors == (), f"{back.Modality}:\n{r.output}"
        unexpected = [w for w in r.warnings if DEVICE_UID_WARNING not in w
                      and "Laterality" not in w]
        assert unexpected == [], unexpected


def test_sr_has_tid_4019_and_is_unverified(objects: list[Dataset],
                                           result: InferenceResult) -> None:
    sr = objects[1]
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert "VerifyingObserverSequence" not in sr
    items = list(_content_items(sr.ContentSequence))

    def values(code: str) -> list[str]:
        return [str(i.TextValue) for i in items
                if i.get("ConceptNameCodeSequence")
                and i.ConceptNameCodeSequence[0].CodeValue == code
                and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == "DCM"]

    names, versions, params = values("111001"), values("111003"), values("111002")
    # One TID 4019 per measurement group (3 segments + 1 classification) and per measurement.
    assert names and set(names) == {MODEL.name}
    assert len(versions) == len(names) and set(versions) == {MODEL.version}
    assert f"weights_sha256={MODEL.weights_sha256[0]}" in params
    assert "family=AI" in params
    groups = [i for i in items if i.get("ConceptNameCodeSequence")
              and i.ConceptNameCodeSequence[0].CodeValue == "125007"]
    assert len(groups) == 4
    for g in groups:
        assert "111001" in {c.ConceptNameCodeSequence[0].CodeValue for c in g.ContentSequence}


def test_device_uid_identifies_name_version_and_weights(result: InferenceResult) -> None:
    other_weights = dataclasses.replace(MODEL, weights_sha256=("cd" * 32,))
    other_version = dataclasses.replace(MODEL, version="1.1")
    uids = {algorithm_device_uid(m) for m in (MODEL, other_weights, other_version)}
    assert len(uids) == 3
    assert algorithm_device_uid(dataclasses.replace(MODEL)) == algorithm_device_uid(MODEL)
    # Independent of the node (manufacturer/device name), unlike the SR observer UID.
    a = encode_results(result, formats=("seg",), options=EncodeOptions())[0]
    b = encode_results(result, formats=("seg",),
                       options=EncodeOptions(manufacturer="Hospital IT", device_name="node-2"))[0]
    assert _algorithm_items(a)[0].DeviceUID == _algorithm_items(b)[0].DeviceUID


def test_manufacturer_is_the_model_authors_when_named(result: InferenceResult) -> None:
    authored = dataclasses.replace(result, model=dataclasses.replace(
        MODEL, authors="Example Lab, University Hospital"))
    sr = encode_results(authored, formats=("sr",))[0]
    item = _algorithm_items(sr)[0]
    assert item.Manufacturer == "Example Lab, University Hospital"
    assert sr.Manufacturer == "dicomnode"  # General Equipment stays the node


def test_authors_with_backslash_and_newline_stay_one_lo_value(result: InferenceResult) -> None:
    authored = dataclasses.replace(result, model=dataclasses.replace(
        MODEL, authors="Lab A\\Lab B\n" + "x" * 80))
    item = _algorithm_items(encode_results(authored, formats=("sr",))[0])[0]
    assert item.Manufacturer == ("Lab A/Lab B " + "x" * 80)[:64]
    assert item["Manufacturer"].VM == 1
