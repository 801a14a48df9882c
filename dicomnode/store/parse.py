"""Read the few attributes the store needs from an encoded DICOM instance.

Only the header is parsed (``stop_before_pixels`` and ``specific_tags``):
pixel data is never decoded, and the bytes written to disk are exactly the
bytes received.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import keyword_for_tag as dictionary_keyword
from pydicom.tag import Tag

from dicomnode.codec import walker
from dicomnode.errors import InvalidInstanceError
from dicomnode.store.files import check_uid


class UndecodableError(InvalidInstanceError):
    """The bytes are not a decodable DICOM dataset."""


class MissingAttributeError(InvalidInstanceError):
    """A required attribute (Study/Series/SOP Instance UID, SOP Class UID) is absent."""


class InvalidUIDError(InvalidInstanceError):
    """A UID is present but not a valid DICOM UID."""


_TAGS = [Tag(t) for t in (
    (0x0008, 0x0016),  # SOPClassUID
    (0x0008, 0x0018),  # SOPInstanceUID
    (0x0008, 0x0020),  # StudyDate
    (0x0008, 0x0050),  # AccessionNumber
    (0x0008, 0x0060),  # Modality
    (0x0008, 0x1030),  # StudyDescription
    (0x0008, 0x103E),  # SeriesDescription
    (0x0010, 0x0010),  # PatientName
    (0x0010, 0x0020),  # PatientID
    (0x0020, 0x000D),  # StudyInstanceUID
    (0x0020, 0x000E),  # SeriesInstanceUID
    (0x0020, 0x0011),  # SeriesNumber
    (0x0020, 0x0013),  # InstanceNumber
    (0x0020, 0x1002),  # ImagesInAcquisition
    (0x0020, 0x1209),  # NumberOfSeriesRelatedInstances
)]


@dataclass(frozen=True)
class InstanceMeta:
    """What the store records about one instance (UIDs validated on construction)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None = None
    modality: str = ""
    series_description: str = ""
    series_number: int | None = None
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    accession_number: str = ""
    study_description: str = ""
    expected_count: int | None = None  # Number of Series Related Instances / Images in Acq.
    calling_aet: str = ""
    called_aet: str = ""

    def with_peer(self, calling_aet: str, called_aet: str) -> InstanceMeta:
        return replace(self, calling_aet=calling_aet, called_aet=called_aet)


def _text(ds: Any, keyword: str, limit: int) -> str:
    v = ds.get(keyword, "")
    if v is None:
        return ""
    return str(v).strip()[:limit]


def _int(ds: Any, keyword: str) -> int | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _uid(ds: Any, keyword: str) -> str:
    v = ds.get(keyword)
    if v is None or str(v).strip("\x00 ") == "":
        raise MissingAttributeError(f"{keyword} is missing")
    value = str(v).strip("\x00 ")
    try:
        return check_uid(keyword, value)
    except InvalidInstanceError as exc:
        raise InvalidUIDError(str(exc)) from None


def meta_from_dataset(ds: Any, transfer_syntax_uid: str) -> InstanceMeta:
    """Build :class:`InstanceMeta` from a (possibly partial) pydicom dataset."""
    core = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    try:
        if not any(ds.get(k) for k in core):
            # Not one identifying attribute: garbage or a truncated stream, not a
            # dataset with a missing attribute.
            raise UndecodableError("no SOP Class/Instance, Study or Series UID could be decoded")
        study = _uid(ds, "StudyInstanceUID")
        series = _uid(ds, "SeriesInstanceUID")
        sop = _uid(ds, "SOPInstanceUID")
        sop_class = _uid(ds, "SOPClassUID")
        expected = _int(ds, "NumberOfSeriesRelatedInstances") or _int(ds, "ImagesInAcquisition")
        return InstanceMeta(
            study_uid=study,
            series_uid=series,
            sop_instance_uid=sop,
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(transfer_syntax_uid),
            instance_number=_int(ds, "InstanceNumber"),
            modality=_text(ds, "Modality", 16),
            series_description=_text(ds, "SeriesDescription", 64),
            series_number=_int(ds, "SeriesNumber"),
            patient_id=_text(ds, "PatientID", 64),
            patient_name=_text(ds, "PatientName", 324),
            study_date=_text(ds, "StudyDate", 8),
            accession_number=_text(ds, "AccessionNumber", 16),
            study_description=_text(ds, "StudyDescription", 64),
            expected_count=expected if expected and expected > 0 else None,
        )
    except InvalidInstanceError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed element values
        raise UndecodableError(f"cannot decode dataset: {type(exc).__name__}: {exc}") from None


_FAST_TS = {"1.2.840.10008.1.2": False}  # implicit VR LE; every other LE TS is explicit
_SLOW_TS = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated
_WANT = frozenset(int(t) for t in _TAGS) | {0x00080005}
_KEYWORDS = {int(t): dictionary_keyword(t) for t in _TAGS}


class _Raw(dict[str, str]):
    """Keyword -> decoded value, the subset of the Dataset API meta_from_dataset uses."""


def _decode(values: dict[int, bytes]) -> _Raw:
    charset = values.get(0x00080005, b"").decode("ascii", "replace").strip("\x00 ")
    encodings = convert_encodings([c.strip() for c in charset.split("\\")] if charset
                                  else ["ISO_IR 6"])
    out = _Raw()
    for tag, raw in values.items():
        kw = _KEYWORDS.get(tag)
        if kw is None:
            continue
        if kw in ("PatientName", "StudyDescription", "SeriesDescription"):
            out[kw] = decode_bytes(raw, encodings, set()).strip("\x00 ")
        else:
            out[kw] = raw.decode("ascii", "replace").strip("\x00 ")
    return out


def read_meta_fast(head: bytes, dataset: bytes | bytearray | memoryview,
                   transfer_syntax_uid: str) -> InstanceMeta:
    """Parse the dataset of a C-STORE (``dataset`` = bytes after the file meta).

    Little-endian streams are walked strictly by :mod:`dicomnode.codec.walker` (the whole
    top-level structure is checked); a stream that fails that walk for a reason
    other than truncation, and big-endian or deflated streams, are parsed by
    pydicom from the full Part 10 stream ``head + dataset``.
    """
    ts = str(transfer_syntax_uid)
    if ts not in _SLOW_TS:
        try:
            values = walker.walk(dataset, explicit=_FAST_TS.get(ts, True), want=_WANT)
        except walker.TruncatedError as exc:
            raise UndecodableError(f"cannot decode dataset: {exc}") from None
        except walker.StructureError:
            values = None  # e.g. implicit VR data on an explicit context: let pydicom try
        if values is not None:
            return meta_from_dataset(_decode(values), ts)
    return read_meta(bytes(head) + bytes(dataset))


def read_meta(source: bytes | Path | str) -> InstanceMeta:
    """Parse a DICOM Part 10 stream (bytes with preamble + file meta) or file."""
    try:
        fp: Any = BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)
        ds = dcmread(fp, stop_before_pixels=True, specific_tags=_TAGS)
        ts = ds.file_meta.get("TransferSyntaxUID", "") if getattr(ds, "file_meta", None) else ""
    except InvalidInstanceError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on garbage
        raise UndecodableError(f"cannot decode dataset: {type(exc).__name__}: {exc}") from None
    if not ts:
        raise UndecodableError("no Transfer Syntax UID in the file meta information")
    return meta_from_dataset(ds, str(ts))
