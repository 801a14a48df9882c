"""dicomnode.evaluate.metrics against cases computed by hand (voxels and distances counted)."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.evaluate.metrics import (
    bland_altman,
    classification_metrics,
    dice,
    segmentation_metrics,
    surface,
    surface_distances,
)


def _line(n: int, cols: list[int]) -> np.ndarray:
    """A one-voxel-thick row of voxels (shape (1, 1, n)): every voxel is a surface voxel."""
    m = np.zeros((1, 1, n), dtype=bool)
    m[0, 0, cols] = True
    return m


def test_dice_counts() -> None:
    a = np.zeros((2, 3, 3), bool)
    b = np.zeros((2, 3, 3), bool)
    a[0, 0, :] = True  # 3 voxels
    a[1, 0, 0] = True  # + 1 = 4
    b[0, 0, :] = True  # 3 voxels, all shared
    b[1, 2, :] = True  # + 3 = 6, none shared
    assert dice(a, b) == pytest.approx(2 * 3 / (4 + 6))  # 0.6
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0  # agreement on absence
    assert dice(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:1])


def test_surface_of_a_cube_is_all_but_its_centre() -> None:
    m = np.zeros((5, 5, 5), bool)
    m[1:4, 1:4, 1:4] = True  # 27 voxels
    s = surface(m)
    assert int(s.sum()) == 26 and not s[2, 2, 2]
    full = np.ones((3, 3, 3), bool)  # touches the border: outside the array counts as outside
    assert int(surface(full).sum()) == 26


def test_distance_uses_physical_spacing() -> None:
    pred = np.zeros((5, 3, 3), bool)
    ref = np.zeros((5, 3, 3), bool)
    pred[0, 1, 1] = True
    ref[2, 1, 1] = True  # two slices apart, slices 2.5 mm apart -> 5 mm
    sd = surface_distances(pred, ref, (2.5, 0.7, 0.7))
    assert sd.hd95_mm == pytest.approx(5.0)
    assert sd.hausdorff_mm == pytest.approx(5.0)
    assert sd.mean_surface_distance_mm == pytest.approx(5.0)
    ref2 = np.zeros_like(ref)
    ref2[0, 1, 2] = True  # same slice and row, one column over: 0.7 mm
    assert surface_distances(pred, ref2, (2.5, 0.7, 0.7)).hd95_mm == pytest.approx(0.7)


def test_hd95_and_mean_surface_distance_by_hand() -> None:
    # model: columns 0..3, reference: columns 0..1, columns 2 mm apart.
    pred, ref = _line(6, [0, 1, 2, 3]), _line(6, [0, 1])
    # model -> reference: 0, 0, 2, 4 mm; reference -> model: 0, 0 mm.
    # 95th percentile of (0, 0, 2, 4), linear: rank 0.95 * 3 = 2.85 -> 2 + 0.85 * (4 - 2) = 3.7
    m = segmentation_metrics(pred, ref, (1.0, 1.0, 2.0))
    assert m.hd95_mm == pytest.approx(3.7)
    assert m.hausdorff_mm == pytest.approx(4.0)
    assert m.mean_surface_distance_mm == pytest.approx((0 + 0 + 2 + 4 + 0 + 0) / 6)  # 1.0
    assert m.dice == pytest.approx(2 * 2 / 6)
    # voxel = 1 * 1 * 2 mm^3 = 0.002 mL: 4 voxels = 0.008 mL, 2 = 0.004 mL
    assert (m.voxels, m.reference_voxels) == (4, 2)
    assert m.volume_ml == pytest.approx(0.008)
    assert m.reference_volume_ml == pytest.approx(0.004)
    assert m.volume_difference_ml == pytest.approx(0.004)
    assert m.volume_difference_percent == pytest.approx(100.0)
    # symmetric in the distances, not in the volume sign
    r = segmentation_metrics(ref, pred, (1.0, 1.0, 2.0))
    assert r.hd95_mm == pytest.approx(3.7) and r.volume_difference_percent == pytest.approx(-50.0)


def test_empty_masks() -> None:
    z = np.zeros((2, 2, 2), bool)
    one = z.copy()
    one[0, 0, 0] = True
    both = segmentation_metrics(z, z, (1, 1, 1))
    assert (both.dice, both.hd95_mm, both.mean_surface_distance_mm) == (1.0, 0.0, 0.0)
    assert both.volume_difference_percent is None  # no reference volume to compare with
    miss = segmentation_metrics(z, one, (1, 1, 1))
    assert miss.dice == 0.0 and miss.hd95_mm is None and miss.mean_surface_distance_mm is None
    assert miss.volume_difference_percent == pytest.approx(-100.0)
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(one, one, (1, 0, 1))


def test_classification_by_hand() -> None:
    truth = [1, 1, 1, 0, 0, 0, 0, 1]
    prob = [0.9, 0.8, 0.4, 0.3, 0.6, 0.1, 0.2, 0.7]
    # at 0.5: TP = cases 0, 1, 7; FN = case 2; FP = case 4; TN = cases 3, 5, 6
    m = classification_metrics(truth, prob, threshold=0.5)
    assert m.confusion == [[3, 1], [1, 3]]
    assert (m.n, m.positives, m.negatives) == (8, 4, 4)
    assert m.accuracy == pytest.approx(6 / 8)
    assert m.precision == pytest.approx(3 / 4)
    assert m.recall == m.sensitivity == pytest.approx(3 / 4)
    assert m.specificity == pytest.approx(3 / 4)
    assert m.f1 == pytest.approx(3 / 4)
    # AUC: of the 16 (positive, negative) pairs, the positive scores higher in 15
    # (only 0.4 < 0.6 is out of order).
    assert m.roc_auc == pytest.approx(15 / 16)
    sweep = {round(p.threshold, 3): (p.sensitivity, p.specificity) for p in m.roc}
    assert sweep[0.7] == (pytest.approx(0.75), pytest.approx(1.0))
    assert sweep[0.4] == (pytest.approx(1.0), pytest.approx(0.75))
    assert m.best_threshold == pytest.approx(0.7)  # Youden's J = 0.75, first reached at 0.7
    # a case exactly at the threshold is called positive (the node's >= rule)
    at = classification_metrics([1, 0], [0.5, 0.2], threshold=0.5)
    assert at.confusion == [[1, 0], [0, 1]]


def test_classification_one_sided_reference() -> None:
    m = classification_metrics([1, 1, 1], [0.9, 0.2, 0.7], threshold=0.5)
    assert m.roc_auc is None and m.specificity is None and m.roc == []
    assert m.sensitivity == pytest.approx(2 / 3) and m.precision == 1.0
    with pytest.raises(ValueError, match="0 / 1"):
        classification_metrics([2, 0], [0.1, 0.2])


def test_bland_altman_by_hand() -> None:
    # differences 1, 0, 2: bias 1, sample SD sqrt((0 + 1 + 1) / 2) = 1
    ba = bland_altman([10, 12, 14], [9, 12, 12])
    assert ba["bias"] == pytest.approx(1.0) and ba["sd"] == pytest.approx(1.0)
    assert ba["lower"] == pytest.approx(1 - 1.96) and ba["upper"] == pytest.approx(1 + 1.96)
    assert bland_altman([3.0], [1.0])["sd"] is None
