"""Job queue: enqueue, atomic claim with a lease, heartbeat, finish, fail/retry, cancel.

Functions here take an open :class:`~sqlalchemy.Connection` inside a write
transaction; :class:`dicomnode.store.Store` owns the transactions. Claims are
atomic on both backends:

* PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` picks a row no other
  claimer holds, then it is updated in the same transaction.
* SQLite: the write transaction starts with ``BEGIN IMMEDIATE`` (one writer at
  a time) and the update is a compare-and-set (``UPDATE ... WHERE id=:id AND
  <still claimable>``), checked by its row count.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update

from dicomnode.domain import Job, JobState, OutputObject
from dicomnode.errors import StoreError
from dicomnode.store._common import aware, jobs, outputs, seconds
from dicomnode.store.retry import RetryStrategy


def _json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:  # written by this module only; a damaged value is shown as nothing
        return default


def _log_entry(job: Any, error: str, transient: bool, now: datetime) -> str:
    """``attempt_log`` with one more failed attempt of ``job`` appended (JSON)."""
    log = _json(job.attempt_log, [])
    log.append({"attempt": job.attempts, "at": now.isoformat(timespec="seconds"),
                "error": error[:4000], "transient": transient, "worker": job.worker_id})
    return json.dumps(log[-50:])  # a job retried forever keeps its last 50 attempts


#: ``superseded_state`` of a job that finished while superseded (results not sent).
UNSENT = "done-unsent"


def row_to_job(r: Any) -> Job:
    return Job(
        id=r.id,
        study_uid=r.study_uid,
        series_uid=r.series_uid,
        series_version=r.series_version,
        state=JobState(r.state),
        attempts=r.attempts,
        priority=r.priority,
        not_before=aware(r.not_before),
        lease_until=aware(r.lease_until),
        worker_id=r.worker_id,
        last_error=r.last_error,
        created_at=aware(r.created_at),
        updated_at=aware(r.updated_at),
        attempt_log=tuple(_json(r.attempt_log, [])),
        notes=_json(r.notes, {}),
    )


def get(conn: Connection, job_id: int, *, lock: bool = False) -> Job:
    q = select(jobs).where(jobs.c.id == job_id)
    if lock and conn.dialect.name == "postgresql":
        q = q.with_for_update()
    r = conn.execute(q).first()
    if r is None:
        raise StoreError(f"job {job_id}: no such job")
    return row_to_job(r)


def superseded_by(conn: Connection, job_id: int) -> int | None:
    return conn.execute(select(jobs.c.superseded_by).where(jobs.c.id == job_id)).scalar()


def enqueue(conn: Connection, *, series_version_id: int, study_uid: str, series_uid: str,
            version: int, priority: int, now: datetime) -> Job:
    """Create the job of a series version (idempotent) and supersede older versions' jobs.

    Older jobs of the same series: pending / failed ones become ``superseded``
    (never run); done ones become ``superseded`` with ``superseded_by`` set (their
    outputs stay recorded); a running one only gets the pointer, and
    :func:`finish` marks it superseded when it ends.
    """
    existing = conn.execute(select(jobs).where(jobs.c.series_uid == series_uid,
                                               jobs.c.series_version == version)).first()
    if existing is not None:
        return row_to_job(existing)
    new_id = conn.execute(jobs.insert().values(
        series_version_id=series_version_id, study_uid=study_uid, series_uid=series_uid,
        series_version=version, state=JobState.PENDING.value, priority=priority, attempts=0,
        created_at=now, updated_at=now,
    )).inserted_primary_key[0]  # type: ignore[index]
    older = and_(jobs.c.series_uid == series_uid, jobs.c.series_version < version,
                 jobs.c.superseded_by.is_(None))
    conn.execute(update(jobs).where(older, jobs.c.state.in_(
        [JobState.PENDING.value, JobState.FAILED.value, JobState.DONE.value]))
        .values(state=JobState.SUPERSEDED.value, superseded_by=new_id, updated_at=now,
                lease_until=None, superseded_state=jobs.c.state))
    conn.execute(update(jobs).where(older).values(superseded_by=new_id, updated_at=now))
    return get(conn, int(new_id))


def _claimable(now: datetime) -> Any:
    return or_(
        and_(jobs.c.state == JobState.PENDING.value,
             or_(jobs.c.not_before.is_(None), jobs.c.not_before <= now)),
        and_(jobs.c.state == JobState.RUNNING.value, jobs.c.lease_until < now),
    )


def claim(conn: Connection, *, worker_id: str, lease_seconds: float, max_attempts: int,
          now: datetime) -> Job | None:
    """Claim the most urgent due job (priority desc, then oldest) for ``worker_id``."""
    # A job whose lease expired max_attempts times is not handed out again.
    conn.execute(update(jobs).where(
        jobs.c.state == JobState.RUNNING.value, jobs.c.lease_until < now,
        jobs.c.attempts >= max_attempts,
    ).values(state=JobState.FAILED.value, finished_at=now, updated_at=now, lease_until=None,
             last_error=func.coalesce(jobs.c.last_error, "")
             + f"lease expired after {max_attempts} attempt(s) (worker lost)"))
    pg = conn.dialect.name == "postgresql"
    for _ in range(50):
        q = (select(jobs.c.id).where(_claimable(now))
             .order_by(jobs.c.priority.desc(), jobs.c.id).limit(1))
        if pg:
            q = q.with_for_update(skip_locked=True)
        job_id = conn.execute(q).scalar()
        if job_id is None:
            return None
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        extra: dict[str, Any] = {}
        if row is not None and row.state == JobState.RUNNING.value:
            # Reclaimed: the previous attempt's worker stopped renewing its lease.
            extra["attempt_log"] = _log_entry(
                row, f"lease expired: worker {row.worker_id} stopped (crashed or killed)",
                True, now)
        res = conn.execute(update(jobs).where(jobs.c.id == job_id, _claimable(now)).values(
            state=JobState.RUNNING.value, attempts=jobs.c.attempts + 1, worker_id=worker_id,
            lease_until=now + seconds(lease_seconds), updated_at=now, not_before=None, **extra))
        if res.rowcount == 1:
            return get(conn, job_id)
    return None  # pragma: no cover - only under pathological contention


def heartbeat(conn: Connection, *, job_id: int, worker_id: str, lease_seconds: float,
              now: datetime) -> bool:
    res = conn.execute(update(jobs).where(
        jobs.c.id == job_id, jobs.c.state == JobState.RUNNING.value,
        jobs.c.worker_id == worker_id,
    ).values(lease_until=now + seconds(lease_seconds), updated_at=now))
    return res.rowcount == 1


def _owned(conn: Connection, job_id: int, worker_id: str) -> Job:
    job = get(conn, job_id, lock=True)
    if job.state is not JobState.RUNNING or job.worker_id != worker_id:
        raise StoreError(
            f"job {job_id}: not running for worker {worker_id!r} (state {job.state.value}, "
            f"worker {job.worker_id!r}): the lease was lost"
        )
    return job


def record_outputs(conn: Connection, job_id: int, objs: Iterable[OutputObject], root: Path,
                   now: datetime) -> None:
    for o in objs:
        p = Path(o.path)
        try:
            rel = p.resolve().relative_to(root.resolve()) if p.is_absolute() else p
        except ValueError:
            raise StoreError(f"output {o.path}: not under the storage path {root}") from None
        # A job re-run by command (``jobs retry`` of a done job) produces the same
        # deterministic UIDs again: the row is replaced, not duplicated.
        conn.execute(outputs.delete().where(outputs.c.job_id == job_id,
                                            outputs.c.sop_instance_uid == o.sop_instance_uid))
        conn.execute(outputs.insert().values(
            job_id=job_id, sop_instance_uid=o.sop_instance_uid, sop_class_uid=o.sop_class_uid,
            kind=o.kind, path=str(rel), created_at=now))


def finish(conn: Connection, *, job_id: int, worker_id: str, now: datetime,
           notes: Mapping[str, Any] | None = None) -> JobState:
    """Mark a running job done (or superseded if a newer version's job exists).

    ``last_error`` is cleared: the errors of earlier attempts stay in the
    attempt log, not as the error of a job that succeeded.
    """
    _owned(conn, job_id, worker_id)
    state = JobState.SUPERSEDED if superseded_by(conn, job_id) is not None else JobState.DONE
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(
        state=state.value, finished_at=now, updated_at=now, lease_until=None, last_error=None,
        notes=json.dumps(dict(notes)) if notes else None,
        # Finished after a newer version existed: its deliveries were not queued, so
        # it must not become current again (see handed_back_to).
        superseded_state=UNSENT if state is JobState.SUPERSEDED else None))
    return state


def handed_back_to(conn: Connection, *, job_id: int) -> Job | None:
    """The job whose result stays current if job ``job_id`` is skipped, or ``None``.

    That is the newest earlier version's job of the same series that succeeded:
    superseded by this job after it was done (and its results queued), or done
    and current (this job was skipped before and is run again). A job that
    finished only after this one existed queued no deliveries: it is not
    handed back to, and this job runs.
    """
    job = get(conn, job_id)
    r = conn.execute(select(jobs).where(
        jobs.c.series_uid == job.series_uid, jobs.c.series_version < job.series_version,
        or_(and_(jobs.c.superseded_by == job_id,
                 jobs.c.superseded_state == JobState.DONE.value),
            and_(jobs.c.state == JobState.DONE.value, jobs.c.superseded_by.is_(None))),
    ).order_by(jobs.c.series_version.desc()).limit(1)).first()
    return None if r is None else row_to_job(r)


def skip(conn: Connection, *, job_id: int, worker_id: str, reason: str,
         notes: Mapping[str, Any], now: datetime) -> Job:
    """End a running job ``skipped`` (nothing to do, ``reason`` in its notes).

    The job it superseded after success becomes current again (``done``, no
    ``superseded_by``): a version that brought only images the loader leaves
    out does not replace a good result with nothing.
    """
    _owned(conn, job_id, worker_id)
    body = dict(notes)
    body["skipped"] = reason[:4000]
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(
        state=JobState.SKIPPED.value, finished_at=now, updated_at=now, lease_until=None,
        last_error=None, notes=json.dumps(body)))
    conn.execute(update(jobs).where(
        jobs.c.superseded_by == job_id, jobs.c.superseded_state == JobState.DONE.value,
    ).values(state=JobState.DONE.value, superseded_by=None, superseded_state=None,
             updated_at=now))
    return get(conn, job_id)


def fail(conn: Connection, *, job_id: int, worker_id: str, reason: str, transient: bool,
         strategy: RetryStrategy, now: datetime, notes: Mapping[str, Any] | None = None) -> Job:
    """Fail a running job: back to pending at the ``strategy``'s next attempt time, or
    ``failed`` (``superseded`` if a newer version's job exists). The attempt and
    its error are appended to the job's attempt log."""
    job = _owned(conn, job_id, worker_id)
    row = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
    decision = strategy.decide(attempts=job.attempts, now=now, transient=transient)
    superseded = superseded_by(conn, job_id) is not None
    if decision.retry_at is not None and not superseded:
        values: dict[str, Any] = dict(state=JobState.PENDING.value,
                                      not_before=decision.retry_at, lease_until=None)
    else:
        if transient and decision.retry_at is None:
            reason = f"{reason} ({decision.reason})"
        final = JobState.SUPERSEDED if superseded else JobState.FAILED
        values = dict(state=final.value, finished_at=now, lease_until=None)
        if superseded:
            values["superseded_state"] = JobState.FAILED.value
    if notes:
        values["notes"] = json.dumps(dict(notes))
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(
        last_error=reason[:4000], updated_at=now,
        attempt_log=_log_entry(row, reason, transient, now), **values))
    return get(conn, job_id)


def retry(conn: Connection, *, job_id: int, now: datetime) -> Job:
    """Put a failed / cancelled / done job back in the queue (operator command)."""
    job = get(conn, job_id, lock=True)
    if job.state in (JobState.PENDING, JobState.RUNNING):
        raise StoreError(f"job {job_id}: is {job.state.value}; only finished jobs can be retried")
    if job.state is JobState.SUPERSEDED:
        raise StoreError(f"job {job_id}: superseded by job {superseded_by(conn, job_id)}; "
                         "retry that one instead")
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(
        state=JobState.PENDING.value, attempts=0, not_before=None, lease_until=None,
        worker_id=None, finished_at=None, updated_at=now))
    return get(conn, job_id)


def cancel(conn: Connection, *, job_id: int, now: datetime) -> Job:
    """Cancel a pending or running job (a running worker sees it on its next heartbeat)."""
    job = get(conn, job_id, lock=True)
    if job.state not in (JobState.PENDING, JobState.RUNNING, JobState.FAILED):
        raise StoreError(f"job {job_id}: is {job.state.value}; cannot cancel")
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(
        state=JobState.CANCELLED.value, lease_until=None, finished_at=now, updated_at=now))
    return get(conn, job_id)


def list_jobs(conn: Connection, *, states: Sequence[JobState] = (), study_uid: str | None = None,
              series_uid: str | None = None, limit: int = 100) -> list[Job]:
    q = select(jobs)
    if states:
        q = q.where(jobs.c.state.in_([JobState(s).value for s in states]))
    if study_uid:
        q = q.where(jobs.c.study_uid == study_uid)
    if series_uid:
        q = q.where(jobs.c.series_uid == series_uid)
    q = q.order_by(jobs.c.id.desc()).limit(limit)
    return [row_to_job(r) for r in conn.execute(q)]


def set_priority(conn: Connection, *, job_id: int, priority: int, now: datetime) -> bool:
    """Set a *pending* job's priority; ``False`` if it is no longer pending."""
    res = conn.execute(update(jobs).where(jobs.c.id == job_id,
                                          jobs.c.state == JobState.PENDING.value)
                       .values(priority=priority, updated_at=now))
    return bool(res.rowcount)


def outputs_of(conn: Connection, job_id: int, root: Path) -> list[OutputObject]:
    """The objects recorded for a job, in the order they were recorded."""
    rows = conn.execute(select(outputs).where(outputs.c.job_id == job_id).order_by(outputs.c.id))
    return [OutputObject(r.sop_instance_uid, r.sop_class_uid, root / r.path, r.kind)
            for r in rows]
