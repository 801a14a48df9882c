"""Fast pixel path for stored bits < allocated bits (12-bit CT): same values as pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.codec.reader import read_fast
from dicomnode.infer import load_volume
from dicomnode.infer import volume as volmod
from tests.support.series import write_series


@pytest.mark.parametrize("signed", [False, True])
def test_unused_high_bits_are_ignored_like_pydicom(tmp_path: Path, signed: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(12 + signed)
    # 12-bit stored values; signed ones span -2048..2047, unsigned 0..4095.
    lo, hi = (-2048, 2048) if signed else (0, 4096)
    stored = rng.integers(lo, hi, (4, 9, 7))
    paths = write_series(np.zeros((4, 9, 7)), tmp_path / "s", rescale_slope=1.0,
                         rescale_intercept=-1024.0)
    dtype = np.int16 if signed else np.uint16
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = int(signed)
        # Garbage in the 4 unused high bits, as PS3.5 8.1.1 allows: a reader must ignore it.
        raw = (stored[k].astype(np.int64) & 0x0FFF) | (rng.integers(0, 16, (9, 7)) << 12)
        ds.PixelData = raw.astype(np.uint16).view(dtype).tobytes()
        ds.save_as(p)
    assert read_fast(paths[0]) is not None  # the fast path takes 12-bit data
    with monkeypatch.context() as m:
        def no_pydicom(*args: object, **kwargs: object) -> None:
            raise AssertionError("the fast path fell back to pydicom")
        m.setattr(volmod.pydicom, "dcmread", no_pydicom)
        fast = load_volume(paths)
    monkeypatch.setattr(volmod, "read_fast", lambda path, *_: None)
    slow = load_volume(paths)  # pydicom's decoder
    np.testing.assert_array_equal(fast.array, slow.array)
    # ... and the values are the stored 12-bit ones after the rescale, not the garbage
    # (compared as sorted multisets: the loader orders slices by position).
    np.testing.assert_array_equal(np.sort(fast.array.ravel()),
                                  np.sort((stored.ravel() - 1024).astype(np.float32)))


def test_pixel_data_found_when_not_last_and_when_padded(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pixel Data is taken as a view of the file's tail when it is the last element;
    trailing padding after it, or 8-bit data padded to even length, still load right."""
    arr = np.random.default_rng(3).integers(0, 200, (3, 5, 7)).astype(float)  # 35 px: odd
    paths = write_series(arr, tmp_path / "s", rescale_slope=1.0, rescale_intercept=0.0)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        if k == 0:  # 8 bits allocated: 35 bytes of pixels, padded to 36
            stored = np.asarray(ds.pixel_array, dtype=np.uint8).tobytes()
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelRepresentation = 0
            ds.PixelData = stored + b"\0"
        if k == 1:  # an element after Pixel Data
            ds.add_new(0xFFFCFFFC, "OB", b"\0" * 6)
        ds.save_as(p)
    for p in paths:
        assert read_fast(p) is not None
    fast = load_volume(paths)
    monkeypatch.setattr(volmod, "read_fast", lambda path, *_: None)
    slow = load_volume(paths)
    np.testing.assert_array_equal(fast.array, slow.array)
    np.testing.assert_array_equal(np.sort(fast.array.ravel()), np.sort(arr.ravel()))
