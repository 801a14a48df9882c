"""Loading into a reused VolumeBuffer: same volumes, slices permuted in place, mixed files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.errors import VolumeError
from dicomnode.infer import VolumeBuffer, load_volume
from dicomnode.infer.volume import _permute_slices
from tests.support.infer_data import SeriesFixture
from tests.support.series import write_series


@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled"])
def test_buffer_loads_exactly_in_any_file_order(cranium_ct: SeriesFixture, order: str) -> None:
    paths = list(cranium_ct.paths)
    if order == "reversed":
        paths.reverse()
    elif order == "shuffled":
        random.Random(11).shuffle(paths)
    buf = VolumeBuffer()
    v = load_volume(paths, buffer=buf)
    np.testing.assert_array_equal(v.array, cranium_ct.array)
    np.testing.assert_allclose(v.affine, cranium_ct.affine, atol=1e-4)
    plain = load_volume(paths)  # no buffer: the same volume and slice mapping
    np.testing.assert_array_equal(v.array, plain.array)
    assert v.frames == plain.frames and v.paths == plain.paths


def test_buffer_memory_is_reused_and_grows(cranium_ct: SeriesFixture, tmp_path: Path) -> None:
    buf = VolumeBuffer()
    small = write_series(np.arange(4 * 6 * 5, dtype=float).reshape(4, 6, 5), tmp_path / "s")
    a = load_volume(small, buffer=buf)
    assert buf.nbytes == a.array.nbytes
    big = load_volume(cranium_ct.paths, buffer=buf)  # larger: a new, larger buffer
    assert buf.nbytes == big.array.nbytes
    np.testing.assert_array_equal(big.array, cranium_ct.array)
    again = load_volume(small, buffer=buf)  # smaller: a view of the same memory
    assert np.shares_memory(again.array, big.array)
    np.testing.assert_array_equal(again.array, np.arange(120, dtype=np.float32).reshape(4, 6, 5))


def test_prefault_reserves_and_a_smaller_request_keeps_it() -> None:
    buf = VolumeBuffer()
    buf.prefault(4 << 20)
    assert buf.nbytes == 4 << 20
    buf.prefault(1 << 20)
    assert buf.nbytes == 4 << 20
    arr = buf.array((3, 7, 11))
    assert arr.shape == (3, 7, 11) and arr.dtype == np.float32
    assert buf.nbytes == 4 << 20


def test_series_mixing_multiframe_and_single_frame_files(tmp_path: Path) -> None:
    """A multi-frame instance beside single-frame ones (same series and frame of
    reference): its frames are decoded apart, the single frames placed directly."""
    arr = np.random.default_rng(2).integers(-1000, 1000, (8, 6, 5)).astype(float)
    common = dict(study_uid="1.2.826.0.1.3680043.10.1234.9.1",
                  series_uid="1.2.826.0.1.3680043.10.1234.9.1.1",
                  frame_of_reference_uid="1.2.826.0.1.3680043.10.1234.9.1.0",
                  spacing=(2.0, 1.0, 1.0))
    mf = write_series(arr[:4], tmp_path / "mf", enhanced=True, **common)  # type: ignore[arg-type]
    sf = write_series(arr[4:], tmp_path / "sf", origin=(0.0, 0.0, 8.0), **common)  # type: ignore[arg-type]
    assert len(mf) == 1
    ds = pydicom.dcmread(mf[0])  # the converter gives the multi-frame its own series
    ds.SeriesInstanceUID = common["series_uid"]
    ds.save_as(mf[0])
    for files in (sf[::-1] + mf, mf + sf):
        for buf in (None, VolumeBuffer()):
            v = load_volume(files, buffer=buf)
            np.testing.assert_array_equal(v.array, arr.astype(np.float32))
            numbers = [f.frame_number for f in v.frames]
            assert sorted(numbers[:4]) == [1, 2, 3, 4] and numbers[4:] == [None] * 4


def test_refusals_still_name_the_problem_with_a_buffer(tmp_path: Path) -> None:
    arr = np.zeros((5, 4, 4))
    paths = write_series(arr, tmp_path / "s")
    with pytest.raises(VolumeError, match="missing slices"):
        load_volume(paths[:2] + paths[3:], buffer=VolumeBuffer())


@pytest.mark.parametrize("seed", range(5))
def test_permute_slices_matches_fancy_indexing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    vol = rng.normal(size=(9, 3, 2)).astype(np.float32)
    src = list(rng.permutation(9))
    expected = vol[src].copy()
    _permute_slices(vol, src)
    np.testing.assert_array_equal(vol, expected)
