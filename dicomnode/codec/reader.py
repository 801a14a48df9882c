"""The light reader of classic single-frame images: header and raw pixels without pydicom.

:func:`read_fast` reads an uncompressed little-endian Part 10 file (``DICM``, a file
meta group, implicit or explicit VR little endian) with :mod:`dicomnode.codec.walker`
into a :class:`FastDataset`: the few attributes :func:`dicomnode.infer.volume.load_volume`
reads, and Pixel Data as a view of the file's bytes. Tens of microseconds per file
instead of building a pydicom Dataset; anything else (multi-frame functional groups,
float pixels, other transfer syntaxes, files over 8 MiB, any parsing doubt) gives
``None`` and the loader reads the file with pydicom.

General twin: ``pydicom.dcmread``. The tests proving them equal load the same series
both ways (``read_fast`` patched to return ``None``) and compare the volumes:
``tests/integration/test_infer_volume.py`` (``test_fast_path_equals_pydicom_path``,
``test_implicit_vr_and_unusual_layouts``) and ``tests/integration/test_infer_volume_bits.py``
(unused high bits, signed data, Pixel Data not last or padded).
"""

from __future__ import annotations

import os
from pathlib import Path
from struct import unpack_from
from typing import Any

from dicomnode.codec import walker

__all__ = ["NATIVE_LE", "FastDataset", "FileBuffer", "read_fast"]

#: Transfer syntaxes whose Pixel Data bytes are the array: implicit / explicit VR LE.
NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})

# keyword -> (tag, kind): "s" text (backslash-separated values), "u" US, "f" DS/IS numbers
_FAST_TAGS: dict[str, tuple[int, str]] = {
    "SOPClassUID": (0x00080016, "s"), "SOPInstanceUID": (0x00080018, "s"),
    "ImageType": (0x00080008, "s"), "Modality": (0x00080060, "s"),
    "GantryDetectorTilt": (0x00181120, "f"), "EchoNumbers": (0x00180086, "f"),
    "AcquisitionNumber": (0x00200012, "f"), "TemporalPositionIdentifier": (0x00200100, "f"),
    "StudyInstanceUID": (0x0020000D, "s"), "SeriesInstanceUID": (0x0020000E, "s"),
    "ImagePositionPatient": (0x00200032, "f"), "ImageOrientationPatient": (0x00200037, "f"),
    "FrameOfReferenceUID": (0x00200052, "s"),
    "SamplesPerPixel": (0x00280002, "u"), "PhotometricInterpretation": (0x00280004, "s"),
    "NumberOfFrames": (0x00280008, "f"), "Rows": (0x00280010, "u"), "Columns": (0x00280011, "u"),
    "PixelSpacing": (0x00280030, "f"), "BitsAllocated": (0x00280100, "u"),
    "BitsStored": (0x00280101, "u"), "PixelRepresentation": (0x00280103, "u"),
    "RescaleIntercept": (0x00281052, "f"), "RescaleSlope": (0x00281053, "f"),
    "PixelData": (0x7FE00010, "b"),
}
_FAST_FALLBACK = frozenset({0x52009229, 0x52009230, 0x7FE00008, 0x7FE00009})  # -> pydicom
_WANT = frozenset(t for t, _ in _FAST_TAGS.values()) | _FAST_FALLBACK
_WANT_HEADER = _WANT - {0x7FE00010}  # pixels: a view of the file's bytes, not a copy
_FAST_MAX_BYTES = 8 << 20  # a 2048 x 2048 16-bit slice is 8 MiB


class FastDataset:
    """The few attributes the loader reads, read by :mod:`dicomnode.codec.walker`.

    Used for classic single-frame, uncompressed little-endian files (the
    common case): tens of microseconds per file instead of building a pydicom
    Dataset. Anything else (multi-frame functional groups, float pixels,
    other transfer syntaxes, any parsing doubt) goes to pydicom.
    """

    def __init__(self, values: dict[int, bytes | memoryview], transfer_syntax: str):
        self._v = values
        self.file_meta = {"TransferSyntaxUID": transfer_syntax}

    def _decode(self, keyword: str) -> Any:
        tag, kind = _FAST_TAGS[keyword]
        raw = self._v.get(tag)
        if raw is None:
            return None
        if kind == "b":
            return raw
        if kind == "u":
            return unpack_from("<H", raw)[0] if len(raw) >= 2 else None
        text = bytes(raw).decode("latin-1").strip("\0 ")
        if not text:
            return None
        parts = [p.strip() for p in text.split("\\")]
        if kind == "f":
            nums = [float(p) for p in parts]
            return nums if len(nums) > 1 or keyword in ("PixelSpacing", "ImagePositionPatient",
                                                         "ImageOrientationPatient") else nums[0]
        if keyword == "ImageType":
            return parts
        return parts[0]

    def get(self, keyword: str, default: Any = None) -> Any:
        if keyword not in _FAST_TAGS:
            return default
        v = self._decode(keyword)
        return default if v is None else v

    def __contains__(self, keyword: str) -> bool:
        return keyword in _FAST_TAGS and _FAST_TAGS[keyword][0] in self._v

    def __getattr__(self, keyword: str) -> Any:
        if keyword.startswith("_") or keyword not in _FAST_TAGS:
            raise AttributeError(keyword)
        v = self._decode(keyword)
        if v is None:
            raise AttributeError(keyword)
        return v


class FileBuffer:
    """One buffer reused for every file of a series.

    Reading each slice into a fresh ``bytes`` object makes the first series a
    worker loads grow its heap by the whole series (157 MB of 4 KiB page faults
    for 300 CT slices, kept until the volume is assembled); reading into one
    buffer, whose pixels are placed into the volume before the next file is
    read, touches the same half megabyte 300 times.
    """

    def __init__(self) -> None:
        self._buf = bytearray(0)

    def read(self, path: Path) -> memoryview | None:
        """The file's bytes (valid until the next call), or None when too big."""
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size > _FAST_MAX_BYTES:
                return None  # big files are multi-frame or compressed: pydicom reads them lazily
            if size > len(self._buf):
                # A new buffer, never a resize: views of the old one may still exist.
                self._buf = bytearray(max(size, 2 * len(self._buf)))
            view = memoryview(self._buf)
            n = 0
            while n < size:
                got = f.readinto(view[n:size])
                if not got:
                    break  # the file shrank while being read: parse what is there
                n += got
        return view[:n]


def read_fast(path: Path, buffer: FileBuffer | None = None) -> FastDataset | None:
    """Header and raw pixels without pydicom, or None when pydicom must decide.

    With ``buffer`` the pixel data is a view of the buffer, valid until the
    buffer reads the next file.
    """
    try:
        data = (buffer or FileBuffer()).read(path)
        if data is None:
            return None
        if bytes(data[128:132]) != b"DICM" or bytes(data[132:136]) != b"\x02\x00\x00\x00":
            return None
        if bytes(data[136:138]) != b"UL":
            return None
        meta_end = 144 + unpack_from("<I", data, 140)[0]
        meta = walker.walk(data[144:meta_end], explicit=True,
                              want=frozenset({0x00020010}))
        ts = meta.get(0x00020010, b"").decode("ascii", "replace").strip("\0 ")
        if ts not in NATIVE_LE:
            return None
        explicit = ts != "1.2.840.10008.1.2"
        body = data[meta_end:]
        values: dict[int, bytes | memoryview] = dict(
            walker.walk(body, explicit=explicit, want=_WANT_HEADER))
        if any(t in values for t in _FAST_FALLBACK):
            return None
        pixels: bytes | memoryview | None = _trailing_pixel_data(body, values, explicit)
        if pixels is None:  # not the last element, or an unexpected length: walk for it
            pixels = walker.walk(body, explicit=explicit,
                                    want=frozenset({0x7FE00010})).get(0x7FE00010)
            if pixels is None:
                return None
        values[0x7FE00010] = pixels
    except (OSError, ValueError, IndexError, walker.StructureError):
        return None
    return FastDataset(values, ts)


def _trailing_pixel_data(body: memoryview, values: dict[int, Any],
                         explicit: bool) -> memoryview | None:
    """Pixel Data as a view of the file's bytes when it is the last element (the usual
    case), found from its expected length: no copy of a slice's pixels."""
    try:
        rows = unpack_from("<H", values[0x00280010])[0]
        cols = unpack_from("<H", values[0x00280011])[0]
        bits = unpack_from("<H", values[0x00280100])[0]
        frames_text = values.get(0x00280008, b"1").decode("latin-1").strip("\0 ") or "1"
        n = rows * cols * int(frames_text) * bits // 8
    except Exception:  # noqa: BLE001 - any doubt: the walker looks for it instead
        return None
    if bits not in (8, 16) or n <= 0:
        return None
    length = n + (n & 1)  # odd 8-bit values are padded to an even length
    head = 12 if explicit else 8
    start = len(body) - length
    if start - head < 0:
        return None
    hdr = bytes(body[start - head:start])
    if explicit:
        ok = (hdr[:4] == b"\xe0\x7f\x10\x00" and hdr[4:6] in (b"OW", b"OB")
              and hdr[6:8] == b"\x00\x00" and unpack_from("<I", hdr, 8)[0] == length)
    else:
        ok = hdr[:4] == b"\xe0\x7f\x10\x00" and unpack_from("<I", hdr, 4)[0] == length
    return body[start:] if ok else None
