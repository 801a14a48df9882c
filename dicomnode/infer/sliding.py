"""Sliding-window inference with overlap blending, for volumes larger than the patch.

Patches are placed on a regular grid with step ``patch * (1 - overlap)``
(the last patch is aligned with the far edge), run in batches, and their
outputs summed with a weight map (Gaussian, sigma = patch / 8 as in nnU-Net,
or constant), then divided by the summed weights. A volume smaller than the
patch is padded (edge values) and the padding cropped from the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def patch_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets along one axis: regular steps, the last one flush with the end."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def blend_weights(patch: Sequence[int], mode: str = "gaussian") -> np.ndarray:
    """Weight map for one patch; strictly positive so every voxel is covered."""
    if mode == "constant":
        return np.ones(tuple(patch), dtype=np.float32)
    grids = []
    for n in patch:
        c = (n - 1) / 2.0
        sigma = max(n / 8.0, 1e-3)
        grids.append(np.exp(-0.5 * ((np.arange(n) - c) / sigma) ** 2))
    w = grids[0][:, None, None] * grids[1][None, :, None] * grids[2][None, None, :]
    w = w / w.max()
    # Keep a floor so that edge voxels (covered by one patch only) stay finite.
    return np.maximum(w, 1e-3).astype(np.float32)


def sliding_window(
    run: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    patch: Sequence[int],
    overlap: float = 0.25,
    batch_size: int = 1,
    blend: str = "gaussian",
) -> np.ndarray:
    """Run ``run`` ((N, C, *patch) -> (N, K, *patch)) over ``x`` (C, D, H, W).

    Returns the blended output (K, D, H, W), float32.
    """
    c, *size = x.shape
    pads = [(0, 0)] + [(0, max(0, p - s)) for s, p in zip(size, patch, strict=True)]
    padded = np.pad(x, pads, mode="edge") if any(p[1] for p in pads) else x
    full = padded.shape[1:]
    weights = blend_weights(patch, blend)
    starts = [patch_starts(s, p, overlap) for s, p in zip(full, patch, strict=True)]
    corners = [(a, b, d) for a in starts[0] for b in starts[1] for d in starts[2]]
    out: np.ndarray | None = None
    norm = np.zeros(full, dtype=np.float32)
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        batch = np.stack([
            padded[:, a:a + patch[0], b:b + patch[1], d:d + patch[2]] for a, b, d in chunk
        ]).astype(np.float32, copy=False)
        pred = np.asarray(run(batch), dtype=np.float32)
        if out is None:
            out = np.zeros((pred.shape[1], *full), dtype=np.float32)
        for (a, b, d), p in zip(chunk, pred, strict=True):
            region = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(d, d + patch[2]))
            out[(slice(None), *region)] += p * weights
            norm[region] += weights
    assert out is not None
    out /= norm
    return out[:, :size[0], :size[1], :size[2]]
