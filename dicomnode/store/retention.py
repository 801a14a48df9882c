"""Retention: which received studies and which results may go, and their removal.

A study's instances may be purged only when nothing is owed for it: none of its
series versions is still receiving, every job of its series is terminal (done,
failed, cancelled, superseded, skipped) and every delivery of those jobs is
terminal (done or failed). A result object may be purged when its job is
terminal and every delivery of that job is. Nothing still being processed or
still to be sent to a peer is ever removed, whatever its age or the disk.

Removal order, so that a crash never brings purged data back: the paths are
written to a journal (``<storage>/.purge/<id>.json``) and the rows deleted in one
transaction; then the files are removed and the journal with them. A node that
died in between finishes the journal at its next start
(:func:`finish_journals`, called by reconciliation) instead of re-indexing the
files as newly received.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, select

from dicomnode.domain import DeliveryState, JobState
from dicomnode.store import files
from dicomnode.store._common import aware, deliveries, instances, jobs, outputs, series, studies
from dicomnode.store._common import versions as versions_t

JOURNAL_DIR = ".purge"
_OPEN_JOBS = (JobState.PENDING.value, JobState.RUNNING.value)
_OPEN_DELIVERIES = (DeliveryState.PENDING.value, DeliveryState.SENDING.value)
_RECEIVING = "receiving"


@dataclass(frozen=True)
class StudyUsage:
    """A study's stored instances, and whether they may be purged now."""

    study_id: int
    study_uid: str
    last_received: datetime
    instances: int
    bytes: int
    calling_aets: tuple[str, ...]
    blocked: str  # why not purgeable now ("" when it may be)


@dataclass(frozen=True)
class ResultUsage:
    job_id: int
    study_uid: str
    finished: datetime | None
    objects: int
    blocked: str


def _reason(receiving: int, open_jobs: int, owed: int) -> str:
    """Why a study's instances must stay ("" when nothing is owed for them)."""
    if receiving:
        return "a series is still receiving"
    if open_jobs:
        return f"{open_jobs} job(s) pending or running"
    if owed:
        return f"{owed} delivery(ies) still to be sent"
    return ""


def _receiving_q() -> Any:
    return (select(series.c.study_id, func.count())
            .select_from(versions_t.join(series, series.c.id == versions_t.c.series_id))
            .where(versions_t.c.state == _RECEIVING).group_by(series.c.study_id))


def _open_jobs_q() -> Any:
    return (select(jobs.c.study_uid, func.count()).where(jobs.c.state.in_(_OPEN_JOBS))
            .group_by(jobs.c.study_uid))


def _owed_q(key: Any) -> Any:
    """Deliveries still to be sent, counted per ``key`` (a jobs column)."""
    return (select(key, func.count())
            .select_from(deliveries.join(jobs, jobs.c.id == deliveries.c.job_id))
            .where(deliveries.c.state.in_(_OPEN_DELIVERIES)).group_by(key))


def _blocked(conn: Connection, study_id: int, study_uid: str) -> str:
    """:func:`_reason` for one study (re-checked inside the purging transaction)."""
    receiving = dict(conn.execute(_receiving_q().where(series.c.study_id == study_id)).all())
    open_jobs = dict(conn.execute(_open_jobs_q().where(jobs.c.study_uid == study_uid)).all())
    owed = dict(conn.execute(_owed_q(jobs.c.study_uid).where(
        jobs.c.study_uid == study_uid)).all())
    return _reason(receiving.get(study_id, 0), open_jobs.get(study_uid, 0),
                   owed.get(study_uid, 0))


def study_usage(conn: Connection) -> list[StudyUsage]:
    """Every study with stored instances, oldest last arrival first (a fixed number of
    grouped queries, however many studies)."""
    rows = conn.execute(
        select(studies.c.id, studies.c.study_uid, func.max(instances.c.received_at),
               func.count(instances.c.id), func.coalesce(func.sum(instances.c.size), 0))
        .select_from(instances.join(series, series.c.id == instances.c.series_id)
                     .join(studies, studies.c.id == series.c.study_id))
        .where(instances.c.file_missing.is_(False))
        .group_by(studies.c.id, studies.c.study_uid)
        .order_by(func.max(instances.c.received_at), studies.c.id)).all()
    aets: dict[int, set[str]] = {}
    for sid, aet in conn.execute(
            select(series.c.study_id, instances.c.calling_aet).distinct()
            .select_from(instances.join(series, series.c.id == instances.c.series_id))):
        if aet is not None:
            aets.setdefault(sid, set()).add(aet)
    receiving = dict(conn.execute(_receiving_q()).all())
    open_jobs = dict(conn.execute(_open_jobs_q()).all())
    owed = dict(conn.execute(_owed_q(jobs.c.study_uid)).all())
    return [StudyUsage(sid, uid, aware(last) or last, int(n), int(size),
                       tuple(sorted(aets.get(sid, ()))),
                       _reason(receiving.get(sid, 0), open_jobs.get(uid, 0), owed.get(uid, 0)))
            for sid, uid, last, n, size in rows]


def result_usage(conn: Connection) -> list[ResultUsage]:
    """Every job with result objects, oldest finish first."""
    rows = conn.execute(
        select(jobs.c.id, jobs.c.study_uid, jobs.c.finished_at, jobs.c.state,
               func.count(outputs.c.id))
        .select_from(outputs.join(jobs, jobs.c.id == outputs.c.job_id))
        .group_by(jobs.c.id, jobs.c.study_uid, jobs.c.finished_at, jobs.c.state)
        .order_by(jobs.c.finished_at, jobs.c.id)).all()
    owed = dict(conn.execute(_owed_q(jobs.c.id)).all())
    out = []
    for jid, uid, finished, state, n in rows:
        if state in _OPEN_JOBS:
            blocked = f"job {state}"
        elif owed.get(jid):
            blocked = f"{owed[jid]} delivery(ies) still to be sent"
        else:
            blocked = ""
        out.append(ResultUsage(jid, uid, aware(finished), int(n), blocked))
    return out


def take_study(conn: Connection, study_id: int, study_uid: str) -> list[str] | None:
    """In the caller's write transaction: delete the study's instance rows and return
    their relative paths, or ``None`` when something is owed for it by now."""
    if _blocked(conn, study_id, study_uid):
        return None
    sids = select(series.c.id).where(series.c.study_id == study_id)
    rows = conn.execute(select(instances.c.id, instances.c.path).where(
        instances.c.series_id.in_(sids))).all()
    ids = [r.id for r in rows]
    for chunk in range(0, len(ids), 500):  # exactly the rows whose paths are returned
        conn.execute(delete(instances).where(instances.c.id.in_(ids[chunk:chunk + 500])))
    return [r.path for r in rows]


def take_results(conn: Connection, job_id: int) -> list[str] | None:
    """In the caller's write transaction: delete a job's output rows and return their
    relative paths, or ``None`` when the job or one of its deliveries is still open."""
    state = conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar()
    if state is None or state in _OPEN_JOBS:
        return None
    if conn.execute(_owed_q(jobs.c.id).where(jobs.c.id == job_id)).first() is not None:
        return None
    paths = list(conn.execute(select(outputs.c.path).where(
        outputs.c.job_id == job_id)).scalars())
    conn.execute(delete(outputs).where(outputs.c.job_id == job_id))
    return paths


def write_journal(root: Path, paths: Sequence[str]) -> Path:
    """Record the files a purge is about to remove (durably, before the rows go)."""
    d = root / JOURNAL_DIR
    d.mkdir(parents=True, exist_ok=True)
    journal = d / f"{uuid.uuid4().hex}.json"
    files.atomic_write(journal, json.dumps({"paths": list(paths)}).encode())
    return journal


def remove_files(root: Path, paths: Iterable[str]) -> int:
    """Remove purged files (and folders left empty); returns the bytes freed."""
    freed = 0
    folders: set[Path] = set()
    for rel in paths:
        p = root / rel
        try:
            freed += p.stat().st_size
            p.unlink()
            folders.add(p.parent)
        except FileNotFoundError:
            continue
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        while folder != root and folder.is_relative_to(root):
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent
    return freed


def finish_journals(conn: Connection, root: Path) -> int:
    """Complete purges a crash interrupted: remove the journal's files whose rows are
    gone (the purge committed). Files that still have a row stay: that purge never
    committed. Returns the number of journals finished."""
    d = root / JOURNAL_DIR
    if not d.is_dir():
        return 0
    done = 0
    for journal in sorted(d.glob("*.json")):
        try:
            paths = [str(p) for p in json.loads(journal.read_text())["paths"]]
        except (OSError, ValueError, KeyError, TypeError):
            journal.unlink(missing_ok=True)
            continue
        kept = set(conn.execute(select(instances.c.path).where(
            instances.c.path.in_(paths))).scalars())
        kept |= set(conn.execute(select(outputs.c.path).where(
            outputs.c.path.in_(paths))).scalars())
        remove_files(root, [p for p in paths if p not in kept])
        journal.unlink(missing_ok=True)
        done += 1
    return done


def disk_used_percent(root: Path) -> float:
    st = os.statvfs(root if root.exists() else root.parent)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    return 100.0 * (total - free) / total if total else 0.0


__all__ = ["JOURNAL_DIR", "ResultUsage", "StudyUsage", "disk_used_percent", "finish_journals",
           "remove_files", "result_usage", "study_usage", "take_results", "take_study",
           "write_journal"]
