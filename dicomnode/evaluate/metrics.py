"""Agreement metrics between a model's results and reference results.

Pure functions on numpy arrays: no I/O, no model. Libraries used where they
exist: :mod:`scipy.ndimage` for surfaces and Euclidean distance transforms (in
physical spacing), scikit-learn for the confusion matrix, precision / recall /
F1 and the ROC curve / AUC.

Conventions (documented in docs/models.md, "Evaluating a model"):

* Masks are boolean arrays ``[k, row, column]`` on one grid; ``spacing`` is the
  voxel size in mm along those axes.
* The **surface** of a mask is its voxels with at least one face neighbour
  (6-connectivity) outside the mask; voxels beyond the array border count as
  outside. Distances are measured between surface voxel centres.
* **HD95** is the larger of the two directed 95th percentiles (prediction to
  reference, reference to prediction; numpy's linear interpolation), as in
  MONAI and DeepMind's ``surface-distance``. **Mean surface distance** is the
  symmetric average: the mean of both directed distance sets together (ASSD).
* Both masks empty: Dice 1, distances 0 (perfect agreement on absence). One
  empty, the other not: Dice 0, distances undefined (``None``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

_FACES = ndimage.generate_binary_structure(3, 1)


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {ref.shape}")
    return pred, ref


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient 2|A & B| / (|A| + |B|); 1.0 when both are empty."""
    pred, ref = _check_pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Border voxels of ``mask``: in the mask, with a face neighbour outside (or off the array)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"surface: a 3D mask is needed, got {mask.ndim}D")
    eroded = ndimage.binary_erosion(mask, structure=_FACES, border_value=0)
    return mask & ~eroded


def directed_surface_distances(from_mask: np.ndarray, to_mask: np.ndarray,
                               spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) from every surface voxel of ``from_mask`` to the surface of ``to_mask``."""
    s_from, s_to = surface(from_mask), surface(to_mask)
    if not s_to.any():
        raise ValueError("to_mask is empty")
    # EDT of the complement: at each voxel, the distance to the nearest surface voxel of to_mask.
    dist = ndimage.distance_transform_edt(~s_to, sampling=tuple(float(s) for s in spacing))
    return np.asarray(dist[s_from], dtype=float)


@dataclass(frozen=True)
class SurfaceDistances:
    hd95_mm: float | None
    hausdorff_mm: float | None  # the maximum (HD100), for reference
    mean_surface_distance_mm: float | None


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> SurfaceDistances:
    """HD95, Hausdorff (max) and mean surface distance in mm (see the module docstring)."""
    pred, ref = _check_pair(pred, ref)
    if len(spacing) != 3 or any(not (s > 0) for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, got {tuple(spacing)}")
    p_any, r_any = bool(pred.any()), bool(ref.any())
    if not p_any and not r_any:
        return SurfaceDistances(0.0, 0.0, 0.0)
    if not p_any or not r_any:
        return SurfaceDistances(None, None, None)
    d_pr = directed_surface_distances(pred, ref, spacing)
    d_rp = directed_surface_distances(ref, pred, spacing)
    hd95 = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    hd = max(float(d_pr.max()), float(d_rp.max()))
    msd = float((d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size))
    return SurfaceDistances(hd95, hd, msd)


@dataclass(frozen=True)
class SegmentationMetrics:
    """One label of one case."""

    dice: float
    hd95_mm: float | None
    hausdorff_mm: float | None
    mean_surface_distance_mm: float | None
    volume_ml: float  # the model's
    reference_volume_ml: float
    volume_difference_ml: float  # model - reference
    volume_difference_percent: float | None  # 100 * (model - reference) / reference
    voxels: int
    reference_voxels: int

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mL (spacing in mm; 1 mL = 1000 mm^3)."""
    return float(np.prod([float(s) for s in spacing])) / 1000.0


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray,
                         spacing: Sequence[float]) -> SegmentationMetrics:
    """Every segmentation metric for one label: Dice, HD95, MSD, volumes."""
    pred, ref = _check_pair(pred, ref)
    sd = surface_distances(pred, ref, spacing)
    voxel_ml = voxel_volume_ml(spacing)
    n_p, n_r = int(pred.sum()), int(ref.sum())
    v_p, v_r = n_p * voxel_ml, n_r * voxel_ml
    return SegmentationMetrics(
        dice=dice(pred, ref), hd95_mm=sd.hd95_mm, hausdorff_mm=sd.hausdorff_mm,
        mean_surface_distance_mm=sd.mean_surface_distance_mm,
        volume_ml=v_p, reference_volume_ml=v_r, volume_difference_ml=v_p - v_r,
        volume_difference_percent=(100.0 * (v_p - v_r) / v_r) if n_r else None,
        voxels=n_p, reference_voxels=n_r)


# --------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class ThresholdPoint:
    threshold: float
    sensitivity: float
    specificity: float


@dataclass(frozen=True)
class ClassificationMetrics:
    """Binary metrics of one class over all cases, at the model's threshold."""

    n: int
    positives: int
    negatives: int
    threshold: float
    accuracy: float
    precision: float
    recall: float  # = sensitivity
    sensitivity: float
    specificity: float | None  # None without reference negatives
    f1: float
    confusion: list[list[int]]  # [[TN, FP], [FN, TP]], rows = reference, columns = model
    roc_auc: float | None  # None unless both classes are present in the reference
    roc: list[ThresholdPoint]  # the threshold sweep (scikit-learn's roc_curve points)
    best_threshold: float | None  # Youden's J = sensitivity + specificity - 1 at its maximum

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["roc"] = [{"threshold": _finite(p.threshold), "sensitivity": p.sensitivity,
                     "specificity": p.specificity} for p in self.roc]
        return d


def _finite(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def classification_metrics(truth: Sequence[int | bool], probability: Sequence[float],
                           threshold: float = 0.5) -> ClassificationMetrics:
    """Accuracy, precision, recall, specificity, F1, confusion, ROC / AUC of one class.

    ``truth``: 1 where the reference says positive; ``probability``: the model's.
    A case is called positive when ``probability >= threshold`` (the node's rule).
    """
    y = np.asarray(truth, dtype=int)
    p = np.asarray(probability, dtype=float)
    if y.shape != p.shape or y.ndim != 1 or y.size == 0:
        raise ValueError("truth and probability must be two equally long, non-empty sequences")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("truth must hold 0 / 1 only")
    call = (p >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, call, labels=[0, 1]).ravel())
    n_pos, n_neg = tp + fn, tn + fp
    sens = float(recall_score(y, call, labels=[0, 1], zero_division=0))
    roc: list[ThresholdPoint] = []
    auc: float | None = None
    best: float | None = None
    if n_pos and n_neg:
        auc = float(roc_auc_score(y, p))
        fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
        roc = [ThresholdPoint(float(t), float(s), 1.0 - float(f))
               for f, s, t in zip(fpr, tpr, thr, strict=True)]
        j = tpr - fpr
        finite = np.isfinite(thr)
        if finite.any():
            i = int(np.flatnonzero(finite)[np.argmax(j[finite])])
            best = float(thr[i])
    return ClassificationMetrics(
        n=int(y.size), positives=n_pos, negatives=n_neg, threshold=float(threshold),
        accuracy=(tp + tn) / y.size,
        precision=float(precision_score(y, call, labels=[0, 1], zero_division=0)),
        recall=sens, sensitivity=sens,
        specificity=(tn / n_neg) if n_neg else None,
        f1=float(f1_score(y, call, labels=[0, 1], zero_division=0)),
        confusion=[[tn, fp], [fn, tp]], roc_auc=auc, roc=roc, best_threshold=best)


def bland_altman(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """Mean difference (bias) of ``a - b`` and the 95 % limits of agreement (bias +- 1.96 SD).

    The SD is the sample standard deviation (ddof=1); with one pair it is undefined.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError("bland_altman: two equally long, non-empty sequences needed")
    d = x - y
    bias = float(d.mean())
    if d.size < 2:
        return {"bias": bias, "sd": None, "lower": None, "upper": None}
    sd = float(d.std(ddof=1))
    return {"bias": bias, "sd": sd, "lower": bias - 1.96 * sd, "upper": bias + 1.96 * sd}
