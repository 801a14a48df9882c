"""``dicomnode models list|verify|run``: inspect, check and run the installed models.

* ``list``: the models under ``models.path`` with family, modalities, backend.
* ``verify [NAME ...]``: SHA-256 of every weights file, load (sessions
  created), and a run on the model's bundled sample compared with the answer
  recorded at release. Exit 1 if any model fails.
* ``evaluate NAME --series DIR... --reference REF --out DIR``: compare the
  model's results with reference results (:mod:`dicomnode.cli.models_evaluate`).
* ``run NAME SERIES_DIR --out DIR [--formats seg,sr,sc]``: offline run on a folder
  of DICOM files; writes the masks as NIfTI, the measurements as JSON and the
  DICOM SEG / SR (/ SC) the node would send (see
  :func:`write_outputs`, the single place where results are written).

Imports of the store, infer and encode packages are made inside the command
functions: every command module is loaded to build the parser, and importing
those packages costs 0.4-0.7 s each (measured), which `dicomnode --help` and
the other commands should not pay.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.cli import models_evaluate
from dicomnode.cli.common import settings_from_args
from dicomnode.domain import InferenceResult
from dicomnode.errors import DicomNodeError, ModelError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list, verify or run the installed models",
        description="Models live under models.path, one folder with a model.yaml each "
        "(docs/models.md).",
    )
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    ls = msub.add_parser("list", help="list the installed models")
    _common(ls)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_list)

    verify = msub.add_parser(
        "verify", help="check weights hashes, load each model and run it on its bundled sample")
    _common(verify)
    verify.add_argument("names", nargs="*", metavar="NAME", help="models to verify (default: all)")
    verify.set_defaults(func=_verify)

    run = msub.add_parser("run", help="run a model on a folder of DICOM files (offline)")
    _common(run)
    run.add_argument("name", metavar="NAME")
    run.add_argument("series", metavar="SERIES_DIR", help="folder holding one DICOM series")
    run.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    run.add_argument("--formats", default="seg,sr", metavar="LIST",
                     help="DICOM result objects to write too: comma list of seg, sr, sc "
                     "(default: seg,sr; 'none' for NIfTI/JSON only)")
    run.set_defaults(func=_run)

    models_evaluate.register(msub, _common, _registry)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", default=None, metavar="DIR",
                   help="models folder (default: models.path from the configuration)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads (default: models.threads)")


def _registry(args: argparse.Namespace, names: list[str] | None = None):
    from dicomnode.infer import ModelRegistry  # on use, see module docstring

    settings = settings_from_args(args)
    models_dir = args.models_dir or settings.models.path
    threads = settings.models.threads if args.threads is None else args.threads
    if threads < 0:
        raise ModelError("--threads: must be >= 0")
    enabled = tuple(names) if names else settings.models.enabled
    return ModelRegistry(models_dir, enabled=enabled, threads=threads)


def _list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    rows = []
    for name in reg.names():
        m = reg.manifest(name)
        rows.append({
            "name": name, "version": m.info.version, "family": m.info.family,
            "task": m.output.task, "modalities": list(m.applicability.modalities),
            "body_parts": list(m.applicability.body_parts), "backend": m.backend,
            "licence": m.info.licence,
            "labels": [lab.spec.name for lab in m.output.labels] or
                      [c.name for c in m.output.classes],
            "description": m.info.description,
        })
    if args.json:
        print(json.dumps({"models_dir": str(reg.models_dir), "models": rows}, indent=2))
        return 0
    print(f"models in {reg.models_dir}:")
    if not rows:
        print("  (none)")
    for r in rows:
        print(f"  {r['name']:<16} {r['version']:<14} {r['family']:<10} {r['task']:<14} "
              f"{','.join(r['modalities']):<6} {r['backend']:<11} labels: {', '.join(r['labels'])}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dicomnode.infer.samples import check_sample  # on use, see module docstring

    reg = _registry(args, args.names)
    failed = 0
    for name in reg.names():
        m = reg.manifest(name)
        try:
            m.verify_weights()
            print(f"{name}: weights sha256 ok ({len(m.weights)} file(s))")
            t = time.perf_counter()
            runner = reg.runner(name)
            print(f"{name}: loaded ({m.backend}) in {time.perf_counter() - t:.1f} s")
            if not m.sample:
                print(f"{name}: no bundled sample (manifest key 'sample'): run not checked")
                continue
            t = time.perf_counter()
            check = check_sample(m.folder / m.sample, runner.run)
            took = time.perf_counter() - t
            status = "ok" if check.ok else "FAILED"
            print(f"{name}: sample run {status} in {took:.1f} s: {check.message}")
            if not check.ok:
                failed += 1
        except DicomNodeError as exc:
            print(f"{name}: FAILED: {exc}")
            failed += 1
    print(f"{len(reg.names()) - failed}/{len(reg.names())} model(s) verified")
    return 1 if failed else 0


def _run(args: argparse.Namespace) -> int:
    from dicomnode.encode.common import check_formats  # on use, see module docstring
    from dicomnode.infer import load_volume  # on use, see module docstring

    # Checked before the (possibly long) model run.
    formats = () if args.formats.strip().lower() == "none" else \
        check_formats([f.strip() for f in args.formats.split(",") if f.strip()])
    reg = _registry(args, [args.name])
    series = Path(args.series)
    if not series.is_dir():
        raise ModelError(f"SERIES_DIR: {series} is not a folder")
    t = time.perf_counter()
    volume = load_volume(series)
    load_s = time.perf_counter() - t
    manifest = reg.manifest(args.name)
    ok, why = manifest.applies_to(volume.modality, n_slices=volume.shape[0])
    if not ok:
        print(f"warning: {args.name} does not declare this series as applicable ({why}); "
              "running anyway", file=sys.stderr)
    result = reg.run(args.name, volume)
    result.timings["load"] = load_s
    written = write_outputs(result, Path(args.out), formats=formats)
    for p in written:
        print(p)
    for m in result.measurements:
        names = {x.spec.value: x.spec.name for x in manifest.output.labels}
        lab = names.get(m.label_value, "") if m.label_value is not None else ""
        print(f"  {lab or m.label_value}: {m.name} = {m.value:.6g} {m.unit}")
    for c in result.classifications:
        verdict = "positive" if c.positive else "negative"
        print(f"  {c.spec.name}: p = {c.probability:.4f} ({verdict})")
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "label"


def result_summary(result: InferenceResult) -> dict[str, Any]:
    """JSON-ready description of a result (model identity, measurements, geometry)."""
    info = result.model
    v = result.volume
    out: dict[str, Any] = {
        "model": {"name": info.name, "version": info.version, "family": info.family,
                  "licence": info.licence, "citation": info.citation,
                  "weights_sha256": list(info.weights_sha256)},
        "series": {"study_uid": v.study_uid, "series_uid": v.series_uid,
                   "modality": v.modality, "shape": list(v.shape),
                   "spacing_mm": [round(s, 6) for s in v.spacing],
                   "affine_lps": np.round(v.affine, 6).tolist()},
        "measurements": [
            {"name": m.name, "value": m.value, "unit": m.unit, "label_value": m.label_value}
            for m in result.measurements],
        "timings_s": {k: round(t, 4) for k, t in result.timings.items()},
    }
    if result.segmentation is not None:
        out["labels"] = [
            {"value": lab.value, "name": lab.name, "color": list(lab.color),
             "category": vars(lab.category), "type": vars(lab.type),
             "voxels": int(np.count_nonzero(mask))}
            for lab, mask in zip(result.segmentation.labels, result.segmentation.masks,
                                 strict=True)]
    if result.classifications:
        out["classifications"] = [
            {"index": c.spec.index, "name": c.spec.name, "code": vars(c.spec.code),
             "probability": c.probability, "threshold": c.spec.threshold,
             "positive": c.positive}
            for c in result.classifications]
    return out


def write_outputs(result: InferenceResult, out: Path,
                  formats: Sequence[str] = ()) -> list[Path]:
    """Write everything a result produces into ``out``; return the files written.

    The single place results are written by ``models run``: NIfTI masks (one
    per label, and ``labels.nii.gz`` where a voxel gets the highest label
    value that covers it), saliency maps for classifications, and
    ``measurements.json``, and the DICOM objects in ``formats`` (SEG / SR / SC,
    :func:`write_dicom_outputs`).
    """
    from dicomnode.infer.nifti import write_nifti  # on use (nibabel), see module docstring

    out.mkdir(parents=True, exist_ok=True)
    v = result.volume
    written: list[Path] = []
    seg = result.segmentation
    if seg is not None:
        dtype = np.uint8 if max((lab.value for lab in seg.labels), default=0) < 256 else np.uint16
        labelmap = np.zeros(v.shape, dtype=dtype)
        for lab, mask in sorted(zip(seg.labels, seg.masks, strict=True), key=lambda x: x[0].value):
            written.append(write_nifti(out / f"mask-{lab.value}-{_slug(lab.name)}.nii.gz", mask,
                                       v.affine, f"{result.model.name} {lab.name}"))
            labelmap[mask] = lab.value
        written.append(write_nifti(out / "labels.nii.gz", labelmap, v.affine,
                                   f"{result.model.name} labels"))
    for c in result.classifications:
        if c.saliency is not None:
            written.append(write_nifti(out / f"saliency-{c.spec.index}-{_slug(c.spec.name)}.nii.gz",
                                       c.saliency.astype(np.float32), v.affine,
                                       f"{result.model.name} saliency {c.spec.name}"))
    summary = out / "measurements.json"
    tmp = summary.with_suffix(".json.part")
    tmp.write_text(json.dumps(result_summary(result), indent=2) + "\n", encoding="utf-8")
    tmp.replace(summary)
    written.append(summary)
    written += write_dicom_outputs(result, out, formats)
    return written


def write_dicom_outputs(result: InferenceResult, out: Path, formats: Sequence[str]) -> list[Path]:
    """The DICOM objects the node would send (``dicomnode.encode``), as files in ``out``.

    ``seg.dcm``, ``sr.dcm`` and ``sc-NNN.dcm``; source headers are read from
    the series the volume was loaded from.
    """
    from dicomnode.encode import EncodeOptions, encode_results  # on use, see module docstring

    if not formats:
        return []
    written: list[Path] = []
    sc_count = 0
    for ds in encode_results(result, formats=formats, options=EncodeOptions()):
        modality = str(ds.get("Modality", ""))
        if modality in ("SEG", "SR"):
            name = f"{modality.lower()}.dcm"
        else:
            sc_count += 1
            name = f"sc-{sc_count:03d}.dcm"
        path = out / name
        tmp = path.with_suffix(".dcm.part")
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(path)
        written.append(path)
    return written
