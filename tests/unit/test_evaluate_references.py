"""dicomnode.evaluate.references (grid mapping, CSV) and report summaries, on small cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.domain import ClassSpec, CodedConcept
from dicomnode.errors import EvaluationError
from dicomnode.evaluate.references import onto_grid, read_class_csv
from dicomnode.evaluate.report import describe, format_table, summarise

DST = np.array([[0, 0, 0.5, 10.0],  # (k, row, col) -> LPS: columns along x, 0.5 mm
                [0, 0.5, 0, 20.0],  # rows along y, 0.5 mm
                [2.0, 0, 0, 30.0],  # slices along z, 2 mm
                [0, 0, 0, 1]])


def test_onto_grid_permuted_flipped_and_shifted() -> None:
    dst_shape = (4, 3, 5)
    src = np.zeros((5, 3, 2), np.uint8)  # stored (x, y, z) with x reversed, two slices only
    src[4, 0, 1] = 7  # x index 4 reversed -> column 0; y 0 -> row 0; z 1 -> slice 1 + 2 = 3
    a = np.zeros((4, 4))
    a[:3, 0] = (-0.5, 0, 0)  # i runs along -x
    a[:3, 1] = (0, 0.5, 0)
    a[:3, 2] = (0, 0, 2.0)
    a[:3, 3] = (10.0 + 4 * 0.5, 20.0, 30.0 + 2 * 2.0)  # i = 4 sits at column 0, k = 0 at slice 2
    a[3, 3] = 1
    out = onto_grid(src, a, dst_shape, DST, "test")
    assert out.shape == dst_shape and out.dtype == np.uint8
    assert np.argwhere(out).tolist() == [[3, 0, 0]] and out[3, 0, 0] == 7


def test_onto_grid_refusals() -> None:
    src = np.ones((2, 2, 2), np.uint8)
    half = DST.copy()
    half[:3, 3] += (0.25, 0, 0)  # half a column over
    with pytest.raises(EvaluationError, match="fraction of a voxel"):
        onto_grid(src, half, (2, 2, 2), DST, "m")
    coarse = DST.copy()
    coarse[:3, 1] *= 2  # rows twice as far apart
    with pytest.raises(EvaluationError, match="voxel axes or spacing"):
        onto_grid(src, coarse, (2, 2, 2), DST, "m")
    out_of = DST.copy()
    out_of[:3, 3] += (0.5, 0, 0)  # one column over: the last column falls off the series
    with pytest.raises(EvaluationError, match="outside the series"):
        onto_grid(src, out_of, (2, 2, 2), DST, "m")
    empty_edge = np.zeros((2, 2, 2), np.uint8)
    empty_edge[:, :, 0] = 1  # only column 0 is labelled: the shift keeps it inside
    out = onto_grid(empty_edge, out_of, (2, 2, 2), DST, "m")
    assert out[:, :, 1].all() and not out[:, :, 0].any()


CLASSES = [ClassSpec(1, "Bright blob", CodedConcept("4147007", "SCT", "Mass")),
           ClassSpec(2, "Calcification", CodedConcept("18115005", "SCT", "Calcification"))]


def test_class_csv(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    p.write_text("\ufeffSeries, Class ,LABEL,comment\n1.2.3,bright blob,Yes,x\n"
                 "case-2,2,0,\n\n case-3 ,Calcification,positive,\n")
    rows = read_class_csv(p, CLASSES)
    assert [(r.series, r.class_index, r.positive, r.line) for r in rows] == [
        ("1.2.3", 1, True, 2), ("case-2", 2, False, 3), ("case-3", 2, True, 5)]
    p.write_text("series,class,label\na,1,1\na,Bright blob,0\n")
    with pytest.raises(EvaluationError, match="line 3: series a class Bright blob given twice"):
        read_class_csv(p, CLASSES)
    p.write_text("series,class,label\n")
    with pytest.raises(EvaluationError, match="no reference rows"):
        read_class_csv(p, CLASSES)


def test_describe_and_summary_by_hand() -> None:
    d = describe([1.0, None, 3.0, 2.0])
    assert d == {"n": 3, "undefined": 1, "mean": 2.0, "sd": 1.0, "median": 2.0,
                 "min": 1.0, "max": 3.0}
    assert describe([None])["mean"] is None

    def lab(dice: float, v: float, r: float) -> dict:  # type: ignore[type-arg]
        return {"value": 1, "name": "Brain", "metrics": {
            "dice": dice, "hd95_mm": 1.0, "mean_surface_distance_mm": 0.5,
            "volume_ml": v, "reference_volume_ml": r, "volume_difference_ml": v - r,
            "volume_difference_percent": 100 * (v - r) / r}}

    report = {"model": {"name": "m", "version": "1", "task": "segmentation"}, "cases": [
        {"series": "a", "status": "ok", "labels": [lab(0.9, 11.0, 10.0)]},
        {"series": "b", "status": "ok", "labels": [lab(0.7, 10.0, 10.0)]},
        {"series": "c", "status": "no reference", "reason": "none found"}]}
    report["summary"] = summarise(report)
    s = report["summary"]
    assert (s["cases"], s["evaluated"]) == (3, 2)
    assert s["not_evaluated"] == [{"series": "c", "status": "no reference",
                                   "reason": "none found"}]
    (brain,) = s["labels"]
    assert brain["dice"]["mean"] == pytest.approx(0.8)
    assert brain["volume_difference_percent"]["mean"] == pytest.approx(5.0)
    # differences 1, 0: bias 0.5, SD sqrt(0.25 + 0.25) = 0.7071
    assert brain["bland_altman_ml"]["bias"] == pytest.approx(0.5)
    assert brain["bland_altman_ml"]["sd"] == pytest.approx(0.5 ** 0.5)
    text = format_table(report)
    assert "2 of 3 series evaluated" in text and "0.900" in text
    assert "not evaluated: c: no reference: none found" in text
