"""codec.part10: to_part10 gives the same bytes as pydicom's writer for every object we
make; part10_header the same file meta as pydicom for a received instance."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dicomnode.codec import part10
from dicomnode.codec.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    part10_header,
    to_part10,
)
from dicomnode.encode import EncodeOptions, encode_results
from tests.support.encode_data import phantom, seg_result, volume_from_paths
from tests.support.series import SAGITTAL, write_series

SHAPE = (6, 24, 20)


def _pydicom_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if to_part10 hands the object to pydicom (the fast path must be taken)."""
    def refuse(ds: Dataset) -> bytes:
        raise AssertionError("to_part10 fell back to pydicom")
    monkeypatch.setattr(part10, "_pydicom", refuse)


@pytest.mark.parametrize("kind", ["axial_ct", "enhanced_mr", "unicode_ct"])
def test_result_objects_byte_identical(tmp_path: Path, kind: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    kw: dict[str, object] = {
        "axial_ct": dict(modality="CT", spacing=(2.5, 0.7, 0.8)),
        "enhanced_mr": dict(modality="MR", orientation=SAGITTAL, enhanced=True),
        "unicode_ct": dict(modality="CT", character_set="ISO_IR 192",
                           patient_name="Müller^Jörg", accession_number="ÄCC-42"),
    }[kind]
    paths = write_series(phantom(SHAPE, str(kw["modality"])), tmp_path / kind, **kw)  # type: ignore[arg-type]
    result = seg_result(volume_from_paths(paths))
    objects = encode_results(result, formats=("seg", "sr", "sc"),
                             options=EncodeOptions(sc_max_images=2))
    objects += encode_results(result, formats=("seg",),
                              options=EncodeOptions(keep_empty_frames=True))
    probs = result.segmentation.masks.astype(np.float32) * 0.6  # type: ignore[union-attr]
    fractional = dataclasses.replace(result, segmentation=dataclasses.replace(
        result.segmentation, probabilities=probs))
    objects += encode_results(fractional, formats=("seg",),
                              options=EncodeOptions(segmentation_type="fractional"))
    assert {str(ds.Modality) for ds in objects} >= {"SEG", "SR"}
    for ds in objects:
        # pydicom's writer corrects ambiguous VRs (highdicom's Pixel Data is "OB or
        # OW") in place: the fast writer runs first, on the object as encoded.
        with monkeypatch.context() as m:
            if kind != "enhanced_mr":
                # An enhanced source's items copied into the SEG hold raw (undecoded)
                # elements: pydicom writes those objects itself. Others: the fast path.
                m.setattr(part10, "_pydicom", lambda ds: pytest.fail("fell back"))
            got = to_part10(ds)
        assert got == _pydicom_bytes(ds), f"{ds.Modality} {ds.SOPClassUID}"
        again = pydicom.dcmread(BytesIO(got))
        assert again.SOPInstanceUID == ds.SOPInstanceUID


def _synthetic(charset: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = "Ørsted^Hans" if charset else "Doe^John"
    ds.PatientID = "X1"  # even
    ds.AccessionNumber = "ABC"  # odd: padded with a space
    ds.StudyDescription = "Über" if charset else "CT"
    ds.ImageType = ["DERIVED", "SECONDARY", "X"]
    ds.StudyDate = "20240102"
    ds.StudyTime = "101112.5"
    ds.AcquisitionDateTime = "20240102101112"
    ds.PixelSpacing = [0.5, "0.25"]
    ds.SliceThickness = 1.0
    ds.InstanceNumber = 7
    ds.ReferencedFrameNumber = [1, 2, 3]
    ds.Rows, ds.Columns = 3, 5
    ds.ImagesInAcquisition = ""  # empty value
    ds.RescaleIntercept = "-1024"
    ds.FrameIncrementPointer = 0x00181063  # AT
    ds.add_new(0x00091010, "LO", "private")
    ds.add_new(0x00091011, "US", [1, 2])
    ds.add_new(0x00091012, "FD", [1.5, -2.25])
    ds.add_new(0x00091013, "SL", -5)
    ds.add_new(0x00091014, "FL", 0.5)
    ds.add_new(0x00091015, "SS", [-1, 1])
    ds.add_new(0x00091016, "UL", 70000)
    ds.add_new(0x00091017, "OB", b"\x01\x02\x03")  # odd: padded with NUL
    ds.add_new(0x00091018, "UT", "long text " * 10)
    ds.add_new(0x00091019, "UN", b"\x00\x01")
    ds.add_new(0x0009101A, "OW", b"\x01\x00\x02\x00")
    ds.add_new(0x0009101B, "ST", "")
    ds.add_new(0x0009101C, "UI", "1.2.3")  # odd: padded with NUL
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "DCM", "Odd"
    undefined_item = Dataset()
    undefined_item.is_undefined_length_sequence_item = True
    undefined_item.ReferencedSOPInstanceUID = "1.2.3.4"
    undefined_item.ConceptNameCodeSequence = [inner]
    ds.ReferencedImageSequence = [undefined_item, Dataset()]
    ds.ReferencedImageSequence[1].ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.AnatomicRegionSequence = Sequence()  # empty sequence
    ds.add_new(0x7FE00010, "OB", np.arange(15, dtype=np.uint8).tobytes())  # odd length
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    return ds


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
def test_synthetic_dataset_byte_identical(charset: str | None, no_fallback: None) -> None:
    ds = _synthetic(charset)
    pixels = ds.PixelData
    del ds.PixelData
    ds.PixelData = pixels  # VR "OB or OW", as highdicom leaves it: decided as pydicom does
    assert ds["PixelData"].VR == "OB or OW"
    assert part10._Writer().dataset(ds, None)  # no fallback on any element here
    ds2 = _synthetic(charset)
    ds2.SOPInstanceUID = ds.SOPInstanceUID
    assert to_part10(ds) == _pydicom_bytes(ds2)


def test_multibyte_charset_text_goes_through_pydicom_writer() -> None:
    ds = _synthetic("ISO_IR 192")
    # Japanese: escape sequences around the non-ASCII parts
    ds.SpecificCharacterSet = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    ds.StudyDescription = "CT"
    assert to_part10(ds) == _pydicom_bytes(ds)


def test_what_is_not_mirrored_falls_back_to_pydicom(tmp_path: Path) -> None:
    # ambiguous VR, an element read from a file (raw), another transfer syntax
    ds = _synthetic()
    ds.add_new(0x00280106, "US or SS", 0)  # Smallest Image Pixel Value
    with pytest.raises(part10._Fallback):
        part10._Writer().dataset(ds, None)
    assert to_part10(ds) == _pydicom_bytes(ds)
    path = tmp_path / "x.dcm"
    _synthetic().save_as(path, enforce_file_format=True)
    read = pydicom.dcmread(path)
    assert to_part10(read) == _pydicom_bytes(read)
    implicit = _synthetic()
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert to_part10(implicit) == _pydicom_bytes(implicit)


@pytest.mark.parametrize(("sop_uid", "aet"), [("1.2.3", ""), ("1.2.34", "SCANNER "),
                                              ("1.2.840.99.1", "CT1")])
def test_received_file_meta_is_what_pydicom_writes(sop_uid: str, aet: str) -> None:
    """part10_header (the receiver's file meta) against pydicom's write_file_meta_info."""
    ct = "1.2.840.10008.5.1.4.1.1.2"
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ct
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        if aet.strip():
            meta.SourceApplicationEntityTitle = aet.strip()
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)
        assert part10_header(ct, sop_uid, ts, aet) == fp.getvalue()
