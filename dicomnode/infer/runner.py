"""One loaded model: pre-processing, inference, post-processing back to the source grid.

A :class:`ModelRunner` verifies the weights' SHA-256, creates its backend
sessions once, and is then reused for every volume (the registry keeps it).
"""

from __future__ import annotations

import time

import numpy as np

from dicomnode.domain import (
    ClassificationOutput,
    InferenceResult,
    SegmentationOutput,
    Volume,
)
from dicomnode.errors import ModelError
from dicomnode.infer import postprocess as post
from dicomnode.infer import saliency
from dicomnode.infer.backends import Backend, create_backend
from dicomnode.infer.manifest import Manifest
from dicomnode.infer.preprocess import (
    Reorientation,
    foreground_bbox,
    normalize,
    percentiles,
    reorientation,
    resample,
    resample_to_shape,
    resize_nearest,
)
from dicomnode.infer.sliding import sliding_window

Box = tuple[slice, slice, slice]


def _softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def localizer_box(mask_small: np.ndarray, full_shape: tuple[int, ...], margin: float,
                  occupancy: float = 0.02) -> Box:
    """Region to crop from a low-resolution localizer mask (deepbet's scheme).

    Along each axis the rows whose mean occupancy exceeds ``occupancy``
    define centre and size; both are scaled to ``full_shape``, the size grown
    by ``margin`` per side, rounded, and clipped to the volume.
    """
    m = mask_small.astype(np.float32)
    out = []
    for ax in range(3):
        other = tuple(i for i in range(3) if i != ax)
        hit = np.flatnonzero(m.mean(axis=other) > occupancy)
        if hit.size == 0:
            raise ModelError("localizer found no foreground: the region of interest is absent "
                             "(wrong body part or modality?)")
        scale = full_shape[ax] / m.shape[ax]
        center = np.float32((hit.max() + 1 + hit.min()) / 2) * np.float32(scale)
        size = np.float32(hit.max() + 1 - hit.min()) * np.float32(scale)
        size = np.float32(1 + 2 * margin) * size
        c, s = float(np.round(center)), float(np.round(size))
        lo, hi = int(c - s / 2), int(c + s / 2)
        out.append(slice(max(0, lo), min(full_shape[ax], hi)))
    return tuple(out)  # type: ignore[return-value]


class ModelRunner:
    """A model ready to run: weights verified, sessions created once."""

    def __init__(self, manifest: Manifest, threads: int = 0):
        self.manifest = manifest
        manifest.verify_weights()
        n_threads = threads or manifest.threads
        self.backend: Backend = create_backend(manifest.backend, manifest.weights_path("model"),
                                               n_threads)
        self.localizer: Backend | None = None
        if manifest.localizer is not None:
            self.localizer = create_backend(manifest.backend,
                                            manifest.folder / manifest.localizer.weights, n_threads)

    # ------------------------------------------------------------------ stages

    def prepare(self, volume: Volume) -> tuple[np.ndarray, dict[str, object]]:
        """Source volume -> network input (1, 1, D, H, W) float32, plus what undoes it."""
        m = self.manifest
        spec = m.input
        reo = reorientation(volume.affine, spec.orientation)
        x = reo.forward(volume.array)  # a view: no copy of the source volume
        spacing = reo.spacing(volume.spacing)
        stats_pct: tuple[float, float] | None = None
        box: Box = (slice(None), slice(None), slice(None))
        pct_steps = [s for s in spec.normalization if s.type == "percentile"]
        if m.localizer is not None and self.localizer is not None:
            small = np.ascontiguousarray(resize_nearest(x, m.localizer.shape), dtype=np.float32)
            if spec.statistics_from == "localizer" and pct_steps:
                p = pct_steps[0].params
                stats_pct = percentiles(small, p["low"], p["high"])
            small = normalize(small, spec.normalization, pct=stats_pct)
            prob = self.localizer.run(small[None, None])[0][0, m.localizer.channel]
            mask_small = post.largest_component(prob > m.localizer.threshold)
            box = localizer_box(mask_small, x.shape, m.localizer.margin)
        elif spec.crop_foreground is not None:
            fg = foreground_bbox(x, spec.crop_foreground, spec.crop_margin)
            if fg is None:
                raise ModelError(f"{m.name}: no voxel above {spec.crop_foreground} "
                                 "(input.crop_foreground): nothing to segment")
            box = fg
        crop = x[box]
        if spec.resize is not None:
            net = np.ascontiguousarray(resize_nearest(crop, spec.resize), dtype=np.float32)
        elif spec.spacing is not None:
            net = resample(np.ascontiguousarray(crop, dtype=np.float32), spacing, spec.spacing)
        else:
            net = np.array(crop, dtype=np.float32, order="C")  # normalise a copy, not the source
        net = normalize(net, spec.normalization, pct=stats_pct)
        ctx = {"reo": reo, "box": box, "crop_shape": crop.shape, "full_shape": x.shape}
        return net[None, None], ctx

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Network output (N, K, ...) for input (N, C, ...), sliding window when configured."""
        spec = self.manifest.input
        idx = self.manifest.output.output_index

        def run(batch: np.ndarray) -> np.ndarray:
            outs = self.backend.run(batch)
            if idx >= len(outs):
                raise ModelError(f"{self.manifest.name}: output.output_index {idx} but the "
                                 f"network has {len(outs)} output(s)")
            return outs[idx]

        if spec.patch_size is not None and self.manifest.output.task == "segmentation" and (
                any(s > p for s, p in zip(x.shape[2:], spec.patch_size, strict=True))):
            return sliding_window(run, x[0], spec.patch_size, spec.overlap, spec.batch_size,
                                  spec.blend)[None]
        return run(x)

    def _to_source(self, a: np.ndarray, ctx: dict[str, object], order: int) -> np.ndarray:
        """Network-grid maps (L, D', H', W') -> source grid (L, k, rows, cols)."""
        spec = self.manifest.input
        crop_shape = ctx["crop_shape"]
        assert isinstance(crop_shape, tuple)
        if a.shape[1:] != crop_shape:
            if spec.resize is not None or order == 0:
                a = resize_nearest(a, crop_shape)
            else:
                a = resample_to_shape(a, crop_shape, order=order)
        full = ctx["full_shape"]
        assert isinstance(full, tuple)
        canvas = np.zeros((a.shape[0], *full), dtype=a.dtype)
        box = ctx["box"]
        assert isinstance(box, tuple)
        canvas[(slice(None), *box)] = a
        reo = ctx["reo"]
        assert isinstance(reo, Reorientation)
        return np.ascontiguousarray(reo.inverse(canvas))

    # ------------------------------------------------------------------ run

    def run(self, volume: Volume) -> InferenceResult:
        """Run the model on ``volume``; masks / saliency come back on its grid."""
        m = self.manifest
        timings: dict[str, float] = {}
        t = time.perf_counter()
        x, ctx = self.prepare(volume)
        timings["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        out = self.infer(x)
        timings["inference"] = time.perf_counter() - t
        t = time.perf_counter()
        if m.output.task == "segmentation":
            result = self._segmentation(volume, out, ctx, timings)
        else:
            result = self._classification(volume, x, out, ctx, timings)
        timings["postprocess"] = time.perf_counter() - t
        return result

    def _label_maps(self, out: np.ndarray) -> tuple[np.ndarray, bool]:
        """Per-label maps on the network grid; (maps, already_binary)."""
        o = self.manifest.output
        n_ch = out.shape[1]
        for lab in o.labels:
            if o.activation != "labelmap" and lab.channel >= n_ch:
                raise ModelError(f"{self.manifest.name}: label {lab.spec.name!r} reads channel "
                                 f"{lab.channel} but the network returns {n_ch}")
        if o.activation == "labelmap":
            lm = out[0, 0]
            return np.stack([lm == lab.spec.value for lab in o.labels]), True
        if o.activation == "argmax":
            am = out[0].argmax(axis=0)
            return np.stack([am == lab.channel for lab in o.labels]), True
        if o.activation == "softmax":
            out = _softmax(out.astype(np.float32))
        elif o.activation == "sigmoid":
            out = _sigmoid(out.astype(np.float32))
        channels = [out[0, lab.channel] for lab in o.labels]  # views, no copy
        if out.dtype == np.bool_ or np.issubdtype(out.dtype, np.integer):
            return np.stack([c.astype(bool, copy=False) for c in channels]), True
        if self.manifest.input.spacing is None:
            # Threshold on the network grid straight from the output (a bool
            # copy, a quarter of the float maps): masks are resized back nearest.
            return np.stack([c > o.threshold for c in channels]), True
        return np.stack(channels).astype(np.float32, copy=False), False

    def _segmentation(self, volume: Volume, out: np.ndarray, ctx: dict[str, object],
                      timings: dict[str, float]) -> InferenceResult:
        m = self.manifest
        o = m.output
        maps, binary = self._label_maps(out)
        if binary:
            masks = self._to_source(maps, ctx, order=0)
        else:
            # Resampled models: probabilities are interpolated back, then
            # thresholded (smoother than thresholding on the coarse grid).
            masks = self._to_source(maps, ctx, order=1) > o.threshold
        del maps, out
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        index = {lab.spec.name: i for i, lab in enumerate(o.labels)}
        order = sorted(range(len(o.labels)),
                       key=lambda i: o.labels[i].postprocess.within is not None)
        for i in order:
            pp = o.labels[i].postprocess
            within = masks[index[pp.within]] if pp.within else None
            post.apply_postprocess(masks[i], pp, voxel_ml, within)
        specs = tuple(lab.spec for lab in o.labels)
        measurements = post.measure(m.measurements, specs, masks, volume.array, voxel_ml,
                                    volume.modality)
        return InferenceResult(
            model=m.info, volume=volume,
            segmentation=SegmentationOutput(labels=specs, masks=masks),
            measurements=measurements, timings=timings,
        )

    def _classification(self, volume: Volume, x: np.ndarray, out: np.ndarray,
                        ctx: dict[str, object], timings: dict[str, float]) -> InferenceResult:
        m = self.manifest
        o = m.output
        probs = self._class_probabilities(out)
        sal_maps: dict[int, np.ndarray] = {}
        if o.saliency.method != "none":
            t = time.perf_counter()
            for c in o.classes:
                if o.saliency.method == "occlusion":
                    def score(batch: np.ndarray, c: int = c.index) -> np.ndarray:
                        return self._class_probabilities(self.backend.run(batch)[o.output_index])[
                            :, c]
                    smap = saliency.occlusion(score, x, o.saliency.patch, o.saliency.stride,
                                              o.saliency.baseline, m.input.batch_size)
                else:
                    smap = saliency.gradcam(self.backend, x, c.index, o.saliency.layer or "",
                                            o.saliency.head or "")
                src = self._to_source(smap[None], ctx, order=1)[0]
                sal_maps[c.index] = np.clip(src, 0.0, 1.0).astype(np.float32)
            timings["saliency"] = time.perf_counter() - t
        outputs = tuple(
            ClassificationOutput(spec=c, probability=float(probs[0, c.index]),
                                 saliency=sal_maps.get(c.index))
            for c in o.classes
        )
        return InferenceResult(model=m.info, volume=volume, classifications=outputs,
                               timings=timings)

    def _class_probabilities(self, out: np.ndarray) -> np.ndarray:
        o = self.manifest.output
        out = np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1)
        n = out.shape[1]
        for c in o.classes:
            if c.index >= n:
                raise ModelError(f"{self.manifest.name}: class {c.name!r} index {c.index} but "
                                 f"the network returns {n} value(s)")
        if o.activation == "softmax":
            return _softmax(out)
        if o.activation == "sigmoid":
            return _sigmoid(out)
        return out

