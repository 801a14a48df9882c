"""``dicomnode routes check|explain``: validate the routing rules, explain a decision."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.cli.common import settings_from_args
from dicomnode.config import Settings
from dicomnode.errors import DicomNodeError
from dicomnode.routing import RoutingTable, Rule

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "routes",
        help="check the routing rules or explain which rule a series matches",
        description="Routing rules live under routes: in the configuration (README: routing).",
    )
    rsub = p.add_subparsers(dest="routes_command", metavar="ACTION", required=True)

    check = rsub.add_parser("check", help="validate the rules and list them in order")
    _model_args(check)
    check.set_defaults(func=_check)

    explain = rsub.add_parser(
        "explain",
        help="show which rule a file or series matches and why earlier rules did not",
    )
    explain.add_argument("path", metavar="FILE_OR_SERIES_DIR",
                         help="a DICOM file, or a folder (each series in it is explained)")
    explain.add_argument("--calling-aet", default="",
                         help="calling AE title to assume (the sender)")
    explain.add_argument("--called-aet", default=None,
                         help="called AE title to assume (default: node.ae_title)")
    _model_args(explain)
    explain.set_defaults(func=_explain)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="treat NAME as an installed model (repeatable); by default the "
                   "models are the manifests found under models.path")


def installed_model_names(settings: Settings) -> set[str]:
    """Names of the models under ``models.path`` (``<name>/model.yaml``), filtered by
    ``models.enabled``; a manifest that does not load is skipped with a warning."""
    from dicomnode.infer.manifest import load_manifest

    names: set[str] = set()
    root = Path(settings.models.path)
    if root.is_dir():
        for manifest in sorted(root.glob("*/model.yaml")):
            try:
                names.add(load_manifest(manifest).name)
            except DicomNodeError as exc:
                log.warning("skipping model manifest %s: %s", manifest, exc)
    if settings.models.enabled:
        names &= set(settings.models.enabled)
    return names


def _table(args: argparse.Namespace) -> tuple[Settings, RoutingTable]:
    settings = settings_from_args(args)
    models = installed_model_names(settings) | set(args.model)
    return settings, RoutingTable.from_settings(settings, models)


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
    if rule.priority:
        what.append(f"priority {rule.priority}")
    return "; ".join(what)


def _check(args: argparse.Namespace) -> int:
    settings, table = _table(args)
    if not table.rules:
        print("no routing rules: every series is stored, nothing runs or is sent")
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


def _representatives(path: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """One header per series: the lowest InstanceNumber (then file name) wins."""
    if path.is_file():
        files: Iterable[Path] = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        raise DicomNodeError(f"{path}: no such file or folder")
    best: dict[str, tuple[tuple[int, str], Path, pydicom.Dataset]] = {}
    unreadable = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            unreadable += 1
            continue
        series = str(ds.get("SeriesInstanceUID", "")) or str(f)
        try:
            number = int(ds.get("InstanceNumber", 0) or 0)
        except (TypeError, ValueError):
            number = 0
        key = (number, str(f))
        if series not in best or key < best[series][0]:
            best[series] = (key, f, ds)
    if not best:
        raise DicomNodeError(f"{path}: no readable DICOM file"
                             + (f" ({unreadable} unreadable)" if unreadable else ""))
    return [(f, ds) for _, f, ds in best.values()]


def _explain(args: argparse.Namespace) -> int:
    settings, table = _table(args)
    called = settings.node.ae_title if args.called_aet is None else args.called_aet
    out = sys.stdout
    for path, ds in _representatives(Path(args.path)):
        print(f"{path}", file=out)
        print(f"    series {ds.get('SeriesInstanceUID', '?')} modality "
              f"{ds.get('Modality', '?')} description {str(ds.get('SeriesDescription', ''))!r}"
              f" calling_aet {args.calling_aet!r} called_aet {called!r}", file=out)
        if not table.rules:
            print("    no routing rules configured: stored only", file=out)
            continue
        for exp in table.explain(ds, args.calling_aet, called):
            mark = "MATCH" if exp.matched else "no   "
            print(f"  {mark} {exp.rule.label}", file=out)
            for reason in exp.reasons:
                print(f"          {'+' if exp.matched else '-'} {reason}", file=out)
            if exp.matched:
                print(f"        -> {_describe(exp.rule)}", file=out)
                break
        else:
            print("  no rule matched: stored only, nothing runs or is sent", file=out)
    return 0

