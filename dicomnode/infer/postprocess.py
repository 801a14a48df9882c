"""Post-processing of masks on the source grid, and measurements.

Operations run on the bounding box of the mask (a crop, not a copy of the
whole volume), which is exact for connected components and hole filling
(background touching the box border touches the outside) and much cheaper
for small structures in large volumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from dicomnode.domain import LabelSpec, Measurement
from dicomnode.infer.manifest import MeasurementSpec, PostProcess

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as deepbet's cc3d default


def bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of a boolean mask (None when empty)."""
    out = []
    for ax in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return None
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component (in place; returns ``mask``)."""
    box = bbox(mask)
    if box is None:
        return mask
    sub = mask[box]
    labels, n = ndimage.label(sub, structure=_FULL)
    if n > 1:
        counts = np.bincount(labels.ravel())
        counts[0] = 0
        sub[...] = labels == int(counts.argmax())
    return mask


def remove_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 26-connected components smaller than ``min_voxels`` (in place)."""
    box = bbox(mask)
    if box is None or min_voxels <= 1:
        return mask
    sub = mask[box]
    labels, n = ndimage.label(sub, structure=_FULL)
    if n:
        counts = np.bincount(labels.ravel())
        keep = counts >= min_voxels
        keep[0] = False
        sub[...] = keep[labels]
    return mask


def fill_holes(mask: np.ndarray, mode: str) -> np.ndarray:
    """Fill enclosed background: "3d", or "2d" slice by slice along k (in place).

    "2d" suits the body outline on axial CT: lungs and airways are enclosed in
    each slice but open to the outside through the airway in 3D.
    """
    box = bbox(mask)
    if box is None or mode == "none":
        return mask
    # One labelling of the background (within the box grown by one voxel, so
    # the outside is one connected frame): every background component not
    # touching the frame is a hole. For "2d" the structure connects voxels
    # only within a slice, which labels all slices in one call.
    sub = np.pad(mask[box], 1, constant_values=False)
    if mode == "2d":
        sub[0] = sub[-1] = True  # the padding slices are not part of any slice's outside
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)
    else:
        structure = ndimage.generate_binary_structure(3, 1)
    labels, n = ndimage.label(~sub, structure=structure)
    if n:
        border = np.zeros(n + 1, bool)
        for face in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1],
                     labels[0], labels[-1]):
            border[np.unique(face)] = True
        border[0] = True  # label 0 is the foreground itself
        sub |= ~border[labels]
    mask[box] = sub[1:-1, 1:-1, 1:-1]
    return mask


def apply_postprocess(mask: np.ndarray, pp: PostProcess, voxel_ml: float,
                      within: np.ndarray | None = None) -> np.ndarray:
    """Apply one label's post-processing, in manifest order of operations."""
    if within is not None:
        mask &= within
    if pp.largest_component:
        largest_component(mask)
    if pp.fill_holes != "none":
        fill_holes(mask, pp.fill_holes)
    if pp.min_size_ml > 0:
        remove_small(mask, int(np.ceil(pp.min_size_ml / voxel_ml)))
    return mask


def measure(
    specs: Sequence[MeasurementSpec],
    labels: Sequence[LabelSpec],
    masks: np.ndarray,
    image: np.ndarray,
    voxel_ml: float,
    modality: str,
) -> tuple[Measurement, ...]:
    """Volume (mL) and intensity statistics per label, as the manifest asks."""
    unit = "[hnsf'U]" if modality.upper() == "CT" else "1"
    out: list[Measurement] = []
    gathered: dict[int, np.ndarray | None] = {}  # label index -> its voxels' values, once

    def values(i: int) -> np.ndarray | None:
        if i not in gathered:
            box = bbox(masks[i])
            gathered[i] = None if box is None else image[box][masks[i][box]]
        return gathered[i]

    for spec in specs:
        wanted = spec.labels or tuple(lab.value for lab in labels)
        for i, lab in enumerate(labels):
            if lab.value not in wanted:
                continue
            m = masks[i]
            if spec.name == "volume":
                out.append(Measurement("volume", float(np.count_nonzero(m)) * voxel_ml, "ml",
                                       lab.value))
                continue
            vals = values(i)
            if vals is None:
                continue  # no voxels: no intensity statistic (volume 0 is reported)
            value = {
                "mean": lambda v: float(np.mean(v, dtype=np.float64)),
                "min": lambda v: float(v.min()),
                "max": lambda v: float(v.max()),
                "std": lambda v: float(np.std(v, dtype=np.float64)),
            }[spec.name](vals)
            out.append(Measurement(spec.name, value, unit, lab.value))  # type: ignore[arg-type]
    return tuple(out)
