"""highdicom internals dicomnode relies on (written for highdicom 0.28.2).

* :func:`install_iod_cache` memoises ``highdicom._standard_utils.is_attribute_in_iod``
  process-wide (an explicit call: the encoders' warm-up and their first use).
* :func:`load_standard_tables` loads ``_standard_utils``' tables of the standard.
* :class:`Segmentation` overrides ``Segmentation._check_and_cast_pixel_array`` to
  decide SegmentsOverlap of stacked boolean masks one plane at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import highdicom.seg
import numpy as np
from highdicom import _standard_utils
from highdicom.volume import Volume

from dicomnode.compat import require

require("highdicom", "0.28.2")

__all__ = ["Segmentation", "install_iod_cache", "load_standard_tables", "stacked_overlap"]


def install_iod_cache() -> None:
    """Cache highdicom's "is this attribute in that IOD?" answers (idempotent).

    highdicom asks it once per source image (``is_multiframe_image``: 300
    calls for a 300-slice series), each a linear scan of the standard's
    module tables (~0.5 ms). The answer depends only on the keyword, the SOP
    class and the excluded paths, all looked up in static tables shipped with
    the pinned highdicom, so caching it changes nothing but the time. The
    callers inside the private module ``highdicom._standard_utils`` look the
    function up as a module global at call time, which is what we replace.
    The replacement carries ``_dicomnode_cached = True`` and the original as
    ``_dicomnode_original``.
    """
    su = _standard_utils
    original = su.is_attribute_in_iod
    if getattr(original, "_dicomnode_cached", False):
        return

    @lru_cache(maxsize=4096)
    def cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return bool(original(attribute, sop_class_uid,
                             list(exclude) if exclude is not None else None))

    def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                            exclude_path_elements: Sequence[str] | None = None) -> bool:
        return cached(str(attribute), str(sop_class_uid),
                      None if exclude_path_elements is None else tuple(exclude_path_elements))

    is_attribute_in_iod._dicomnode_cached = True  # type: ignore[attr-defined]
    is_attribute_in_iod._dicomnode_original = original  # type: ignore[attr-defined]
    is_attribute_in_iod.__doc__ = original.__doc__
    su.is_attribute_in_iod = is_attribute_in_iod


def load_standard_tables() -> None:
    """Load highdicom's tables of the standard now (JSON parsed on first use, ~0.4 s).

    ``get_sop_class_iod_map``, ``get_iod_module_map`` and
    ``get_module_attribute_map`` of ``highdicom._standard_utils`` are cached loaders;
    calling them once is what highdicom's first SEG / SR would do.
    """
    _standard_utils.get_sop_class_iod_map()
    _standard_utils.get_iod_module_map()
    _standard_utils.get_module_attribute_map()


class Segmentation(highdicom.seg.Segmentation):
    """highdicom's Segmentation with a slice-wise overlap check for stacked masks.

    For a 4D boolean array highdicom decides SegmentsOverlap in the private
    classmethod ``_check_and_cast_pixel_array`` with ``array.sum(axis=-1)``, an int64
    temporary of 8 bytes per voxel (630 MB for 300 x 512 x 512). We compute the same
    answer one plane at a time (:func:`stacked_overlap`). Everything else is
    highdicom's own code (the override returns exactly what it would; highdicom is
    pinned, and the SEG round-trip tests cover both answers).
    """

    @classmethod
    def _check_and_cast_pixel_array(
        cls, pixel_array: np.ndarray | Volume, segment_numbers: np.ndarray,
        segmentation_type: highdicom.seg.SegmentationTypeValues, dtype: type,
    ) -> tuple[np.ndarray | Volume, highdicom.seg.SegmentsOverlapValues]:
        if (isinstance(pixel_array, np.ndarray) and pixel_array.ndim == 4
                and pixel_array.dtype == np.bool_
                and segmentation_type == highdicom.seg.SegmentationTypeValues.BINARY
                and pixel_array.shape[-1] == len(segment_numbers)):
            overlap = stacked_overlap(pixel_array)
            return pixel_array, (highdicom.seg.SegmentsOverlapValues.YES if overlap
                                 else highdicom.seg.SegmentsOverlapValues.NO)
        return super()._check_and_cast_pixel_array(
            pixel_array, segment_numbers, segmentation_type, dtype)


def stacked_overlap(stacked: np.ndarray) -> bool:
    """Do segments of a ``(frames, rows, cols, segments)`` boolean array overlap?

    Works on the planes of the caller's ``(segments, frames, rows, cols)``
    layout (contiguous), one frame at a time, with a one-plane uint8 buffer.
    """
    planes = np.moveaxis(stacked, -1, 0)
    if planes.shape[0] < 2:
        return False
    acc = np.empty(planes.shape[2:], dtype=np.uint8)
    for k in range(planes.shape[1]):
        np.add.reduce(planes[:, k], axis=0, dtype=np.uint8, out=acc)
        if acc.max() > 1:
            return True
    return False
