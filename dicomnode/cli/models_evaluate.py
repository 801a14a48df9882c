"""``dicomnode models evaluate MODEL --series DIR... --reference REF --out DIR``.

Runs an installed model on each series and compares its results with
reference results (docs/models.md, "Evaluating a model on your studies"):

* segmentation models: REF is a folder of DICOM SEG objects (matched to a
  series by their Referenced Series Instance UID) and / or NIfTI label maps on
  the series grid (named after the series UID or folder); per label Dice,
  HD95, mean surface distance, volume difference;
* classifiers: REF is a CSV (series, class, label); accuracy, precision,
  recall / sensitivity, specificity, F1, ROC AUC with a threshold sweep and
  the confusion matrix.

Writes ``report.json`` and PNG plots into ``--out`` and prints a table. The
orchestration (load, run, compare) lives here because it combines two stages
(``infer`` runs the model, ``evaluate`` compares), which only the layers above
the stages may do; :mod:`dicomnode.evaluate` itself is pure comparison.

Exit status: 0 when every series was evaluated, 1 when some could not be (each
is listed with its reason in the report and on the terminal), 2 for a usage
error (unknown model, unreadable reference file, ...).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode import __version__
from dicomnode.errors import DicomNodeError, EvaluationError


def register(msub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None],
             registry: Callable[..., Any]) -> None:
    """Add ``evaluate`` to ``models``: ``common`` adds the models options, ``registry``
    builds the model registry from the parsed arguments (both from cli/models.py, passed
    in so that the two modules do not import each other)."""
    ev = msub.add_parser(
        "evaluate", help="run a model on series and compare with reference results",
        description="Run MODEL on each --series folder and compare with the reference results: "
        "DICOM SEG / NIfTI label maps for segmentation models, a CSV (series, class, label) "
        "for classifiers. Writes report.json and PNG plots into --out.")
    common(ev)
    ev.add_argument("name", metavar="MODEL")
    ev.add_argument("--series", nargs="+", required=True, metavar="DIR",
                    help="folders holding one DICOM series each")
    ev.add_argument("--reference", required=True, metavar="REF",
                    help="folder of reference SEG / NIfTI files (segmentation), or a CSV file "
                    "with the columns series, class, label (classification)")
    ev.add_argument("--out", required=True, metavar="DIR",
                    help="folder for report.json and the plots (created)")
    ev.add_argument("--no-plots", action="store_true", help="write report.json only")
    ev.set_defaults(func=evaluate, make_registry=registry)


def _case(series: Path) -> dict[str, Any]:
    return {"series": str(series), "series_uid": None, "status": "ok"}


def evaluate(args: argparse.Namespace) -> int:
    # On use: the model runtime, highdicom, scikit-learn and matplotlib cost seconds to import,
    # which the rest of the CLI should not pay (see dicomnode/cli/models.py).
    from tqdm import tqdm

    from dicomnode.evaluate.metrics import segmentation_metrics
    from dicomnode.evaluate.plots import write_plots
    from dicomnode.evaluate.references import (
        ReferenceFolder,
        match_labels,
        read_class_csv,
    )
    from dicomnode.evaluate.report import format_table, summarise, write_json
    from dicomnode.infer import load_volume

    reg = args.make_registry(args, [args.name])
    manifest = reg.manifest(args.name)
    task = manifest.output.task
    ref_path = Path(args.reference)
    series_dirs = [Path(s) for s in args.series]
    for s in series_dirs:
        if not s.is_dir():
            raise EvaluationError(f"--series: {s} is not a folder")
    out = Path(args.out)
    # Everything about the reference is checked before the first (possibly long) model run.
    folder: ReferenceFolder | None = None
    class_rows: dict[tuple[str, int], bool] = {}
    if task == "segmentation":
        if ref_path.is_file():
            raise EvaluationError(f"--reference: {args.name} is a segmentation model: give a "
                                  "folder of SEG / NIfTI references, not a file")
        folder = ReferenceFolder(ref_path)
        if not folder.segs and not folder.niftis:
            raise EvaluationError(f"--reference: {ref_path} holds no DICOM SEG or NIfTI file")
    else:
        if not ref_path.is_file():
            raise EvaluationError(f"--reference: {args.name} is a classifier: give a CSV file "
                                  "with the columns series, class, label")
        class_rows = {(r.series, r.class_index): r.positive
                      for r in read_class_csv(ref_path, manifest.output.classes)}
    out.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {
        "tool": f"dicomnode {__version__} models evaluate",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {"name": manifest.info.name, "version": manifest.info.version, "task": task,
                  "weights_sha256": [w.sha256 for w in manifest.weights]},
        "reference": str(ref_path), "cases": []}
    seen: dict[str, str] = {}
    for series in tqdm(series_dirs, desc=f"evaluate {args.name}", unit="series",
                       file=sys.stderr, disable=None):
        case = _case(series)
        report["cases"].append(case)
        try:
            volume = load_volume(series)
            case["series_uid"] = volume.series_uid
            if volume.series_uid in seen:
                case.update(status="skipped", reason=f"same series as {seen[volume.series_uid]}")
                continue
            seen[volume.series_uid] = str(series)
            if folder is not None:
                found = folder.find(volume.series_uid, series)
                if found is None:
                    case.update(status="no reference",
                                reason=f"no SEG referencing series {volume.series_uid} and no "
                                f"NIfTI named {volume.series_uid} or {series.name}")
                    continue
                ref = folder.load(found, volume)
                case.update(reference=str(found), reference_kind=ref.kind,
                            placed_by=ref.placed_by)
            else:
                keys = (volume.series_uid, series.name)
                wanted = {c.index: next((class_rows[(k, c.index)] for k in keys
                                         if (k, c.index) in class_rows), None)
                          for c in manifest.output.classes}
                if all(v is None for v in wanted.values()):
                    case.update(status="no reference",
                                reason=f"no CSV row for {volume.series_uid} or {series.name}")
                    continue
            t = time.perf_counter()
            result = reg.run(args.name, volume)
            case["seconds"] = round(time.perf_counter() - t, 3)
            if folder is not None:
                seg = result.segmentation
                assert seg is not None  # a segmentation model's runner always sets it
                masks = {lab.value: m for lab, m in zip(seg.labels, seg.masks, strict=True)}
                case["labels"] = []
                for lab, rseg, rule in match_labels(seg.labels, ref):
                    entry: dict[str, Any] = {"value": lab.value, "name": lab.name,
                                             "matched_by": rule}
                    if rseg is None and ref.kind == "seg":
                        entry["metrics"] = None
                    else:
                        rmask = rseg.mask if rseg is not None else np.zeros_like(masks[lab.value])
                        entry["reference_segment"] = rseg.number if rseg is not None else None
                        entry["metrics"] = segmentation_metrics(
                            masks[lab.value], rmask, volume.spacing).as_dict()
                    case["labels"].append(entry)
            else:
                case["classes"] = [
                    {"index": c.spec.index, "name": c.spec.name, "probability": c.probability,
                     "threshold": c.spec.threshold, "positive": c.positive,
                     "reference": wanted.get(c.spec.index)}
                    for c in result.classifications]
        except DicomNodeError as exc:
            case.update(status="error", reason=str(exc))
    report["summary"] = summarise(report)
    if not args.no_plots:
        report["plots"] = [str(p) for p in write_plots(report, out)]
    written = write_json(out / "report.json", report)
    print(format_table(report))
    print(f"\nreport: {written}")
    for p in report.get("plots", []):
        print(f"plot:   {p}")
    if report["summary"]["evaluated"] == 0:
        return 1
    return 0 if report["summary"]["evaluated"] == report["summary"]["cases"] else 1
