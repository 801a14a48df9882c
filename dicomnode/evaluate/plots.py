"""PNG plots of an evaluation report, with matplotlib's Agg canvas (no display, no pyplot).

* ``roc.png``: the ROC curve of each class, AUC in the legend, the model's
  operating point (its threshold) marked.
* ``dice.png``: per-case Dice of each label as a strip plot, median marked.
* ``bland-altman.png``: volume difference (model - reference, mL) against the
  mean volume per label, with the bias and the 95 % limits of agreement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    tmp = path.with_name(path.name + ".part.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def _title(report: dict[str, Any], what: str) -> str:
    m = report["model"]
    return f"{m['name']} {m['version']}: {what}"


def roc_plot(report: dict[str, Any], path: Path) -> Path | None:
    classes = [c for c in report["summary"].get("classes", []) if c["roc"]]
    if not classes:
        return None
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    for c in classes:
        fpr = [1 - p["specificity"] for p in c["roc"]]
        tpr = [p["sensitivity"] for p in c["roc"]]
        line, = ax.plot(fpr, tpr, lw=2, drawstyle="default",
                        label=f"{c['name']} (AUC {c['roc_auc']:.3f}, n={c['n']})")
        if c["specificity"] is not None:
            ax.plot([1 - c["specificity"]], [c["sensitivity"]], "o", color=line.get_color(),
                    label=f"threshold {c['threshold']:g}")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="1 - specificity",
           ylabel="sensitivity", title=_title(report, "ROC"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _label_rows(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for c in report["cases"]:
        if c["status"] != "ok":
            continue
        for lab in c.get("labels", []):
            if lab.get("metrics") is not None:
                rows.setdefault(lab["name"], []).append(lab["metrics"])
    return rows


def dice_plot(report: dict[str, Any], path: Path) -> Path | None:
    rows = _label_rows(report)
    if not rows:
        return None
    fig = Figure(figsize=(max(4.0, 1.4 * len(rows) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # fixed jitter: the same report gives the same picture
    for i, ms in enumerate(rows.values()):
        d = np.array([m["dice"] for m in ms])
        ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=22, alpha=0.8, zorder=3)
        ax.hlines(float(np.median(d)), i - 0.25, i + 0.25, color="k", lw=2, zorder=4)
    ax.set_xticks(range(len(rows)), list(rows), rotation=20 if len(rows) > 3 else 0)
    lo = min(min(m["dice"] for m in ms) for ms in rows.values())
    ax.set(ylim=(max(0.0, lo - 0.05), 1.01), ylabel="Dice (per case)",
           title=_title(report, "Dice per case (bar: median)"))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def bland_altman_plot(report: dict[str, Any], path: Path) -> Path | None:
    """One panel per label (their volumes differ by orders of magnitude)."""
    rows = _label_rows(report)
    if not rows:
        return None
    n = len(rows)
    fig = Figure(figsize=(4.6 * n, 4.2), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, ms) in zip(axes, rows.items(), strict=True):
        a = np.array([m["volume_ml"] for m in ms])
        b = np.array([m["reference_volume_ml"] for m in ms])
        mean, diff = (a + b) / 2, a - b
        ax.scatter(mean, diff, s=22, alpha=0.8, zorder=3)
        bias = float(diff.mean())
        ax.axhline(bias, color="C3", lw=1.5, label=f"bias {bias:.2f} mL")
        if diff.size > 1:
            sd = float(diff.std(ddof=1))
            lo, hi = bias - 1.96 * sd, bias + 1.96 * sd
            ax.axhline(lo, color="C3", lw=1, ls="--", label=f"95 % limits {lo:.2f} .. {hi:.2f}")
            ax.axhline(hi, color="C3", lw=1, ls="--")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set(xlabel="mean of model and reference (mL)", ylabel="model - reference (mL)",
               title=f"{name} (n={len(ms)})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(report, "Bland-Altman of volumes"))
    return _save(fig, path)


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Every plot that applies to ``report``, written into ``out``."""
    written = [roc_plot(report, out / "roc.png"), dice_plot(report, out / "dice.png"),
               bland_altman_plot(report, out / "bland-altman.png")]
    return [p for p in written if p is not None]
