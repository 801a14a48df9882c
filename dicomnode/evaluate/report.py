"""The evaluation report: per-case results, summaries, the JSON file and the terminal table.

A report is a plain JSON-ready ``dict`` (the file ``report.json`` is it, as
written); :func:`summarise` adds the ``summary`` block from the cases,
:func:`format_table` renders what a person reads on the terminal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.evaluate.metrics import bland_altman, classification_metrics

#: Per-label metrics summarised over the cases (all in the case entries too).
SEG_METRICS = ("dice", "hd95_mm", "mean_surface_distance_mm", "volume_difference_ml",
               "volume_difference_percent")


def describe(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """n, mean, SD (sample), median, min, max of the defined values; ``undefined`` counts None."""
    xs = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    out: dict[str, float | int | None] = {"n": int(xs.size),
                                           "undefined": len(values) - int(xs.size)}
    if xs.size:
        out.update(mean=float(xs.mean()), sd=float(xs.std(ddof=1)) if xs.size > 1 else None,
                   median=float(np.median(xs)), min=float(xs.min()), max=float(xs.max()))
    else:
        out.update(mean=None, sd=None, median=None, min=None, max=None)
    return out


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The ``summary`` block of ``report`` from its ``cases`` (also stored in the report)."""
    cases = [c for c in report["cases"] if c["status"] == "ok"]
    summary: dict[str, Any] = {
        "cases": len(report["cases"]), "evaluated": len(cases),
        "not_evaluated": [{"series": c["series"], "status": c["status"],
                           "reason": c.get("reason", "")}
                          for c in report["cases"] if c["status"] != "ok"]}
    labels: dict[int, dict[str, Any]] = {}
    for c in cases:
        for lab in c.get("labels", []):
            if lab.get("metrics") is None:
                continue
            e = labels.setdefault(lab["value"], {"value": lab["value"], "name": lab["name"],
                                                 "rows": []})
            e["rows"].append(lab["metrics"])
    seg_out = []
    for value in sorted(labels):
        e = labels[value]
        rows = e.pop("rows")
        e["cases"] = len(rows)
        for m in SEG_METRICS:
            e[m] = describe([r[m] for r in rows])
        e["bland_altman_ml"] = bland_altman([r["volume_ml"] for r in rows],
                                            [r["reference_volume_ml"] for r in rows])
        seg_out.append(e)
    if seg_out:
        summary["labels"] = seg_out
    classes: dict[int, dict[str, Any]] = {}
    for c in cases:
        for cl in c.get("classes", []):
            if cl.get("reference") is None:
                continue
            e = classes.setdefault(cl["index"], {"index": cl["index"], "name": cl["name"],
                                                 "threshold": cl["threshold"],
                                                 "truth": [], "p": []})
            e["truth"].append(1 if cl["reference"] else 0)
            e["p"].append(cl["probability"])
    cls_out = []
    for index in sorted(classes):
        e = classes[index]
        cm = classification_metrics(e["truth"], e["p"], threshold=e["threshold"])
        cls_out.append({"index": index, "name": e["name"], **cm.as_dict()})
    if cls_out:
        summary["classes"] = cls_out
    return summary


def write_json(path: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` atomically (NaN / infinity become null)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(clean(report), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _name(series: str, width: int = 28) -> str:
    """A series folder for the table: its tail, marked when cut."""
    return series if len(series) <= width else "..." + series[-(width - 3):]


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as text: one line per case and label / class, then the summary."""
    lines: list[str] = []
    s = report["summary"]
    model = report["model"]
    lines.append(f"{model['name']} {model['version']}: {s['evaluated']} of {s['cases']} "
                 "series evaluated")
    if report["model"]["task"] == "segmentation":
        head = (f"{'series':<28} {'label':<16} {'Dice':>6} {'HD95 mm':>8} {'MSD mm':>7} "
                f"{'vol mL':>9} {'ref mL':>9} {'diff %':>7}")
        lines += ["", head, "-" * len(head)]
        for c in report["cases"]:
            if c["status"] != "ok":
                continue
            for lab in c["labels"]:
                m = lab.get("metrics")
                if m is None:
                    lines.append(f"{_name(c['series']):<28} {lab['name'][:16]:<16} "
                                 f"(no reference segment)")
                    continue
                lines.append(
                    f"{_name(c['series']):<28} {lab['name'][:16]:<16} {_f(m['dice']):>6} "
                    f"{_f(m['hd95_mm'], 2):>8} {_f(m['mean_surface_distance_mm'], 2):>7} "
                    f"{_f(m['volume_ml'], 1):>9} {_f(m['reference_volume_ml'], 1):>9} "
                    f"{_f(m['volume_difference_percent'], 1):>7}")
        for e in s.get("labels", []):
            d, h, msd = e["dice"], e["hd95_mm"], e["mean_surface_distance_mm"]
            ba = e["bland_altman_ml"]
            lines += ["", f"{e['name']} (label {e['value']}, {e['cases']} case(s)):",
                      f"  Dice  mean {_f(d['mean'])}  SD {_f(d['sd'])}  median "
                      f"{_f(d['median'])}  min {_f(d['min'])}  max {_f(d['max'])}",
                      f"  HD95  mean {_f(h['mean'], 2)} mm   MSD mean {_f(msd['mean'], 2)} mm"
                      + (f"   ({h['undefined']} undefined: one mask empty)"
                         if h["undefined"] else ""),
                      f"  volume bias {_f(ba['bias'], 2)} mL, limits of agreement "
                      f"{_f(ba['lower'], 2)} .. {_f(ba['upper'], 2)} mL"]
    else:
        head = f"{'series':<28} {'class':<16} {'p':>6} {'model':>8} {'reference':>9}"
        lines += ["", head, "-" * len(head)]
        for c in report["cases"]:
            if c["status"] != "ok":
                continue
            for cl in c["classes"]:
                ref = "-" if cl["reference"] is None else ("pos" if cl["reference"] else "neg")
                lines.append(f"{_name(c['series']):<28} {cl['name'][:16]:<16} "
                             f"{cl['probability']:>6.3f} "
                             f"{'pos' if cl['positive'] else 'neg':>8} {ref:>9}")
        for e in s.get("classes", []):
            (tn, fp), (fn, tp) = e["confusion"]
            lines += ["", f"{e['name']} (class {e['index']}, {e['n']} case(s), "
                          f"threshold {e['threshold']:g}):",
                      f"  accuracy {_f(e['accuracy'])}  precision {_f(e['precision'])}  "
                      f"recall/sensitivity {_f(e['recall'])}  specificity "
                      f"{_f(e['specificity'])}  F1 {_f(e['f1'])}",
                      f"  ROC AUC {_f(e['roc_auc'])}"
                      + (f"  (best threshold by Youden's J: {e['best_threshold']:.3f})"
                         if e["best_threshold"] is not None else ""),
                      f"  confusion (rows reference, columns model):  TN {tn}  FP {fp}  /  "
                      f"FN {fn}  TP {tp}"]
    for n in s["not_evaluated"]:
        lines.append(f"not evaluated: {n['series']}: {n['status']}: {n['reason']}")
    return "\n".join(lines)
