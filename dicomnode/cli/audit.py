"""``dicomnode audit [--since DATE] [--study UID] [--event E] [--verify]``: read and check
the audit trail (``audit.path``; see :mod:`dicomnode.audit`)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from dicomnode.audit import AuditEvent, read, trail_path, verify
from dicomnode.cli.common import settings_from_args
from dicomnode.errors import DicomNodeError

_SHOWN = ("calling_aet", "called_aet", "peer", "destination", "study_uid", "instances",
          "not_sent", "refused", "reason", "action", "user", "job_id", "delivery_id",
          "config", "listen")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="read and verify the audit trail",
                       description="Print the audit trail's records (oldest first), filtered; "
                                   "--verify checks its hash chain (exit 1 if broken).")
    p.add_argument("--since", type=_since, metavar="DATE",
                   help="only records at or after this ISO date/time (UTC unless it says)")
    p.add_argument("--study", metavar="UID", help="only records of this Study Instance UID")
    p.add_argument("--event", action="append", default=[], choices=[e.value for e in AuditEvent],
                   help="only this event (repeatable)")
    p.add_argument("--verify", action="store_true",
                   help="check that no record was edited, removed, inserted or reordered")
    p.add_argument("--json", action="store_true", help="the records as JSON lines")
    p.set_defaults(func=_run)


def _since(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO date or date-time (e.g. 2026-12-03 or "
            "2026-12-03T14:00)") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _line(rec: dict[str, Any]) -> str:
    fields = " ".join(f"{k}={rec[k]}" for k in _SHOWN if rec.get(k) not in (None, ""))
    return f"{rec.get('seq', '?'):>6}  {rec.get('time', '?')}  {rec.get('event', '?'):<22} " \
           f"{rec.get('outcome', '?'):<13} {fields}".rstrip()


def _run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    path = trail_path(settings)
    if not path.exists():
        raise DicomNodeError(f"audit.path: no audit trail at {path} (nothing recorded yet, or "
                             "another audit.path)")
    if args.verify:
        count, problems = verify(read(path))
        for p in problems:
            print(f"BROKEN {p}")
        if problems:
            print(f"audit trail {path}: {len(problems)} problem(s) in {count} record(s)")
            return 1
        last = None
        for _n, rec, _raw in read(path):
            last = rec
        tail = f", last seq {last['seq']} hash {last['hash']}" if last else ""
        print(f"audit trail {path}: intact, {count} record(s){tail}")
        return 0
    for _n, rec, raw in read(path):
        if rec is None:
            print(f"(damaged line: {raw[:60]!r})")
            continue
        if args.since is not None:
            try:
                if datetime.fromisoformat(str(rec.get("time"))) < args.since:
                    continue
            except ValueError:
                pass
        if args.study and rec.get("study_uid") != args.study:
            continue
        if args.event and rec.get("event") not in args.event:
            continue
        print(json.dumps(rec, sort_keys=True) if args.json else _line(rec))
    return 0
