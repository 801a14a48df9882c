"""``dicomnode jobs list|show|retry|cancel`` and ``dicomnode deliveries list|retry``.

Imports of the store, infer and encode packages are made inside the command
functions: every command module is loaded to build the parser, and importing
those packages costs 0.4-0.7 s each (measured), which `dicomnode --help` and
the other commands should not pay.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from dicomnode.audit import user_action
from dicomnode.cli.common import settings_from_args
from dicomnode.domain import Delivery, DeliveryState, Job, JobState

T = TypeVar("T")


def register(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="list, inspect, retry or cancel jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    p = jsub.add_parser("list", help="jobs, newest first")
    p.add_argument("--state", action="append", default=[],
                   choices=[s.value for s in JobState], help="only this state (repeatable)")
    p.add_argument("--study", help="only this Study Instance UID")
    p.add_argument("--series", help="only this Series Instance UID")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_jobs_list)
    p = jsub.add_parser("show", help="one job: state, error, what was left out or refused, "
                        "earlier attempts, outputs, deliveries")
    p.add_argument("job_id", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_jobs_show)
    p = jsub.add_parser("retry", help="put failed / cancelled / done jobs back in the queue")
    p.add_argument("job_ids", type=int, nargs="*")
    p.add_argument("--all-failed", action="store_true", help="every failed job")
    p.set_defaults(func=_jobs_retry)
    p = jsub.add_parser("cancel", help="cancel pending, running or failed jobs")
    p.add_argument("job_ids", type=int, nargs="+")
    p.set_defaults(func=_jobs_cancel)

    dels = sub.add_parser("deliveries", help="list or retry deliveries (the outbox)")
    dsub = dels.add_subparsers(dest="deliveries_command", metavar="ACTION", required=True)
    p = dsub.add_parser("list", help="deliveries, newest first")
    p.add_argument("--state", action="append", default=[],
                   choices=[s.value for s in DeliveryState], help="only this state (repeatable)")
    p.add_argument("--destination", help="only this destination (or notification) name")
    p.add_argument("--job", type=int, help="only this job")
    p.add_argument("--study", help="only deliveries of jobs of this Study Instance UID")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_deliveries_list)
    p = dsub.add_parser("retry", help="send failed deliveries again (fresh deadline)")
    p.add_argument("delivery_ids", type=int, nargs="*")
    p.add_argument("--all-failed", action="store_true", help="every failed delivery")
    p.add_argument("--destination", help="with --all-failed: only this destination")
    p.set_defaults(func=_deliveries_retry)


# --------------------------------------------------------------------------- rendering


def _ts(v: datetime | None) -> str | None:
    return v.isoformat(timespec="seconds") if v else None


def job_dict(j: Job) -> dict[str, Any]:
    return {"id": j.id, "state": j.state.value, "study_uid": j.study_uid,
            "series_uid": j.series_uid, "version": j.series_version, "attempts": j.attempts,
            "priority": j.priority, "not_before": _ts(j.not_before),
            "lease_until": _ts(j.lease_until), "worker": j.worker_id, "error": j.last_error,
            "created_at": _ts(j.created_at), "updated_at": _ts(j.updated_at)}


def delivery_dict(d: Delivery) -> dict[str, Any]:
    return {"id": d.id, "job_id": d.job_id, "destination": d.destination, "kind": d.kind,
            "state": d.state.value, "sop_instance_uid": d.sop_instance_uid,
            "sop_class_uid": d.sop_class_uid, "path": str(d.path) if d.kind == "dicom" else "",
            "attempts": d.attempts,
            "not_before": _ts(d.not_before), "deadline": _ts(d.deadline),
            "peer_status": (None if d.peer_status is None else str(d.peer_status)
                            if d.kind != "dicom" else f"0x{d.peer_status:04X}"),
            "error": d.last_error, "created_at": _ts(d.created_at),
            "updated_at": _ts(d.updated_at)}


def _job_line(j: Job) -> str:
    err = f"  error: {j.last_error}" if j.last_error and j.state is not JobState.DONE else ""
    if j.state is JobState.SKIPPED and j.notes.get("skipped"):
        err = f"  skipped: {j.notes['skipped']}"
    when = f"  next try {_ts(j.not_before)}" if j.state is JobState.PENDING and j.not_before else ""
    return (f"job {j.id:<6} {j.state.value:<10} attempts {j.attempts}  "
            f"series {j.series_uid} v{j.series_version}  study {j.study_uid}{when}{err}")


def _delivery_line(d: Delivery) -> str:
    st = f"  peer 0x{d.peer_status:04X}" if d.peer_status is not None else ""
    err = f"  error: {d.last_error}" if d.last_error else ""
    when = (f"  next try {_ts(d.not_before)}" if d.state is DeliveryState.PENDING
            and d.not_before else "")
    what = d.sop_instance_uid if d.kind == "dicom" else f"{d.kind} notification"
    if d.kind != "dicom" and d.peer_status is not None:  # an HTTP status, not a DIMSE one
        st = f"  peer {d.peer_status}"
    return (f"delivery {d.id:<6} {d.state.value:<8} job {d.job_id:<6} -> {d.destination:<12} "
            f"attempts {d.attempts}  {what}{st}{when}{err}")


# --------------------------------------------------------------------------- jobs


def _print_rows(rows: Sequence[T], as_json: bool, to_dict: Callable[[T], dict[str, Any]],
                to_line: Callable[[T], str], empty: str) -> None:
    """A listing: JSON (``--json``), one line per row, or ``empty`` when there is none."""
    if as_json:
        print(json.dumps([to_dict(r) for r in rows], indent=2))
    elif not rows:
        print(empty)
    else:
        for r in rows:
            print(to_line(r))


def _jobs_list(args: argparse.Namespace) -> int:
    from dicomnode.store import Store  # on use, see module docstring

    settings = settings_from_args(args)
    with Store.open(settings) as store:
        jobs = store.list_jobs(states=args.state, study_uid=args.study, series_uid=args.series,
                               limit=args.limit)
    _print_rows(jobs, args.json, job_dict, _job_line, "no jobs")
    return 0


def _jobs_show(args: argparse.Namespace) -> int:
    from dicomnode.store import Store  # on use, see module docstring

    settings = settings_from_args(args)
    with Store.open(settings) as store:
        job = store.get_job(args.job_id)
        outputs = store.job_outputs(job.id)
        deliveries = store.list_deliveries(job_id=job.id, limit=10000)
        newer = store.job_superseded_by(job.id)
    if args.json:
        out = job_dict(job)
        out["superseded_by"] = newer
        out["notes"] = job.notes
        out["attempt_log"] = list(job.attempt_log)
        out["outputs"] = [{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid,
                           "sop_class_uid": o.sop_class_uid, "path": str(o.path)}
                          for o in outputs]
        out["deliveries"] = [delivery_dict(d) for d in deliveries]
        print(json.dumps(out, indent=2))
        return 0
    print(_job_line(job))
    print(f"  worker {job.worker_id or '-'}  created {_ts(job.created_at)}  "
          f"updated {_ts(job.updated_at)}")
    if newer:
        print(f"  superseded by job {newer} (a newer version of the series)")
    for line in notes_lines(job):
        print(line)
    print(f"  outputs: {len(outputs)}")
    for o in outputs:
        print(f"    {o.kind or '-':<4} {o.sop_instance_uid}  {o.path}")
    print(f"  deliveries: {len(deliveries)}")
    for d in sorted(deliveries, key=lambda x: x.id):
        print("    " + _delivery_line(d))
    return 0


def notes_lines(job: Job) -> list[str]:
    """``jobs show``: what the pipeline left out or refused, and the earlier attempts."""
    lines: list[str] = []
    notes = job.notes
    excluded = notes.get("excluded") or []
    if isinstance(excluded, list) and excluded:
        lines.append("  left out of the volume:")
        for e in excluded:
            n = e.get("count", len(e.get("instances", ())))
            for_models = f" (for {', '.join(e['models'])})" if e.get("models") else ""
            lines.append(f"    {n} image{'s' if n != 1 else ''}: {e.get('reason')}{for_models}")
    refused = notes.get("refused") or []
    if isinstance(refused, list) and refused:
        lines.append("  models refused:")
        for r in refused:
            lines.append(f"    {r.get('model')}: {r.get('constraint')}: {r.get('reason')}")
    if job.attempt_log:
        lines.append(f"  failed attempts: {len(job.attempt_log)}")
        for a in job.attempt_log:
            kind = "transient" if a.get("transient") else "permanent"
            lines.append(f"    attempt {a.get('attempt')} at {a.get('at')} ({kind}): "
                         f"{a.get('error')}")
    return lines


def _jobs_retry(args: argparse.Namespace) -> int:
    from dicomnode.store import Store  # on use, see module docstring

    settings = settings_from_args(args)
    with Store.open(settings) as store:
        ids = list(args.job_ids)
        if args.all_failed:
            ids += [j.id for j in store.list_jobs(states=[JobState.FAILED], limit=100000)]
        if not ids:
            print("nothing to retry (give job ids or --all-failed)")
            return 0
        for i in dict.fromkeys(ids):
            j = store.retry_job(i)
            user_action(settings, "job-retry", job_id=j.id, study_uid=j.study_uid,
                        series_uid=j.series_uid)
            print(f"job {j.id}: {j.state.value} (queued again)")
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    from dicomnode.store import Store  # on use, see module docstring

    settings = settings_from_args(args)
    with Store.open(settings) as store:
        for i in dict.fromkeys(args.job_ids):
            j = store.cancel_job(i)
            user_action(settings, "job-cancel", job_id=j.id, study_uid=j.study_uid,
                        series_uid=j.series_uid)
            print(f"job {j.id}: {j.state.value}")
    return 0


# --------------------------------------------------------------------------- deliveries


def _deliveries_list(args: argparse.Namespace) -> int:
    from dicomnode.store import Store  # on use, see module docstring

    settings = settings_from_args(args)
    with Store.open(settings) as store:
        if args.study:
            job_ids = {j.id for j in store.list_jobs(study_uid=args.study, limit=100000)}
            if args.job is not None:
                job_ids &= {args.job}
            found: list[Delivery] = []
            for jid in sorted(job_ids, reverse=True):
                found += store.list_deliveries(job_id=jid, states=args.state,
                                               destination=args.destination, limit=args.limit)
            dels = sorted(found, key=lambda d: d.id, reverse=True)[:args.limit]
        else:
            dels = store.list_deliveries(job_id=args.job, states=args.state,
                                         destination=args.destination, limit=args.limit)
    _print_rows(dels, args.json, delivery_dict, _delivery_line, "no deliveries")
    return 0


def _deliveries_retry(args: argparse.Namespace) -> int:
    from dicomnode.store import Store  # on use, see module docstring

    settings = settings_from_args(args)
    with Store.open(settings) as store:
        ids = list(args.delivery_ids)
        if args.all_failed:
            ids += [d.id for d in store.list_deliveries(states=[DeliveryState.FAILED],
                                                        destination=args.destination,
                                                        limit=100000)]
        if not ids:
            print("nothing to retry (give delivery ids or --all-failed)")
            return 0
        for i in dict.fromkeys(ids):
            d = store.retry_delivery(i)
            user_action(settings, "delivery-retry", delivery_id=d.id, job_id=d.job_id,
                        destination=d.destination)
            print(f"delivery {d.id}: {d.state.value} (queued again, deadline {_ts(d.deadline)})")
    return 0
