"""Saliency maps for classification models (returned with the result as an overlay).

* :func:`occlusion` works with any backend: the drop of the class score when
  a patch of the input is replaced by a baseline value, averaged over the
  patches covering each voxel.
* :func:`gradcam` (TorchScript backend) weights a feature layer's
  activations by the spatially averaged gradient of the class logit
  (Selvaraju et al., 2017), upsampled to the input grid.

Both return float32 maps on the network input grid, scaled to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dicomnode.errors import ModelError


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.maximum(a, 0.0).astype(np.float32)
    peak = float(a.max())
    return a / peak if peak > 0 else a


def occlusion(
    score: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    patch: Sequence[int],
    stride: Sequence[int] | None = None,
    baseline: float = 0.0,
    batch_size: int = 8,
) -> np.ndarray:
    """Occlusion sensitivity of ``score`` (batch -> class score per item) at ``x`` (1, C, ...)."""
    size = x.shape[2:]
    stride = tuple(stride) if stride else tuple(max(1, p // 2) for p in patch)
    starts = []
    for s, p, st in zip(size, patch, stride, strict=True):
        axis = list(range(0, max(1, s - p + 1), st))
        if s > p and axis[-1] != s - p:
            axis.append(s - p)  # the last patch flush with the far edge
        starts.append(axis)
    corners = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    reference = float(score(x)[0])
    acc = np.zeros(size, dtype=np.float32)
    hits = np.zeros(size, dtype=np.float32)
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        batch = np.repeat(x, len(chunk), axis=0)
        regions = []
        for j, (a, b, c) in enumerate(chunk):
            region = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
            batch[(j, slice(None), *region)] = baseline
            regions.append(region)
        drops = reference - np.asarray(score(batch), dtype=np.float32)
        for region, d in zip(regions, drops, strict=True):
            acc[region] += d
            hits[region] += 1.0
    return _unit(acc / np.maximum(hits, 1.0))


def _submodule(module: object, dotted: str) -> object:
    obj = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"Grad-CAM: the TorchScript module has no submodule {dotted!r}")
        obj = getattr(obj, part)
    return obj


def gradcam(backend: object, x: np.ndarray, class_index: int, layer: str, head: str) -> np.ndarray:
    """Grad-CAM for a TorchScript model split as ``head(layer(x))`` -> logits."""
    try:
        import torch  # optional dependency (the torch extra); 1.8 s to import
        import torch.nn.functional as F
    except ImportError as exc:
        raise ModelError("Grad-CAM needs torch (pip install 'dicomnode[torch]')") from exc
    module = getattr(backend, "module", None)
    if module is None:
        raise ModelError("Grad-CAM needs the torchscript backend")
    features = _submodule(module, layer)
    classifier = _submodule(module, head)
    inp = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    with torch.enable_grad():
        acts = features(inp)  # type: ignore[operator]
        acts = acts.detach().requires_grad_(True)
        logits = classifier(acts)  # type: ignore[operator]
        logits.reshape(logits.shape[0], -1)[0, class_index].backward()
    grads = acts.grad
    assert grads is not None
    weights = grads.mean(dim=tuple(range(2, grads.ndim)), keepdim=True)
    cam = torch.relu((weights * acts).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
    return _unit(cam[0, 0].numpy())
