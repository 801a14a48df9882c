"""``dicomnode storage usage | purge [--dry-run] [--older-than DAYS]``: what is stored, and
the retention rules applied by hand (``retention:``; nothing still owed is ever purged).

Imports of the store are made inside the command functions: every command module is
loaded to build the parser, and importing the store costs about 0.5 s (measured),
which `dicomnode --help` and the other commands should not pay.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from dicomnode.audit import AuditLog
from dicomnode.cli.common import settings_from_args
from dicomnode.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("storage", help="stored studies and results; purge by the retention rules")
    ssub = p.add_subparsers(dest="storage_command", metavar="ACTION", required=True)
    u = ssub.add_parser("usage", help="disk use, studies and results, and what holds them back")
    u.add_argument("--json", action="store_true")
    u.set_defaults(func=_usage)
    g = ssub.add_parser("purge", help="purge what the retention rules allow (audited)",
                        description="Remove received studies older than their retention "
                                    "(retention.instances_days / per_calling_aet), result "
                                    "objects older than retention.results_days, and the "
                                    "oldest studies while the disk is above "
                                    "retention.high_water_percent. Never a study with a job "
                                    "pending or running or a delivery still to be sent.")
    g.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    g.add_argument("--older-than", type=_days, metavar="DAYS",
                   help="instead of the rules: every study whose last instance arrived more "
                        "than DAYS ago (and nothing is owed for)")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_purge)


def _days(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if v < 0:
        raise argparse.ArgumentTypeError("days must be 0 or more")
    return v


def _age(t: datetime | None) -> str:
    if t is None:
        return "-"
    days = (datetime.now(UTC) - t).total_seconds() / 86400
    return f"{days:.1f} d"


def _usage(args: argparse.Namespace) -> int:
    from dicomnode.store import Store, files, retention  # on use, see module docstring

    settings = settings_from_args(args)
    with Store.open(settings) as store:
        studies, results = store.storage_usage()
        total, used, free = files.disk_usage(store.root)
        pct = retention.disk_used_percent(store.root)
    if args.json:
        print(json.dumps({
            "disk": {"total": total, "used": used, "free": free, "used_percent": round(pct, 2)},
            "studies": [{"study_uid": s.study_uid, "last_received": s.last_received.isoformat(),
                         "instances": s.instances, "bytes": s.bytes,
                         "calling_aets": list(s.calling_aets), "blocked": s.blocked}
                        for s in studies],
            "results": [{"job_id": r.job_id, "study_uid": r.study_uid, "objects": r.objects,
                         "finished": r.finished.isoformat() if r.finished else None,
                         "blocked": r.blocked} for r in results]}, indent=2))
        return 0
    r = settings.retention
    print(f"disk: {pct:.1f}% used, {free / 1e9:.1f} GB free of {total / 1e9:.1f} GB"
          + (f" (high-water mark {r.high_water_percent:g}%)" if r.high_water_percent else ""))
    print(f"studies: {len(studies)}, {sum(s.instances for s in studies)} instances, "
          f"{sum(s.bytes for s in studies) / 1e6:.1f} MB; result sets: {len(results)}")
    for s in studies:
        days = r.days_for(s.calling_aets)
        keep = f"keep {days:g} d" if days else "no age limit"
        why = f"  held: {s.blocked}" if s.blocked else ""
        print(f"  study {s.study_uid}  {s.instances} inst  {s.bytes / 1e6:.1f} MB  "
              f"last {_age(s.last_received)} ago  from {','.join(s.calling_aets) or '-'}  "
              f"{keep}{why}")
    return 0


def _purge(args: argparse.Namespace) -> int:
    from dicomnode.store import Store  # on use, see module docstring

    settings = settings_from_args(args)
    audit = AuditLog.from_settings(settings, role="cli")
    with Store.open(settings) as store:
        rep = store.purge(dry_run=args.dry_run, older_than_days=args.older_than,
                          audit=None if args.dry_run else audit)
    if args.json:
        print(json.dumps({"dry_run": rep.dry_run, "bytes": rep.bytes,
                          "purged": [p.__dict__ for p in rep.purged],
                          "kept": [{"study_uid": u, "why": w} for u, w in rep.kept]}, indent=2))
        return 0
    verb = "would purge" if rep.dry_run else "purged"
    for p in rep.purged:
        what = f"{p.count} instance(s)" if p.what == "instances" else \
            f"{p.count} result object(s) of job {p.job_id}"
        size = f", {p.bytes / 1e6:.1f} MB" if p.bytes else ""
        print(f"{verb} study {p.study_uid}: {what}{size} ({p.reason})")
    for uid, why in rep.kept:
        print(f"kept study {uid}: {why}")
    if not rep.purged:
        print("nothing to purge" + (" (no retention rule is set: see retention.* or "
                                    "--older-than)" if not _rules(settings) and
                                    args.older_than is None else ""))
    elif not rep.dry_run:
        print(f"{len(rep.purged)} purge(s), {rep.bytes / 1e6:.1f} MB freed")
    return 0


def _rules(settings: Settings) -> bool:
    r = settings.retention
    return bool(r.instances_days or r.per_calling_aet or r.results_days or r.high_water_percent)
