"""Part 10 bytes: result objects exactly as pydicom writes them; received instances' file meta.

``ds.save_as(buf, enforce_file_format=True)`` spends most of its time in
pydicom's per-element machinery (ambiguous-VR correction per dataset,
character-set conversion per element, a scratch buffer per element), not in
encoding values. A 300-slice SEG has ~900 per-frame functional group items,
~20,000 elements: about 0.7 s of CPU in pydicom, ~0.15 s here.

:func:`to_part10` walks the dataset itself and frames elements (tag, VR,
length, sequence items and delimiters) for explicit VR little endian, the
transfer syntax of every object the node creates. Each *value* is still
encoded by pydicom's own writer function for its VR (numbers with ``struct``,
as pydicom does), so values come out identical; strings need no character
set work unless they are not ASCII, where pydicom's writer runs with the
dataset's encodings. Anything this module does not mirror exactly falls back
to pydicom for the whole object: another transfer syntax, an ambiguous VR
("US or SS"), a raw (undecoded) element, a buffered value, a value too long
for a 16-bit length.

General twin: ``Dataset.save_as(..., enforce_file_format=True)``;
``tests/integration/test_codec_part10.py`` proves the bytes equal for SEG, SR and SC
objects and every fallback.

:func:`part10_header` builds the preamble and file meta group the receiver writes in
front of a received dataset (twin: ``pydicom.filewriter.write_file_meta_info``; the
same bytes: ``test_received_file_meta_is_what_pydicom_writes`` in the same test file).
"""

from __future__ import annotations

import struct
from copy import deepcopy
from io import BytesIO
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    validate_file_meta,
    write_file_meta_info,
    write_number_string,
    write_string,
    write_text,
    write_UI,
    writers,
)
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR, CUSTOMIZABLE_CHARSET_VR, EXPLICIT_VR_LENGTH_32

from dicomnode.compat.pydicom import dataset_elements, is_multi_value

__all__ = ["IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION_NAME", "part10_header",
           "to_part10"]

_TAG = struct.Struct("<HH")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000)
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"  # (FFFE,E00D), length 0
_SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0
_NUMBERS = {"UL": "L", "US": "H", "SS": "h", "SL": "l", "FL": "f", "FD": "d",
            "SV": "q", "UV": "Q"}
_LONG_VRS = frozenset(str(v) for v in EXPLICIT_VR_LENGTH_32)
_TEXT_VRS = frozenset(str(v) for v in CUSTOMIZABLE_CHARSET_VR)
_AMBIGUOUS = frozenset(str(v) for v in AMBIGUOUS_VR)
# Python codecs (as pydicom names them) of single character sets in which an
# ASCII string encodes to itself: none, ISO_IR 6, Latin-1..9, UTF-8.
_ASCII_SAFE = frozenset({default_encoding, "iso8859", "latin_1", "iso_ir_6", "utf_8", "UTF8",
                         "iso8859_2", "iso8859_3", "iso8859_4", "iso8859_9", "iso8859_15"})


class _Fallback(Exception):
    """Something pydicom must write itself."""


def to_part10(ds: Dataset) -> bytes:
    """``ds`` as a DICOM Part 10 file (preamble, file meta, data set).

    The same bytes as ``ds.save_as(buffer, enforce_file_format=True)``.
    """
    ts = getattr(ds, "file_meta", FileMetaDataset()).get("TransferSyntaxUID")
    if ts != ExplicitVRLittleEndian:
        return _pydicom(ds)
    try:
        head = _header(ds)
        body = _Writer().dataset(ds, default_encoding)
    except _Fallback:
        return _pydicom(ds)
    return head + body


def _pydicom(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _header(ds: Dataset) -> bytes:
    """Preamble, ``DICM`` and the file meta group, as ``dcmwrite`` prepares them."""
    bad = [t >> 16 for t in dataset_elements(ds) if t >> 16 in (0, 2)]
    if bad:
        raise _Fallback  # pydicom raises the proper error
    meta = deepcopy(ds.file_meta)
    ds_class, ds_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    meta_class = meta.get("MediaStorageSOPClassUID")
    if meta_class is None or (ds_class and ds_class != meta_class):
        meta.MediaStorageSOPClassUID = ds_class
    meta_instance = meta.get("MediaStorageSOPInstanceUID")
    if meta_instance is None or (ds_instance and ds_instance != meta_instance):
        meta.MediaStorageSOPInstanceUID = ds_instance
    validate_file_meta(meta, enforce_standard=True)
    preamble = getattr(ds, "preamble", None) or b"\x00" * 128
    if len(preamble) != 128:
        raise _Fallback
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    fp.write(preamble)
    fp.write(b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


class _Writer:
    """Explicit VR little endian encoder mirroring ``pydicom.filewriter.write_dataset``."""

    def __init__(self) -> None:
        self._encodings: dict[Any, list[str]] = {}

    def _converted(self, encoding: Any) -> list[str]:
        """``convert_encodings`` as ``write_data_element`` calls it, once per value."""
        key = encoding if encoding is None or isinstance(encoding, str) else tuple(encoding)
        got = self._encodings.get(key)
        if got is None:
            got = convert_encodings(encoding or [default_encoding])
            self._encodings[key] = got
        return got

    def dataset(self, ds: Dataset, parent_encoding: Any) -> bytes:
        encoding = ds.get("SpecificCharacterSet", parent_encoding)
        out = []
        items = dataset_elements(ds)
        for tag in sorted(items):
            if (tag & 0xFFFF) == 0 and (tag >> 16) > 6:
                continue  # retired group lengths are not written
            elem = items[tag]
            if not isinstance(elem, DataElement):
                raise _Fallback  # raw element: pydicom decides how to re-encode it
            out.append(self.element(elem, encoding, ds))
        return b"".join(out)

    def element(self, elem: DataElement, encoding: Any, ds: Dataset) -> bytes:
        vr = elem.VR
        tag = elem.tag
        undefined = elem.is_undefined_length
        if vr in _AMBIGUOUS:
            vr = _pixel_data_vr(elem, ds)
        if vr is None or len(vr) != 2 or elem.is_buffered:
            raise _Fallback
        if tag == 0x7FE00010 and undefined:
            raise _Fallback  # encapsulated pixel data
        if elem.is_empty:
            value = b""
        elif vr == "SQ":
            value = b"".join(self.item(item, encoding) for item in elem.value)
        elif vr in _NUMBERS:
            value = _numbers(elem.value, _NUMBERS[vr])
        else:
            value = self.value(elem, vr, encoding)
        n = len(value)
        head = _TAG.pack(tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
        if vr in _LONG_VRS:
            head += b"\x00\x00" + _UL.pack(0xFFFFFFFF if undefined else n)
        elif undefined:
            raise _Fallback  # pydicom writes a 4-byte length here; not worth mirroring
        elif n > 0xFFFF:
            raise _Fallback  # pydicom turns the VR into UN with a warning
        else:
            head += _US.pack(n)
        return head + value + _SEQ_END if undefined else head + value

    def item(self, item: Dataset, encoding: Any) -> bytes:
        body = self.dataset(item, encoding)
        if getattr(item, "is_undefined_length_sequence_item", False):
            return _ITEM + b"\xff\xff\xff\xff" + body + _ITEM_END
        return _ITEM + _UL.pack(len(body)) + body

    def value(self, elem: DataElement, vr: str, encoding: Any) -> bytes:
        v = elem.value
        fn: Any
        fn, param = writers[vr]  # type: ignore[index]
        # The common cases, inline, exactly as the pydicom writer named beside each.
        if fn is write_UI or fn is write_string:  # single-byte ASCII text, padded
            if isinstance(v, str):
                pad = "\0" if fn is write_UI else " "
                return (v + pad if len(v) % 2 else v).encode(default_encoding)
        elif fn is write_number_string:  # DS / IS: the original string when there is one
            if not is_multi_value(v):
                text = v.original_string if hasattr(v, "original_string") else str(v)
                return (text + " " if len(text) % 2 else text).encode(default_encoding)
        elif fn is write_text and isinstance(v, str) and v.isascii() \
                and self._ascii_compatible(encoding):
            b = v.encode("ascii")  # what encode_string gives for ASCII in these character sets
            return b + b" " if len(b) % 2 else b
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = False, True
        if vr in _TEXT_VRS:
            fn(fp, elem, encodings=self._converted(encoding))
        elif param is not None:
            fn(fp, elem, param)
        else:
            fn(fp, elem)
        return fp.getvalue()

    def _ascii_compatible(self, encoding: Any) -> bool:
        """Does the data set's character set encode ASCII text as plain ASCII bytes?"""
        converted = self._converted(encoding)
        return len(converted) == 1 and converted[0] in _ASCII_SAFE


def _pixel_data_vr(elem: DataElement, ds: Dataset) -> str:
    """The VR pydicom's ``correct_ambiguous_vr`` gives native Pixel Data ("OB or OW",
    as highdicom leaves it); any other ambiguous VR is left to pydicom."""
    if elem.tag != 0x7FE00010 or elem.is_undefined_length:
        raise _Fallback
    if ds.original_encoding[0]:
        return "OW"  # read as implicit VR: always OW (PS3.5 A.1)
    bits = ds.get("BitsAllocated")
    if bits is None:
        raise _Fallback  # pydicom raises its own error
    return "OW" if int(bits) > 8 else "OB"


def _numbers(value: Any, fmt: str) -> bytes:
    """``pydicom.filewriter.write_numbers`` for little endian."""
    if value is None or value == "":
        return b""
    try:
        value.append  # noqa: B018 - pydicom's own test for a multi-valued number
    except AttributeError:
        try:
            return struct.pack("<" + fmt, value)
        except struct.error as exc:
            raise _Fallback from exc
    pack = struct.Struct("<" + fmt).pack
    try:
        return b"".join(pack(v) for v in value)
    except struct.error as exc:
        raise _Fallback from exc  # pydicom raises its own error for the value


# ------------------------------------------------------------ file meta of received instances

# Implementation Class UID of dicomnode (a UUID-derived 2.25 UID, fixed per implementation).
IMPLEMENTATION_CLASS_UID = "2.25.322196318574011516722073791765655486292"
IMPLEMENTATION_VERSION_NAME = "DICOMNODE_01"


def _meta_element(tag_elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB",):
        return (b"\x02\x00" + tag_elem.to_bytes(2, "little") + vr + b"\x00\x00"
                + len(value).to_bytes(4, "little") + value)
    return b"\x02\x00" + tag_elem.to_bytes(2, "little") + vr + len(value).to_bytes(2, "little") \
        + value


def _meta_pad(value: str, pad: bytes) -> bytes:
    b = value.encode("ascii")
    return b + pad if len(b) % 2 else b


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                  source_aet: str = "") -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group for a received dataset."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _meta_pad(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _meta_pad(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _meta_pad(transfer_syntax_uid, b"\x00")),
        _meta_element(0x0012, b"UI", _meta_pad(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _meta_pad(IMPLEMENTATION_VERSION_NAME, b" ")),
        *((_meta_element(0x0016, b"AE", _meta_pad(source_aet.strip(), b" ")),)
          if source_aet.strip() else ()),
    ))
    group_len = b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little")
    return b"\x00" * 128 + b"DICM" + group_len + body
