"""A strict, fast walker over little-endian DICOM datasets (explicit and implicit VR).

It checks the top-level structure of the whole dataset (every element's
length fits, nested sequences and items close, the last element ends exactly
at the end of the stream) and extracts the few header attributes the store
needs, without building pydicom objects: receiving a CT slice costs tens of
microseconds here instead of milliseconds. Big-endian and deflated streams
are left to pydicom (:mod:`dicomnode.store.parse`).

General twin: ``pydicom.dcmread`` (:func:`dicomnode.store.parse.read_meta`). The tests
proving them equal: ``tests/unit/test_store_files.py``
(``test_fast_walker_agrees_with_pydicom_on_test_files``: the same metadata from both
paths for every little-endian file of pydicom's test data, the same refusals of
malformed streams; ``test_truncated_dataset_is_undecodable``).
"""

from __future__ import annotations

from struct import unpack_from

from dicomnode.errors import InvalidInstanceError

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF


class StructureError(InvalidInstanceError):
    """The byte stream is not a well-formed dataset as walked (maybe another encoding)."""


class TruncatedError(StructureError):
    """An element or item runs past the end of the data: corrupt whatever the encoding."""


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    __slots__ = ("buf", "explicit", "want", "out", "depth")

    def __init__(self, buf: bytes | bytearray | memoryview, explicit: bool,
                 want: frozenset[int]) -> None:
        self.buf = buf
        self.explicit = explicit
        self.want = want
        self.out: dict[int, bytes] = {}
        self.depth = 0

    def header(self, pos: int, end: int) -> tuple[int, int, int, bytes | None]:
        """Return ``(tag, value length, value start, vr)`` of the element at ``pos``."""
        if pos + 8 > end:
            raise TruncatedError(f"truncated element header at byte {pos}")
        g, e = unpack_from("<HH", self.buf, pos)
        tag = (g << 16) | e
        if g == 0xFFFE:  # item / delimiters: always implicit layout
            return tag, unpack_from("<I", self.buf, pos + 4)[0], pos + 8, None
        if self.explicit:
            vr = bytes(self.buf[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise TruncatedError(f"truncated element header {_tag_str(tag)}")
                return tag, unpack_from("<I", self.buf, pos + 8)[0], pos + 12, vr
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise StructureError(f"element {_tag_str(tag)} at byte {pos}: invalid VR {vr!r}")
            return tag, unpack_from("<H", self.buf, pos + 6)[0], pos + 8, vr
        return tag, unpack_from("<I", self.buf, pos + 4)[0], pos + 8, None

    def dataset(self, pos: int, end: int, *, top: bool, in_item: bool = False) -> int:
        """Walk elements from ``pos``; return the position after the last one."""
        last = -1
        while pos < end:
            tag, length, vpos, vr = self.header(pos, end)
            if in_item and tag == ITEM_END:
                return vpos
            if tag >> 16 == 0xFFFE:
                raise StructureError(f"unexpected delimiter {_tag_str(tag)} at byte {pos}")
            if tag <= last and top:
                raise StructureError(f"element {_tag_str(tag)} out of order at byte {pos}")
            last = tag
            if length == UNDEFINED:
                if self.explicit and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                    raise StructureError(
                        f"element {_tag_str(tag)}: undefined length with VR {vr!r}")
                pos = self.sequence(vpos, end)
                continue
            nxt = vpos + length
            if nxt > end:
                raise TruncatedError(f"element {_tag_str(tag)} length {length} runs past the end "
                                     f"of the data ({end - vpos} bytes left)")
            if top and tag in self.want:
                self.out[tag] = bytes(self.buf[vpos:nxt])
            pos = nxt
        if in_item:
            raise StructureError("item without an item delimiter")
        return pos

    def sequence(self, pos: int, end: int) -> int:
        """Skip an undefined-length sequence (or encapsulated pixel data)."""
        self.depth += 1
        if self.depth > 64:
            raise StructureError("sequences nested more than 64 deep")
        while True:
            tag, length, vpos, _ = self.header(pos, end)
            if tag == SEQ_END:
                self.depth -= 1
                return vpos
            if tag != ITEM:
                raise StructureError(f"expected an item in a sequence at byte {pos}, "
                                     f"found {_tag_str(tag)}")
            if length == UNDEFINED:
                pos = self.dataset(vpos, end, top=False, in_item=True)
            else:
                if vpos + length > end:
                    raise TruncatedError(f"item at byte {pos} runs past the end of the data")
                pos = vpos + length


def walk(buf: bytes | bytearray | memoryview, *, explicit: bool,
         want: frozenset[int]) -> dict[int, bytes]:
    """Validate the dataset in ``buf``; return raw values of the ``want`` top-level tags."""
    w = _Walker(buf, explicit, want)
    end = len(buf)
    stop = w.dataset(0, end, top=True)
    if stop != end:  # pragma: no cover - dataset() consumes to end or raises
        raise StructureError("trailing bytes after the last element")
    return w.out
