"""``dicomnode routes check|explain``: validate the routing rules, explain a decision.

Imports of the store, infer and encode packages are made inside the command
functions: every command module is loaded to build the parser, and importing
those packages costs 0.4-0.7 s each (measured), which `dicomnode --help` and
the other commands should not pay.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.cli.common import settings_from_args
from dicomnode.config import Settings
from dicomnode.errors import DicomNodeError
from dicomnode.routing import RoutingTable, Rule, is_localizer, representative

if TYPE_CHECKING:
    from dicomnode.infer import ModelRegistry  # on use, see module docstring


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "routes",
        help="check the routing rules or explain which rule a series matches",
        description="Routing rules live under routes: in the configuration (docs/routing.md).",
    )
    rsub = p.add_subparsers(dest="routes_command", metavar="ACTION", required=True)

    check = rsub.add_parser("check", help="validate the rules and list them in order")
    _model_args(check)
    check.set_defaults(func=_check)

    explain = rsub.add_parser(
        "explain",
        help="show which rule a file or series matches and why earlier rules did not",
    )
    explain.add_argument("path", metavar="FILE_OR_SERIES",
                         help="a DICOM file, a folder (each series in it is explained), or "
                         "the Series Instance UID of a series the node has stored")
    explain.add_argument("--calling-aet", default=None,
                         help="calling AE title to assume (default: the one the stored "
                         "series arrived with, else empty)")
    explain.add_argument("--called-aet", default=None,
                         help="called AE title to assume (default: the stored series', "
                         "else node.ae_title)")
    _model_args(explain)
    explain.set_defaults(func=_explain)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="treat NAME as an installed model (repeatable); by default the "
                   "models are the manifests found under models.path")


def model_registry(settings: Settings) -> ModelRegistry | None:
    """The models the worker would load (``models.path``, ``models.enabled``), or
    ``None`` with a warning when they cannot be read (``--model`` then names them)."""
    from dicomnode.infer import ModelRegistry  # on use, see module docstring

    try:
        return ModelRegistry(settings.models.path, settings.models.enabled,
                             settings.models.threads)
    except DicomNodeError as exc:
        print(f"dicomnode: warning: no models: {exc}", file=sys.stderr)
        return None


def _table(args: argparse.Namespace) -> tuple[Settings, RoutingTable, ModelRegistry | None]:
    settings = settings_from_args(args)
    registry = model_registry(settings)
    models = set(registry.names() if registry else ()) | set(args.model)
    return settings, RoutingTable.from_settings(settings, models), registry


def _describe(rule: Rule) -> str:
    what: list[str] = []
    if rule.discard:
        what.append("discard")
    if rule.models:
        what.append("models " + ", ".join(rule.models))
    for s in rule.send:
        what.append(f"send {'+'.join(s.formats)} to {s.destination}")
    if rule.forward:
        what.append("forward originals to " + ", ".join(rule.forward))
    if rule.notify:
        what.append("notify " + ", ".join(rule.notify))
    if rule.priority:
        what.append(f"priority {rule.priority}")
    return "; ".join(what)


def _check(args: argparse.Namespace) -> int:
    settings, table, registry = _table(args)
    if not table.rules:
        print("no routing rules: every installed model whose manifest applies to a series "
              f"runs on it ({', '.join(registry.names()) if registry else 'none installed'}); "
              "nothing is sent")
        return 0
    for rule in table.rules:
        when = "default (everything)" if rule.default else " AND ".join(
            c.describe() for c in rule.conditions)
        print(f"{rule.label}")
        print(f"    when: {when}")
        print(f"    then: {_describe(rule)}")
    if table.default is None:
        print("no default rule: a series no rule matches is stored only")
    return 0


def _representatives(path: Path) -> list[tuple[Path, pydicom.Dataset, int]]:
    """One header per series: the lowest InstanceNumber (then file name) that is not
    a scout wins, as the worker chooses (:func:`dicomnode.routing.representative`)."""
    if path.is_file():
        files: Iterable[Path] = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        raise DicomNodeError(f"{path}: no such file or folder")
    best: dict[str, tuple[tuple[int, int, str], Path, pydicom.Dataset]] = {}
    count: dict[str, int] = {}
    unreadable = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            unreadable += 1
            continue
        series = str(ds.get("SeriesInstanceUID", "")) or str(f)
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        count[series] = count.get(series, 0) + max(frames, 1)
        try:
            number = int(ds.get("InstanceNumber", 0) or 0)
        except (TypeError, ValueError):
            number = 0
        key = (int(is_localizer(ds)), number, str(f))  # a scout only when nothing else
        if series not in best or key < best[series][0]:
            best[series] = (key, f, ds)
    if not best:
        raise DicomNodeError(f"{path}: no readable DICOM file"
                             + (f" ({unreadable} unreadable)" if unreadable else ""))
    return [(f, ds, count[s]) for s, (_, f, ds) in best.items()]


def _model_verdicts(registry: ModelRegistry | None, names: Iterable[str], ds: pydicom.Dataset,
                    n_frames: int, *, routed: bool) -> list[str]:
    """Per model: runs, or the constraint of its manifest that refuses it.

    A model a rule names is checked against the hard constraints only
    (modality, minimum slices, planes); without rules the soft hints (series
    description, body part) select too. The slice count is the series' frame
    count: the loader may still leave scouts or other stacks out.
    """
    lines = []
    for name in names:
        if registry is None or name not in registry.names():
            lines.append(f"        model {name}: not installed here (its manifest is unknown)")
            continue
        m = registry.manifest(name)
        iop = ds.get("ImageOrientationPatient")
        r = m.refusal(str(ds.get("Modality", "") or ""), n_frames,
                      list(iop) if iop is not None else None,
                      body_part=None if routed else str(ds.get("BodyPartExamined", "") or ""),
                      series_description=None if routed else str(
                          ds.get("SeriesDescription", "") or ""))
        if r is None:
            lines.append(f"        model {name}: runs ({n_frames} frame(s))")
        else:
            lines.append(f"        model {name}: refused by {r}")
    return lines


_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def _stored_series(settings: Settings,
                   series_uid: str) -> tuple[Path, pydicom.Dataset, str, str, int]:
    """Representative header and recorded AE titles of a series in the node's store."""
    from dicomnode.store import Store  # on use, see module docstring

    store = Store.open(settings)
    try:
        refs = store.series_instances(series_uid)
        sref = store.series_ref(series_uid)
    finally:
        store.close()
    if not refs:
        raise DicomNodeError(f"series {series_uid}: no stored instance file")
    rep = min(refs, key=lambda i: (i.instance_number is None, i.instance_number or 0,
                                   str(i.path)))
    ds = representative(refs)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return rep.path, ds, sref.calling_aet, sref.called_aet, len(refs) * max(frames, 1)


def _explain(args: argparse.Namespace) -> int:
    settings, table, registry = _table(args)
    out = sys.stdout
    target = Path(args.path)
    if not target.exists() and _UID_RE.match(args.path):
        series = [_stored_series(settings, args.path)]
    else:
        series = [(p, ds, "", settings.node.ae_title, n) for p, ds, n in _representatives(target)]
    for path, ds, rec_calling, rec_called, n_frames in series:
        calling = rec_calling if args.calling_aet is None else args.calling_aet
        called = rec_called if args.called_aet is None else args.called_aet
        print(f"{path}", file=out)
        print(f"    series {ds.get('SeriesInstanceUID', '?')} modality "
              f"{ds.get('Modality', '?')} description {str(ds.get('SeriesDescription', ''))!r}"
              f" calling_aet {calling!r} called_aet {called!r}", file=out)
        if not table.rules:
            applicable = registry.applicable(
                str(ds.get("Modality", "") or ""), str(ds.get("BodyPartExamined", "") or ""),
                str(ds.get("SeriesDescription", "") or ""), n_frames) if registry else []
            print("    no routing rules configured: the models whose manifest applies run, "
                  f"results are not sent -> {', '.join(applicable) or 'no model applies'}",
                  file=out)
            for line in _model_verdicts(registry, registry.names() if registry else [], ds,
                                        n_frames, routed=False):
                print(line, file=out)
            continue
        for exp in table.explain(ds, calling, called):
            mark = "MATCH" if exp.matched else "no   "
            print(f"  {mark} {exp.rule.label}", file=out)
            for reason in exp.reasons:
                print(f"          {'+' if exp.matched else '-'} {reason}", file=out)
            if exp.matched:
                print(f"        -> {_describe(exp.rule)}", file=out)
                for line in _model_verdicts(registry, exp.rule.models, ds, n_frames,
                                            routed=True):
                    print(line, file=out)
                break
        else:
            print("  no rule matched: stored only, nothing runs or is sent", file=out)
    return 0

