"""Secondary-capture helpers: patient orientation letters, slice selection, windowing."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.encode.sc import _orientation_letters, _select
from tests.support.series import AXIAL, CORONAL, SAGITTAL, affine_for, oblique


def test_orientation_letters_follow_rows_and_columns() -> None:
    # Patient Orientation: direction of increasing column, then of increasing row (LPS -> L P H).
    assert _orientation_letters(affine_for(AXIAL, (1, 1, 1), (0, 0, 0))) == ("L", "P")
    assert _orientation_letters(affine_for(CORONAL, (1, 1, 1), (0, 0, 0))) == ("L", "F")
    assert _orientation_letters(affine_for(SAGITTAL, (1, 1, 1), (0, 0, 0))) == ("P", "F")
    assert _orientation_letters(affine_for(oblique(20), (1, 1, 1), (0, 0, 0))) == ("L", "P")
    flipped = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    assert _orientation_letters(affine_for(flipped, (1, 1, 1), (0, 0, 0))) == ("R", "A")


def test_select_spreads_evenly_and_keeps_all_when_few() -> None:
    assert _select(np.array([3, 4, 5]), 16) == [3, 4, 5]
    picked = _select(np.arange(100, 200), 5)
    assert picked == [100, 125, 150, 174, 199]
    assert _select(np.arange(10), 1) == [0]


def test_ct_window_comes_from_the_source_header() -> None:
    from dataclasses import dataclass

    from dicomnode.encode.sc import _window

    @dataclass
    class _Vol:
        modality: str
        array: np.ndarray

    @dataclass
    class _Res:
        volume: _Vol

    src = Dataset()
    src.WindowCenter = [300, 40]  # first window of a multi-valued pair (bone, soft tissue)
    src.WindowWidth = [1500, 400]
    ct = _Res(_Vol("CT", np.zeros((2, 2, 2), np.float32)))
    assert _window(ct, src) == (-450.0, 1050.0)  # type: ignore[arg-type]
    assert _window(ct, Dataset()) == (-160.0, 240.0)  # type: ignore[arg-type]  # soft tissue
    mr = _Res(_Vol("MR", np.arange(1000, dtype=np.float32).reshape(10, 10, 10)))
    lo, hi = _window(mr, src)  # type: ignore[arg-type]
    assert 0 <= lo < 10 and 990 < hi <= 999
