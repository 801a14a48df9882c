"""The :class:`Store` facade: the only owner of files and rows.

Receivers, the completeness tracker, workers and the dispatcher call this
class only; no other module issues SQL or writes under ``storage.path``.
Every method runs its own short transaction (retried on lock contention or
unique-constraint races) and returns frozen :mod:`dicomnode.domain` objects.

The facade holds no SQL itself: each method is a transaction (:meth:`Store._tx`
to write, :meth:`Store._read` to read) around a call into the module owning the
statements, plus the file handling of :mod:`dicomnode.store.files`:

* :mod:`~dicomnode.store.series`: studies, series, versions, instance rows and
  completeness (:mod:`~dicomnode.store.fastrecord`: the SQLite fast path of
  recording an instance);
* :mod:`~dicomnode.store.queue`: jobs and their outputs;
* :mod:`~dicomnode.store.outbox`: deliveries and notifications;
* :mod:`~dicomnode.store.catalog`: study / series summaries for operators;
* :mod:`~dicomnode.store.retry`: :class:`RetryStrategy`, when a failed job,
  delivery or notification is tried again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from dicomnode.audit import AuditEvent, AuditLog
from dicomnode.config import Settings
from dicomnode.domain import (
    Delivery,
    DeliveryState,
    InstanceRef,
    Job,
    JobState,
    OutputObject,
    SeriesRef,
)
from dicomnode.errors import InvalidInstanceError, StoreError
from dicomnode.logs import kv
from dicomnode.store import catalog, db, files, maintenance, outbox, queue, retention
from dicomnode.store import series as series_mod
from dicomnode.store._common import aware, naive, seconds, utcnow
from dicomnode.store._common import deliveries as deliveries_t
from dicomnode.store._common import jobs as jobs_t
from dicomnode.store.catalog import StudySummary
from dicomnode.store.fastrecord import FastRecorder
from dicomnode.store.outbox import NewDelivery
from dicomnode.store.parse import InstanceMeta, read_meta
from dicomnode.store.retry import RetryStrategy

log = logging.getLogger(__name__)
T = TypeVar("T")


class IngestOutcome(enum.StrEnum):
    STORED = "stored"  # new instance
    REPLACED = "replaced"  # duplicate SOP Instance UID, file and row replaced
    KEPT = "kept"  # duplicate SOP Instance UID, first copy kept (policy "keep")


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    instance: InstanceRef
    series_version: int
    job: Job | None = None  # the job created when this instance completed its series


@dataclass(frozen=True)
class ReconcileReport:
    indexed: tuple[Path, ...] = ()  # files found without a row, now indexed
    missing: tuple[str, ...] = ()  # SOP Instance UIDs whose file is gone (flagged)
    restored: tuple[str, ...] = ()  # rows flagged missing whose file is back
    temp_removed: int = 0  # leftover temporary files of interrupted writes
    unreadable: tuple[Path, ...] = ()  # *.dcm files that cannot be indexed


@dataclass(frozen=True)
class Purged:
    """One study's instances, or one job's results, removed (or, dry run, to remove)."""

    what: str  # "instances" | "results"
    study_uid: str
    count: int
    bytes: int
    reason: str
    job_id: int | None = None


@dataclass(frozen=True)
class PurgeReport:
    purged: tuple[Purged, ...] = ()
    kept: tuple[tuple[str, str], ...] = ()  # (study UID, why) of old studies still owed
    dry_run: bool = False

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.purged)


__all__ = ["IngestOutcome", "IngestResult", "PurgeReport", "Purged", "ReconcileReport", "Store"]

_RETRYABLE = (OperationalError, IntegrityError)


class Store:
    """Files under ``storage.path`` and rows in ``database.url``.

    Create with :meth:`open`. Thread-safe (one engine, pooled connections);
    each process opens its own Store.
    """

    def __init__(self, settings: Settings, engine: Engine,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.engine = engine
        self.root = Path(settings.storage.path).resolve()
        self._clock = clock
        self._ids = series_mod.IdCache()
        self._fsync = settings.storage.fsync
        # Threads for file durability (fsync releases the GIL), see ingest().
        self._io = ThreadPoolExecutor(max_workers=max(4, settings.node.max_associations),
                                      thread_name_prefix="store-io")
        # SQLite: the common case of recording an instance without SQLAlchemy's
        # per-statement cost (store/fastrecord.py); None elsewhere.
        self._fast = FastRecorder.for_engine(engine, settings.database.busy_timeout_ms)
        # The one retry policy: jobs, and each destination / notification target.
        self._job_retry = RetryStrategy.for_jobs(settings.worker)
        self._delivery_retry = {
            name: RetryStrategy.for_delivery(settings, name)
            for name in [d.name for d in settings.destinations]
            + [n.name for n in settings.notifications]}

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = False,
             clock: Callable[[], datetime] = utcnow) -> Store:
        """Open the store; ``migrate=True`` applies pending migrations first.

        Without ``migrate`` the schema must already be current (else
        :class:`StoreError` tells to run ``dicomnode db upgrade``).
        """
        engine = db.make_engine(settings.database)
        try:
            if migrate:
                before, after = db.upgrade(engine)
                if before != after:
                    log.info("database migrated", extra=kv(
                        url=engine.url.render_as_string(hide_password=True),
                        from_revision=before, to_revision=after))
            else:
                db.ensure_schema_current(engine)
        except Exception:
            engine.dispose()
            raise
        store = cls(settings, engine, clock)
        files.ensure_dir(store.root, fsync=False)
        return store

    def close(self) -> None:
        self._io.shutdown(wait=True)
        if self._fast is not None:
            self._fast.close()
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> datetime:
        return naive(self._clock())

    def _tx(self, fn: Callable[[Connection], T], *, attempts: int = 8) -> T:
        """Run ``fn`` in a write transaction, retrying lock and uniqueness races."""
        delay = 0.01
        for i in range(attempts):
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except _RETRYABLE as exc:
                if i == attempts - 1:
                    raise StoreError(f"database: {type(exc.orig).__name__}: {exc.orig}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except DBAPIError as exc:
                raise StoreError(f"database: {exc.orig}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn:
            conn.info["readonly"] = True
            try:
                with conn.begin():
                    return fn(conn)
            finally:
                conn.info.pop("readonly", None)

    # ------------------------------------------------------------------ instances

    def free_mb(self) -> float:
        return files.free_mb(self.root)

    def instance_path(self, meta: InstanceMeta) -> Path:
        return self.root / files.instance_relpath(meta.study_uid, meta.series_uid,
                                                  meta.sop_instance_uid)

    def ingest(self, meta: InstanceMeta,
               data: bytes | Sequence[bytes | bytearray]) -> IngestResult:
        """Store one instance durably: its file (temporary file, fsync, atomic rename,
        folder fsync) and its committed row.

        ``data`` is the complete DICOM Part 10 stream (preamble, file meta and
        dataset exactly as received). On return both are durable; on an
        exception the instance must not be acknowledged (a file written before a
        failed commit is indexed, a row whose file failed is flagged, by
        :meth:`reconcile` at the next start).
        """
        rel = files.instance_relpath(meta.study_uid, meta.series_uid, meta.sop_instance_uid)
        if self.settings.storage.duplicate_policy == "keep":
            existing = self._existing(meta.sop_instance_uid)
            if existing is not None and not existing[1]:
                return IngestResult(IngestOutcome.KEPT, self._ref(meta, existing[0]),
                                    existing[2])
        path = self.root / rel
        tmp, size = files.write_temp(path, data if isinstance(data, bytes) else list(data),
                                     fsync=self._fsync)
        # Making the file durable (fsync, rename, folder fsync) and committing its
        # row are independent; doing them at once hides the commit behind the
        # fsync. Success is returned only when both are done. A crash in between
        # leaves a file without a row or a row without a file: reconcile() at the
        # next start indexes the one and flags the other, and the sender, never
        # acknowledged, sends the instance again.
        durable = self._io.submit(files.commit_temp, tmp, path, fsync=self._fsync)
        try:
            result, replaced = self._record(meta, str(rel), size)
        except BaseException:
            with contextlib.suppress(Exception):
                durable.result()
            raise
        try:
            durable.result()
        except OSError:
            self._tx(lambda c: series_mod.flag_file_missing(c, meta.sop_instance_uid, str(rel)))
            raise
        if replaced:  # the replacement moved (other study/series): drop the old copy now
            files.remove_quietly(self.root / replaced)
        return result

    def series_usage(self, series_uid: str, except_sop_uid: str = "", *,
                     with_bytes: bool = True) -> tuple[int, int]:
        """``(instances, bytes)`` series ``series_uid`` holds (its newest version: a
        version holds every instance received before it), not counting
        ``except_sop_uid``; bytes only ``with_bytes`` (a sum over its rows)."""
        return self._read(lambda c: series_mod.series_usage(c, series_uid, except_sop_uid,
                                                            with_bytes=with_bytes))

    def quarantine(self, sop_instance_uid: str, reason: str) -> Path | None:
        """Move an instance's stored file to ``<storage>/quarantine/`` with ``reason``
        beside it (``.reason.txt``) and flag its row ``file_missing``: the series'
        jobs no longer see it and ``dicomnode db check`` counts it as quarantined.
        Sending the instance again stores it afresh (and clears the flag).
        Returns the quarantined path, or None when the instance has no row."""
        existing = self._existing(sop_instance_uid)
        if existing is None:
            return None
        rel = existing[0]
        dest = files.quarantine(self.root, rel, reason)
        self._tx(lambda c: series_mod.flag_file_missing(c, sop_instance_uid, rel))
        log.warning("instance quarantined", extra=kv(sop_instance_uid=sop_instance_uid,
                                                     path=str(dest), reason=reason))
        return dest

    def _existing(self, sop_uid: str) -> tuple[str, bool, int] | None:
        return self._read(lambda c: series_mod.existing_instance(c, sop_uid))

    def _ref(self, meta: InstanceMeta, rel: str) -> InstanceRef:
        return InstanceRef(meta.study_uid, meta.series_uid, meta.sop_instance_uid,
                           meta.sop_class_uid, self.root / rel, meta.transfer_syntax_uid,
                           meta.instance_number)

    def _record(self, meta: InstanceMeta, rel: str, size: int) -> tuple[IngestResult, str | None]:
        """Commit the row of an instance whose file is (being made) durable at ``rel``.

        Returns the result and the relative path of a replaced copy that now lies
        elsewhere (to delete once the new file is durable)."""
        now = self.now()
        cfg = self.settings.completion

        def tx(conn: Connection) -> series_mod.Recorded:
            try:
                return series_mod.record_instance(conn, meta, relpath=rel, size=size, now=now,
                                                  cache=self._ids,
                                                  use_expected_counts=cfg.use_expected_counts)
            except BaseException:
                # Ids cached inside this (now rolled back) transaction may not exist.
                self._ids = series_mod.IdCache()
                raise
        rec = None
        if self._fast is not None:
            try:
                rec = self._fast.record(meta, relpath=rel, size=size, now=now, cache=self._ids,
                                        use_expected_counts=cfg.use_expected_counts)
            except (DBAPIError, sqlite3.Error) as exc:
                raise StoreError(f"database: {exc}") from exc
        if rec is None:
            rec = self._tx(tx)
        outcome = IngestOutcome.REPLACED if rec.was_duplicate else IngestOutcome.STORED
        if rec.job is not None:
            log.info("series complete (expected count reached)", extra=kv(
                study_uid=meta.study_uid, series_uid=meta.series_uid, version=rec.version,
                job_id=rec.job.id))
        return IngestResult(outcome, self._ref(meta, rel), rec.version, rec.job), rec.replaced_path

    def backup(self, dest: Path, *, overwrite: bool = False,
               progress: Callable[[int, int], None] | None = None) -> maintenance.BackupReport:
        """Online backup of the SQLite database to ``dest`` (``dicomnode db backup``)."""
        return maintenance.backup(self.engine, dest, overwrite=overwrite, progress=progress)

    def check(self) -> maintenance.CheckReport:
        """Read-only consistency check of rows and files (``dicomnode db check``)."""
        return self._read(lambda conn: maintenance.check(conn, self.root))

    # ------------------------------------------------------------------ retention

    def storage_usage(self) -> tuple[list[retention.StudyUsage], list[retention.ResultUsage]]:
        """Stored studies and result sets, oldest first, with what holds each back."""
        return self._read(lambda c: (retention.study_usage(c), retention.result_usage(c)))

    def purge(self, *, now: datetime | None = None, dry_run: bool = False,
              older_than_days: float | None = None,
              audit: AuditLog | None = None) -> PurgeReport:
        """Apply the ``retention:`` rules (or ``older_than_days`` to every study): purge
        what nothing is owed for, oldest first; see :mod:`dicomnode.store.retention`."""
        r = self.settings.retention
        now = aware(now or self.now()) or self.now()
        studies, results = self.storage_usage()
        plan: list[tuple[retention.StudyUsage, str]] = []
        kept: list[tuple[str, str]] = []
        for st in studies:
            if older_than_days is not None:  # by hand: 0 means every study
                days, due = older_than_days, True
            else:  # the rules: 0 means no age limit
                days = r.days_for(st.calling_aets)
                due = days > 0
            if due and (now - st.last_received).total_seconds() >= days * 86400:
                if st.blocked:
                    kept.append((st.study_uid, st.blocked))
                else:
                    plan.append((st, f"older than {days:g} day(s)"))
        if r.high_water_percent and older_than_days is None:
            used = retention.disk_used_percent(self.root)
            if used > r.high_water_percent:
                low = r.low_water_percent or max(0.0, r.high_water_percent - 5)
                total, _, _ = files.disk_usage(self.root)
                need = (used - low) / 100 * total - sum(st.bytes for st, _ in plan)
                chosen = {st.study_id for st, _ in plan}
                for st in studies:
                    if need <= 0:
                        break
                    if st.study_id in chosen:
                        continue
                    if st.blocked:
                        kept.append((st.study_uid, st.blocked))
                        continue
                    plan.append((st, f"disk {used:.1f}% used, above the high-water mark "
                                     f"{r.high_water_percent:g}%"))
                    need -= st.bytes
        out: list[Purged] = []
        for st, reason in plan:
            if dry_run:
                out.append(Purged("instances", st.study_uid, st.instances, st.bytes, reason))
                continue
            done = self._purge_paths(functools.partial(
                retention.take_study, study_id=st.study_id, study_uid=st.study_uid))
            if done is None:
                kept.append((st.study_uid, "became owed while purging"))
                continue
            n, freed = done
            out.append(Purged("instances", st.study_uid, n, freed, reason))
            if audit is not None:
                audit.safe_record(AuditEvent.INSTANCES_PURGED, study_uid=st.study_uid,
                                  instances=n, bytes=freed, reason=reason)
        if r.results_days and older_than_days is None:
            for ru in results:
                if ru.blocked or ru.finished is None or \
                        (now - ru.finished).total_seconds() < r.results_days * 86400:
                    continue
                reason = f"results older than {r.results_days:g} day(s)"
                if dry_run:
                    out.append(Purged("results", ru.study_uid, ru.objects, 0, reason,
                                      ru.job_id))
                    continue
                done = self._purge_paths(functools.partial(retention.take_results,
                                                           job_id=ru.job_id))
                if done is None:
                    continue
                n, freed = done
                out.append(Purged("results", ru.study_uid, n, freed, reason, ru.job_id))
                if audit is not None:
                    audit.safe_record(AuditEvent.RESULTS_PURGED, study_uid=ru.study_uid,
                                      job_id=ru.job_id, objects=n, bytes=freed, reason=reason)
        for p in out:
            if not dry_run:
                log.info("purged", extra=kv(what=p.what, study_uid=p.study_uid, count=p.count,
                                            mb=round(p.bytes / 1e6, 1), reason=p.reason))
        return PurgeReport(tuple(out), tuple(kept), dry_run)

    def _purge_paths(self, take: Callable[[Connection], list[str] | None]
                     ) -> tuple[int, int] | None:
        """Rows out (journalled, one transaction), then files: ``(count, bytes freed)``."""
        journals: list[Path] = []

        def tx(conn: Connection) -> list[str] | None:
            paths = take(conn)
            if paths is not None:
                journals.append(retention.write_journal(self.root, paths))
            return paths

        paths = self._tx(tx)
        if paths is None:
            for j in journals:
                j.unlink(missing_ok=True)
            return None
        freed = retention.remove_files(self.root, paths)
        for j in journals:
            j.unlink(missing_ok=True)
        return len(paths), freed

    def reconcile(self) -> ReconcileReport:
        """Make rows and files agree after a crash (run before receiving).

        Files without rows are indexed (they were written but their row was not
        committed), rows without files are flagged ``file_missing``, leftover
        temporary files are removed (their C-STORE never got success).
        """
        # Purges a crash interrupted are finished first: their files must not be
        # indexed again as newly received.
        self._read(lambda c: retention.finish_journals(c, self.root))
        known = self._read(series_mod.instance_paths)
        by_uid = {uid: path for path, (uid, _) in known.items()}
        seen: set[str] = set()
        indexed: list[Path] = []
        unreadable: list[Path] = []
        found, temp_removed = files.scan_instances(self.root)
        for p in found:
            rel = str(p.relative_to(self.root))
            seen.add(rel)
            if rel in known:
                continue
            try:
                meta = read_meta(p)
                expected = files.instance_relpath(meta.study_uid, meta.series_uid,
                                                  meta.sop_instance_uid)
                if str(expected) != rel:
                    raise InvalidInstanceError(f"its UIDs belong at {expected}")
            except InvalidInstanceError as exc:
                log.warning("cannot index stored file", extra=kv(path=str(p), error=str(exc)))
                unreadable.append(p)
                continue
            row_path = by_uid.get(meta.sop_instance_uid)
            if row_path is not None and (self.root / row_path).exists():
                # A copy left behind when the instance was re-sent under other
                # study/series UIDs: the row's newer file wins.
                log.warning("stale copy of an instance stored elsewhere", extra=kv(
                    path=str(p), sop_instance_uid=meta.sop_instance_uid,
                    current=row_path))
                unreadable.append(p)
                continue
            _, replaced = self._record(meta, rel, p.stat().st_size)
            if replaced:  # an older copy of this instance under other UIDs' folders
                files.remove_quietly(self.root / replaced)
            indexed.append(p)
        missing = [uid for rel, (uid, flagged) in known.items() if rel not in seen and not flagged]
        restored = [uid for rel, (uid, flagged) in known.items() if rel in seen and flagged]

        def flag(conn: Connection) -> None:
            series_mod.set_file_missing(conn, missing, True)
            series_mod.set_file_missing(conn, restored, False)
        if missing or restored:
            self._tx(flag)
        report = ReconcileReport(tuple(indexed), tuple(missing), tuple(restored), temp_removed,
                                 tuple(unreadable))
        log.info("store reconciled with database", extra=kv(
            files_indexed=len(indexed), rows_missing_file=len(missing),
            rows_restored=len(restored), temp_removed=temp_removed,
            unreadable=len(unreadable)))
        for uid in missing[:20]:
            log.warning("instance row without file", extra=kv(sop_instance_uid=uid))
        return report

    # ------------------------------------------------------------------ series

    def complete_quiet_series(self, now: datetime | None = None) -> list[Job]:
        """Complete every version quiet for ``completion.series_quiet_seconds``; return new jobs."""
        now = naive(now) if now is not None else self.now()
        cutoff = now - seconds(self.settings.completion.series_quiet_seconds)
        jobs_made: list[Job] = []
        for vid in self._read(lambda c: series_mod.quiet_versions(c, cutoff)):
            job = self._tx(lambda c, v=vid: series_mod.complete_version(  # type: ignore[misc]
                c, v, by="quiet", now=now, quiet_cutoff=cutoff))
            if job is not None:
                jobs_made.append(job)
                log.info("series complete (quiet)", extra=kv(
                    study_uid=job.study_uid, series_uid=job.series_uid,
                    version=job.series_version, job_id=job.id))
        return jobs_made

    def series_instances(self, series_uid: str, version: int | None = None) -> list[InstanceRef]:
        """Instances of a series version (default: newest), ordered by Instance Number.

        A version holds every instance received up to it (versions are
        cumulative); instances whose file is missing are left out.
        """
        return self._read(lambda c: series_mod.instance_refs(c, series_uid, version, self.root))

    def series_ref(self, series_uid: str, version: int | None = None) -> SeriesRef:
        return self._read(lambda c: series_mod.series_ref(c, series_uid, version))

    def studies(self, study_uid: str | None = None, limit: int = 200) -> list[StudySummary]:
        """What was received: per study, per series (newest version), counts and job state."""
        return self._read(lambda c: catalog.study_summaries(c, study_uid=study_uid, limit=limit))

    # ------------------------------------------------------------------ outputs

    def write_output(self, job_id: int, sop_instance_uid: str, sop_class_uid: str,
                     data: bytes | Any, kind: str = "") -> OutputObject:
        """Durably write an object the node produced for ``job_id``.

        ``data`` is a Part 10 byte stream or a pydicom ``Dataset`` (written with
        its file meta). The object is recorded for the job when the job is
        finished with it (:meth:`finish_job`).
        """
        if not isinstance(data, bytes | bytearray):
            buf = BytesIO()
            data.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        path = self.root / files.output_relpath(job_id, sop_instance_uid)
        files.check_uid("SOPClassUID", sop_class_uid)
        files.atomic_write(path, bytes(data), fsync=self._fsync)
        return OutputObject(sop_instance_uid, sop_class_uid, path, kind)

    def job_outputs(self, job_id: int) -> list[OutputObject]:
        return self._read(lambda c: queue.outputs_of(c, job_id, self.root))

    # ------------------------------------------------------------------ jobs

    def enqueue(self, series_uid: str, version: int | None = None, *,
                priority: int = 0) -> Job:
        """Create (or return) the job for a series version, e.g. to re-run a series by command."""
        now = self.now()

        return self._tx(lambda c: series_mod.enqueue_version(
            c, series_uid=series_uid, version=version, priority=priority, now=now))

    def claim_job(self, worker_id: str, lease_seconds: float | None = None) -> Job | None:
        """Atomically claim the most urgent due job, or ``None``.

        Due: pending with ``not_before`` passed, or running with an expired lease
        (its worker died). The claim increments ``attempts``; a job whose lease
        expired ``worker.max_attempts`` times is failed instead.
        """
        w = self.settings.worker
        now = self.now()
        return self._tx(lambda c: queue.claim(
            c, worker_id=worker_id, lease_seconds=lease_seconds or w.lease_seconds,
            max_attempts=w.max_attempts, now=now))

    def heartbeat(self, job_id: int, worker_id: str, lease_seconds: float | None = None) -> bool:
        """Extend the lease; ``False`` means the job is no longer this worker's (stop work)."""
        now = self.now()
        return self._tx(lambda c: queue.heartbeat(
            c, job_id=job_id, worker_id=worker_id,
            lease_seconds=lease_seconds or self.settings.worker.lease_seconds, now=now))

    def finish_job(self, job_id: int, worker_id: str, outputs: Iterable[OutputObject] = (),
                   deliveries: Iterable[NewDelivery] = (),
                   notes: Mapping[str, Any] | None = None) -> Job:
        """Finish a running job: record its outputs and queue its deliveries, atomically.

        If a newer version of the series has a job already, this job ends
        ``superseded`` and its deliveries are not queued (the newer job's results
        cover the whole series). Raises :class:`StoreError` if the lease was lost.
        ``notes`` (images left out, models refused) are kept with the job; its
        ``last_error`` is cleared (earlier attempts stay in its attempt log).
        """
        now = self.now()
        outs = list(outputs)
        dels = list(deliveries)

        def tx(conn: Connection) -> Job:
            if outs:
                queue.record_outputs(conn, job_id, outs, self.root, now)
            state = queue.finish(conn, job_id=job_id, worker_id=worker_id, now=now,
                                 notes=notes)
            if state is JobState.DONE:
                for d in dels:
                    self._add_delivery(conn, job_id, d, now)
            elif dels:
                log.info("job superseded: deliveries not queued", extra=kv(
                    job_id=job_id, deliveries=len(dels)))
            return queue.get(conn, job_id)
        return self._tx(tx, attempts=3)

    def _add_delivery(self, conn: Connection, job_id: int, d: NewDelivery, now: datetime) -> None:
        relpath = ""  # a notification has no file: its message is built from the payload
        if not d.is_notification:
            p = Path(d.output.path)
            try:
                rel = p.resolve().relative_to(self.root) if p.is_absolute() else p
            except ValueError:
                raise StoreError(f"delivery of {p}: not under the storage path "
                                 f"{self.root}") from None
            relpath = str(rel)
        deadline = naive(d.deadline) if d.deadline else self._default_deadline(d.destination, now)
        outbox.add(conn, job_id=job_id, destination=d.destination,
                   sop_instance_uid=d.output.sop_instance_uid,
                   sop_class_uid=d.output.sop_class_uid, relpath=relpath, deadline=deadline,
                   now=now, kind=d.kind, payload=d.payload)

    def retry_strategy(self, destination: str) -> RetryStrategy:
        """The retry policy of the destination or notification target ``destination``
        (its ``retry_deadline_seconds``, ``worker.backoff_*``); one no longer configured
        keeps the backoff and has no deadline."""
        strategy = self._delivery_retry.get(destination)
        return strategy if strategy is not None else RetryStrategy.for_delivery(
            self.settings, destination)

    def _default_deadline(self, destination: str, now: datetime) -> datetime | None:
        """``retry_deadline_seconds`` of the destination or notification target so named."""
        return self.retry_strategy(destination).deadline_from(now)

    def fail_job(self, job_id: int, worker_id: str, reason: str, *, transient: bool,
                 notes: Mapping[str, Any] | None = None) -> Job:
        """Fail a running job. Transient failures go back to pending after exponential
        backoff (``worker.backoff_base_seconds`` doubling, capped at
        ``worker.backoff_max_seconds``) until ``worker.max_attempts``; then, or
        when not transient, the job is ``failed`` with ``reason`` (the jobs'
        :class:`RetryStrategy` decides)."""
        now = self.now()
        return self._tx(lambda c: queue.fail(
            c, job_id=job_id, worker_id=worker_id, reason=reason, transient=transient,
            strategy=self._job_retry, now=now, notes=notes), attempts=3)

    def skip_job(self, job_id: int, worker_id: str, reason: str,
                 notes: Mapping[str, Any] | None = None) -> Job:
        """End a running job ``skipped``: nothing to do, for ``reason`` (kept in its notes).

        The earlier version's job it superseded after success is current again
        (see :func:`dicomnode.store.queue.skip`).
        """
        now = self.now()
        return self._tx(lambda c: queue.skip(c, job_id=job_id, worker_id=worker_id,
                                             reason=reason, notes=notes or {}, now=now),
                        attempts=3)

    def job_handed_back_to(self, job_id: int) -> Job | None:
        """The earlier, successful job that stays current if ``job_id`` is skipped."""
        return self._read(lambda c: queue.handed_back_to(c, job_id=job_id))

    def retry_job(self, job_id: int) -> Job:
        now = self.now()
        return self._tx(lambda c: queue.retry(c, job_id=job_id, now=now), attempts=3)

    def cancel_job(self, job_id: int) -> Job:
        now = self.now()
        return self._tx(lambda c: queue.cancel(c, job_id=job_id, now=now), attempts=3)

    def set_job_priority(self, job_id: int, priority: int) -> bool:
        """Set a *pending* job's priority (routing decides it after the job exists);
        ``False`` if the job is no longer pending."""
        now = self.now()

        return self._tx(lambda c: queue.set_priority(c, job_id=job_id, priority=priority,
                                                     now=now), attempts=3)

    def get_job(self, job_id: int) -> Job:
        return self._read(lambda c: queue.get(c, job_id))

    def job_superseded_by(self, job_id: int) -> int | None:
        """Id of the job (of a newer series version) that supersedes ``job_id``, if any."""
        self.get_job(job_id)
        return self._read(lambda c: queue.superseded_by(c, job_id))

    def list_jobs(self, *, states: Sequence[JobState | str] = (), study_uid: str | None = None,
                  series_uid: str | None = None, limit: int = 100) -> list[Job]:
        st = [JobState(s) for s in states]
        return self._read(lambda c: queue.list_jobs(c, states=st, study_uid=study_uid,
                                                    series_uid=series_uid, limit=limit))

    # ------------------------------------------------------------------ deliveries (outbox)

    def claim_deliveries(self, destination: str, worker_id: str, *, limit: int = 16,
                         lease_seconds: float = 300.0) -> list[Delivery]:
        """Claim due deliveries for one destination (state becomes ``sending``)."""
        now = self.now()
        return self._tx(lambda c: outbox.claim(
            c, destination=destination, worker_id=worker_id, limit=limit,
            lease_seconds=lease_seconds, now=now, root=self.root))

    def delivery_done(self, delivery_id: int, peer_status: int | None = 0) -> Delivery:
        now = self.now()
        return self._tx(lambda c: outbox.mark_done(c, delivery_id=delivery_id,
                                                   peer_status=peer_status, now=now,
                                                   root=self.root), attempts=3)

    def delivery_failed(self, delivery_id: int, error: str, *, transient: bool,
                        peer_status: int | None = None,
                        max_attempts: int | None = None) -> Delivery:
        """Record a failed send: retried with backoff while transient and before the
        deadline (and below ``max_attempts``, default ``worker.max_attempts``), else
        ``failed``. The dispatcher passes a large ``max_attempts`` so that only the
        destination's retry deadline bounds the retries."""
        now = self.now()
        limit = self.settings.worker.max_attempts if max_attempts is None else max_attempts

        def tx(c: Connection) -> Delivery:
            d = outbox.get(c, delivery_id, self.root)
            strategy = dataclasses.replace(self.retry_strategy(d.destination),
                                           max_attempts=limit)
            return outbox.mark_failed(c, delivery=d, error=error, transient=transient,
                                      peer_status=peer_status, strategy=strategy, now=now,
                                      root=self.root)
        return self._tx(tx, attempts=3)

    def retry_delivery(self, delivery_id: int) -> Delivery:
        """Operator command: a failed delivery goes back to pending with a fresh deadline."""
        now = self.now()

        def tx(c: Connection) -> Delivery:
            d = outbox.get(c, delivery_id, self.root)
            return outbox.retry(c, delivery_id=delivery_id,
                                deadline=self._default_deadline(d.destination, now), now=now,
                                root=self.root)
        return self._tx(tx, attempts=3)

    def delivery_holders(self) -> list[str]:
        """Ids of the dispatchers holding deliveries in ``sending`` (to find dead ones)."""
        return self._read(outbox.sending_holders)

    def release_deliveries(self, worker_ids: Sequence[str]) -> int:
        """Put the ``sending`` deliveries of these dead dispatchers back to ``pending`` now,
        instead of waiting for their lease; returns how many."""
        now = self.now()
        return self._tx(lambda c: outbox.release(c, worker_ids=worker_ids, now=now))

    def list_deliveries(self, *, job_id: int | None = None,
                        states: Sequence[DeliveryState | str] = (),
                        destination: str | None = None, limit: int = 100) -> list[Delivery]:
        st = [DeliveryState(s) for s in states]
        return self._read(lambda c: outbox.list_(c, root=self.root, job_id=job_id, states=st,
                                                 destination=destination, limit=limit))

    # ------------------------------------------------------------------ operations

    def ping(self) -> None:
        """Raise :class:`StoreError` unless the database answers a query now.

        SQLite: its file must still be at its path (an open connection keeps
        answering from a file renamed or deleted under it).
        """
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            path = Path(str(url.database))
            if not path.is_file():
                raise StoreError(f"database file {path} is missing")
        try:
            self._read(lambda c: c.execute(select(1)).scalar())
        except DBAPIError as exc:
            raise StoreError(f"database: {exc.orig}") from exc

    def queue_depth(self) -> list[tuple[str, int, int]]:
        """``(state, priority, count)`` of the jobs, one row per pair present."""
        q = (select(jobs_t.c.state, jobs_t.c.priority, func.count())
             .group_by(jobs_t.c.state, jobs_t.c.priority))
        return self._read(lambda c: [(str(r[0]), int(r[1]), int(r[2]))
                                     for r in c.execute(q)])

    def outbox_depth(self) -> list[tuple[str, str, int]]:
        """``(destination, state, count)`` of the deliveries and notifications."""
        q = (select(deliveries_t.c.destination, deliveries_t.c.state, func.count())
             .group_by(deliveries_t.c.destination, deliveries_t.c.state))
        return self._read(lambda c: [(str(r[0]), str(r[1]), int(r[2]))
                                     for r in c.execute(q)])
