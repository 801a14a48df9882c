"""The pipeline: the only module that knows the order of the stages.

::

    claim job (lease) -> load series version -> route -> load volume -> run models
        -> encode per destination formats -> write outputs -> ONE transaction:
           record outputs + queue deliveries (outbox) + finish the job

and, beside it, the dispatcher loop that drains the outbox::

    claim due deliveries of a destination -> one association per batch (C-STORE SCU)
        -> done | retry with backoff | failed (with the peer's status) after the deadline

Processes
---------
``dicomnode serve`` starts :func:`services` (the node's service hook): ``worker.processes``
worker processes and one dispatcher process, so inference never runs in the
SCP's process; ``dicomnode worker`` runs the same services alone against the
same database. Any number of workers and dispatchers may share a database:
jobs and deliveries are claimed atomically with a lease.

Failures
--------
:func:`classify` decides. Bad data or configuration (:class:`VolumeError`,
:class:`ModelError`, :class:`EncodeError`, :class:`RoutingError`, an invalid
instance, an unexpected exception in a model) is *permanent*: the job ends
``failed`` with the reason, visible in ``dicomnode jobs list`` and re-triable
with ``dicomnode jobs retry``. Storage and OS trouble (database locked, disk
full, a file briefly missing) is *transient*: the job goes back to ``pending``
with exponential backoff (``worker.backoff_*``) until ``worker.max_attempts``.
A worker that dies leaves its job ``running`` with a lease; another worker
reclaims it when the lease expires (a live worker renews its lease with a
heartbeat thread while a long model runs).

Superseded versions ("replace")
-------------------------------
A late instance after completion creates series version N+1 and its job; the
store marks the older job ``superseded``. The results of version N+1 carry
UIDs derived from the version, so they are *new* objects: a new SEG / SR
Series Instance UID in the same study. Nothing is deleted in the PACS (C-STORE
cannot delete, and a radiologist may have read the old result); the newest
says so: its Series Description ends in `` vN`` (N = the series version, for
N > 1), same Series Number, later Series Date/Time. A job superseded while it
ran finishes ``superseded`` and queues no deliveries, so an outdated result is
never sent after the newer one.

Routing without rules
---------------------
With no ``routes:`` configured the node uses an embedded default: every model
whose manifest applies to the series (modality, body part, description,
slice count) runs, and the results are stored (nothing is sent, as no
destination is configured). ``make run`` therefore does its main job out of
the box; configure routes to send results to a PACS.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from dicomnode.config import DestinationConfig, NotificationConfig, Settings
from dicomnode.domain import (
    Delivery,
    InferenceResult,
    InstanceRef,
    Job,
    JobState,
    OutputObject,
    SeriesRef,
)
from dicomnode.errors import (
    ConfigError,
    DicomNodeError,
    EncodeError,
    InvalidInstanceError,
    ModelError,
    RoutingError,
    StoreError,
    VolumeError,
)
from dicomnode.logs import kv, setup_logging
from dicomnode.routing import RouteDecision, RoutingTable, SendTarget, representative
from dicomnode.store import NewDelivery, Store

log = logging.getLogger(__name__)

#: Deliveries are bounded by their destination's retry deadline, not by a count.
_NO_ATTEMPT_LIMIT = 1_000_000


# --------------------------------------------------------------------------- failures


class LeaseLost(DicomNodeError):
    """The job is no longer ours (cancelled, or reclaimed after our lease expired)."""


def classify(exc: BaseException) -> tuple[bool, str]:
    """``(transient, reason)`` for a failure while processing a job.

    Permanent: the input or the configuration is wrong, or the model itself
    crashed; retrying the same data gives the same answer. Transient: the
    database, the disk or the OS had trouble that may pass.
    """
    name = type(exc).__name__
    text = str(exc) or name
    if isinstance(exc, VolumeError):
        return False, f"volume: {text}"
    if isinstance(exc, ModelError):
        return False, f"model: {text}"
    if isinstance(exc, EncodeError):
        return False, f"encode: {text}"
    if isinstance(exc, RoutingError | ConfigError):
        return False, f"routing: {text}"
    if isinstance(exc, InvalidInstanceError):
        return False, f"instance: {text}"
    if isinstance(exc, StoreError):
        return True, f"store: {text}"
    if isinstance(exc, MemoryError):
        return True, "out of memory"
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True, f"{name}: {text}"
    # An unexpected exception inside a model or encoder is a bug for this
    # input; running it again only burns compute.
    return False, f"unexpected {name}: {text}"


# --------------------------------------------------------------------------- helpers


@dataclass
class JobReport:
    """What one job did (returned by :meth:`Pipeline.process`, logged as ``job done``)."""

    job_id: int
    state: JobState
    rule: str | None = None
    models: tuple[str, ...] = ()
    outputs: tuple[OutputObject, ...] = ()
    deliveries: tuple[tuple[str, str], ...] = ()  # (destination, SOP Instance UID)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class _Heartbeat:
    """Renews a job's lease from a thread while the pipeline works.

    The interval is a quarter of the lease (at most 30 s), so a live worker
    keeps its job through a long model run while a dead one loses it after
    ``worker.lease_seconds``.
    """

    def __init__(self, store: Store, job_id: int, worker_id: str, lease: float,
                 timeout: float = 0.0, on_timeout: Callable[[], None] | None = None) -> None:
        self.store, self.job_id, self.worker_id, self.lease = store, job_id, worker_id, lease
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.interval = max(0.2, min(30.0, lease / 4, timeout / 4 if timeout else 30.0))
        self.lost = threading.Event()
        self.timed_out = threading.Event()
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}",
                                        daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.timeout and time.monotonic() - self._started > self.timeout:
                self._expire()
                return
            try:
                if not self.store.heartbeat(self.job_id, self.worker_id, self.lease):
                    log.warning("job lease lost (cancelled or reclaimed)", extra=kv(
                        job_id=self.job_id, worker=self.worker_id))
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - the next beat retries; the lease has slack
                log.exception("heartbeat failed", extra=kv(job_id=self.job_id))

    def _expire(self) -> None:
        """The job ran past ``worker.job_timeout_seconds``: fail it (transient) and stop."""
        reason = (f"timed out after {self.timeout:g} s (worker.job_timeout_seconds); "
                  "the worker process was restarted")
        log.error("job timed out", extra=kv(job_id=self.job_id, worker=self.worker_id,
                                            timeout_s=self.timeout))
        try:
            self.store.fail_job(self.job_id, self.worker_id, reason, transient=True)
        except Exception:  # noqa: BLE001 - the lease expires anyway; another worker reclaims
            log.exception("recording the timeout failed", extra=kv(job_id=self.job_id))
        self.timed_out.set()
        self.lost.set()
        if self.on_timeout is not None:
            # A model stuck in native code cannot be interrupted from Python: the
            # worker process exits and the node's supervisor starts a fresh one.
            self.on_timeout()

    def check(self) -> None:
        if self.timed_out.is_set():
            raise LeaseLost(f"job {self.job_id}: timed out after {self.timeout:g} s")
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease lost (cancelled or reclaimed)")

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class _Prefetch:
    """Run ``fn`` in a thread now; :meth:`get` returns its result or raises its error."""

    def __init__(self, fn: Any) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self.seconds = 0.0  # how long ``fn`` ran (in its thread)
        self._thread = threading.Thread(target=self._run, args=(fn,), name="prefetch",
                                        daemon=True)
        self._thread.start()

    def _run(self, fn: Any) -> None:
        t0 = time.perf_counter()
        try:
            self._result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - t0

    def get(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def _mark_version(ds: Any, version: int) -> None:
    """Results of a later series version say so in their Series Description
    (``... (ct-tissue 1.0.0) v2``), so the newest is obvious in a PACS series list
    where the older results stay (nothing is deleted)."""
    if version <= 1:
        return
    suffix = f" v{version}"
    text = str(ds.get("SeriesDescription", "") or "")
    if len(text) + len(suffix) > 64:  # LO: 64 characters; keep "(model version)"
        cut = text.rfind(" (")
        head, tail = (text[:cut], text[cut:]) if cut > 0 else (text, "")
        room = 64 - len(suffix) - len(tail) - 1
        text = (head[:room].rstrip() + "~" + tail if room >= 8
                else text[:64 - len(suffix)].rstrip())
    ds.SeriesDescription = text + suffix


def _kind(ds: Any) -> str:
    return {"SEG": "seg", "SR": "sr"}.get(str(ds.get("Modality", "")), "sc")


def _frame_count(refs: Sequence[InstanceRef], header: Any) -> int:
    """Frames in the series: instances, times NumberOfFrames for multi-frame objects.

    Manifests state a minimum number of slices; an enhanced multi-frame series
    is one instance holding all of them, so counting instances would refuse it.
    """
    try:
        frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return len(refs) * max(frames, 1)


def _text(ds: Any, keyword: str) -> str:
    v = ds.get(keyword, "")
    return "" if v is None else str(v).strip()


def worker_identity(role: str, index: int = 0, *, pid: int | None = None) -> str:
    """``role@host:pid[:index]``: unique per process, readable in ``jobs show``."""
    return (f"{role}@{socket.gethostname()}:{os.getpid() if pid is None else pid}"
            + (f":{index}" if index else ""))


# --------------------------------------------------------------------------- pipeline


class Pipeline:
    """Processes claimed jobs: route, infer, encode, write, finish (outbox).

    Parameters
    ----------
    settings
        Validated settings.
    store
        This process's store.
    registry
        A :class:`dicomnode.infer.ModelRegistry`; default: built from
        ``settings.models`` (models load lazily, then stay warm).
    """

    def __init__(self, settings: Settings, store: Store, registry: Any | None = None,
                 on_timeout: Callable[[], None] | None = None) -> None:
        from dicomnode.infer import ModelRegistry

        self.settings = settings
        self.store = store
        # Called (from the heartbeat thread) when a job passes worker.job_timeout_seconds;
        # worker processes exit there so that a hung model does not keep running.
        self.on_timeout = on_timeout
        self.registry = registry if registry is not None else ModelRegistry(
            settings.models.path, settings.models.enabled, settings.models.threads)
        self.table = RoutingTable.from_settings(settings, self.registry.names())
        self._dests = {d.name: d for d in settings.destinations}
        # Volumes are loaded into memory reused from job to job (see warm_up).
        from dicomnode.infer import VolumeBuffer

        self.volume_buffer = VolumeBuffer()

    # -- start-up

    def warm_up(self) -> None:
        """One-time costs of the first job, paid at start instead (call from a thread).

        Importing the encoders (highdicom: ~0.7 s) and loading highdicom's
        tables of the standard (~0.4 s), importing the model runtimes the
        enabled models use, and touching ``worker.volume_buffer_mb`` of volume
        memory (fresh pages cost 0.3-0.7 s per 300 MB on first touch). Models
        themselves still load on first use (their sessions hold memory;
        ``model loaded`` is logged then).
        """
        t0 = time.perf_counter()
        try:
            self.volume_buffer.prefault(self.settings.worker.volume_buffer_mb << 20)
            import dicomnode.encode.fastwrite
            import dicomnode.encode.seg
            import dicomnode.encode.sr
            import dicomnode.infer.volume  # noqa: F401
            from dicomnode.encode import common as encode_common

            encode_common.warm_up()
            backends = {self.registry.manifest(n).backend for n in self.registry.names()}
            if "onnx" in backends:
                import onnxruntime  # noqa: F401
        except Exception:  # noqa: BLE001 - only a speed-up: the job reports real errors
            log.warning("worker warm-up failed (the first job pays the start-up costs)",
                        exc_info=True)
            return
        log.info("worker warmed up", extra=kv(seconds=round(time.perf_counter() - t0, 3)))

    # -- routing

    def route(self, refs: Sequence[InstanceRef], sref: SeriesRef) -> tuple[RouteDecision, Any]:
        """The routing decision for a series version and its representative header."""
        ds = representative(refs)
        if self.table.rules:
            return self.table.match(ds, sref.calling_aet, sref.called_aet), ds
        return self._embedded_default(ds, _frame_count(refs, ds)), ds

    def _embedded_default(self, ds: Any, n: int) -> RouteDecision:
        models = tuple(self.registry.applicable(_text(ds, "Modality"),
                                                _text(ds, "BodyPartExamined"),
                                                _text(ds, "SeriesDescription"), n))
        return RouteDecision(rule=None, models=models)

    # -- the job

    def process(self, job: Job, worker_id: str) -> JobReport:
        """Run one claimed job to its end state; never raises for a job's own failure."""
        timings: dict[str, float] = {}
        report = JobReport(job.id, JobState.RUNNING, timings=timings)
        lease = self.settings.worker.lease_seconds
        t0 = time.perf_counter()
        try:
            with _Heartbeat(self.store, job.id, worker_id, lease,
                            self.settings.worker.job_timeout_seconds, self.on_timeout) as hb:
                outputs, deliveries = self._run(job, report, hb)
                hb.check()
                with _timed(timings, "finish"):
                    done = self.store.finish_job(job.id, worker_id, outputs, deliveries)
            report.state = done.state
            report.outputs = tuple(outputs)
            if done.state is JobState.DONE:
                report.deliveries = tuple((d.destination, d.output.sop_instance_uid)
                                          for d in deliveries)
        except LeaseLost as exc:
            report.state, report.error = self._current_state(job.id), str(exc)
        except Exception as exc:  # noqa: BLE001 - every failure ends in a job state
            transient, reason = classify(exc)
            report.error = reason
            log.log(logging.WARNING if transient else logging.ERROR, "job failed", extra=kv(
                job_id=job.id, series_uid=job.series_uid, version=job.series_version,
                transient=transient, attempt=job.attempts, reason=reason),
                exc_info=not isinstance(exc, DicomNodeError))
            try:
                failed = self.store.fail_job(job.id, worker_id, reason, transient=transient)
                report.state = failed.state
            except StoreError as exc2:
                # The lease is gone (cancelled / reclaimed): its new owner decides.
                log.warning("could not record the job failure", extra=kv(
                    job_id=job.id, error=str(exc2)))
                report.state = self._current_state(job.id)
        timings["total"] = time.perf_counter() - t0
        log.info("job done" if report.state is JobState.DONE else f"job {report.state.value}",
                 extra=kv(job_id=job.id, study_uid=job.study_uid, series_uid=job.series_uid,
                          version=job.series_version, state=report.state.value,
                          rule=report.rule, models=",".join(report.models),
                          outputs=len(report.outputs), deliveries=len(report.deliveries),
                          error=report.error,
                          **{f"{k}_s": round(v, 3) for k, v in timings.items()}))
        return report

    def _current_state(self, job_id: int) -> JobState:
        try:
            return self.store.get_job(job_id).state
        except StoreError:
            return JobState.FAILED

    def _run(self, job: Job, report: JobReport,
             hb: _Heartbeat) -> tuple[list[OutputObject], list[NewDelivery]]:
        from dicomnode.encode import EncodeOptions, encode_results, load_sources
        from dicomnode.encode.fastwrite import to_part10
        from dicomnode.infer import load_volume

        timings = report.timings
        with _timed(timings, "route"):
            refs = self.store.series_instances(job.series_uid, job.series_version)
            if not refs:
                raise StoreError(f"series {job.series_uid} v{job.series_version}: "
                                 "no instance files in the store")
            sref = self.store.series_ref(job.series_uid, job.series_version)
            decision, header = self.route(refs, sref)
        report.rule = decision.rule.label if decision.rule else (
            "embedded default" if not self.table.rules else None)
        report.models = decision.models
        outputs: list[OutputObject] = []
        deliveries: list[NewDelivery] = []
        if decision.discard:
            log.info("series discarded by rule", extra=kv(job_id=job.id, rule=report.rule))
            return outputs, deliveries
        if not decision.models and not decision.forward:
            log.info("no routing rule matched: series stored only", extra=kv(
                job_id=job.id, series_uid=job.series_uid))
            return outputs, deliveries
        for dest in decision.forward:
            for r in refs:
                deliveries.append(NewDelivery(dest, OutputObject(
                    r.sop_instance_uid, r.sop_class_uid, r.path, "source")))
        if not decision.models:
            return outputs, deliveries

        for name in decision.models:
            ok, why = self.registry.manifest(name).applies_to(
                _text(header, "Modality"), _text(header, "BodyPartExamined"),
                _text(header, "SeriesDescription"), _frame_count(refs, header))
            if not ok:
                raise ModelError(f"{name} does not apply to this series: {why}")
        with _timed(timings, "load"):
            # Into the worker's reused buffer: valid until this worker's next job.
            volume = load_volume([r.path for r in refs], buffer=self.volume_buffer)
        hb.check()
        # The encoders need the source headers; read them while the first model
        # computes (onnxruntime releases the GIL), not after it.
        first = InferenceResult(self.registry.manifest(decision.models[0]).info, volume)
        headers = _Prefetch(lambda: load_sources(first))
        formats, keep_empty = self._formats(decision.send)
        options = EncodeOptions(series_version=job.series_version, keep_empty_frames=keep_empty)
        for name in decision.models:
            with _timed(timings, "model"):
                result = self.registry.run(name, volume)
            hb.check()
            with _timed(timings, "encode"):
                sources = headers.get()  # any wait for the reading is encode time
                # Logged apart: read in a thread while the model ran, not in any stage.
                timings["sources_concurrent"] = headers.seconds
                datasets = encode_results(result, sources, formats, options)
                for ds in datasets:
                    _mark_version(ds, job.series_version)
            with _timed(timings, "write"):
                written: list[OutputObject] = []
                for ds in datasets:
                    kind = _kind(ds)
                    # The Part 10 bytes pydicom would write, serialised here ~3x
                    # faster (a 300-slice SEG: 0.2 s instead of 0.7 s); the store
                    # still writes them (atomic, fsynced) as for any dataset.
                    out = self.store.write_output(job.id, str(ds.SOPInstanceUID),
                                                  str(ds.SOPClassUID), to_part10(ds),
                                                  kind=kind)
                    written.append(out)
                    for target in decision.send:
                        if kind in target.formats:
                            deliveries.append(NewDelivery(target.destination, out))
                outputs.extend(written)
                deliveries.extend(self._notifications(job, decision, result, header, written))
            hb.check()
        return outputs, deliveries

    def _notifications(self, job: Job, decision: RouteDecision, result: InferenceResult,
                       header: Any, objects: Sequence[OutputObject]) -> list[NewDelivery]:
        """One outbox row per notification target for this model's result.

        The targets are the rule's ``notify:``; without routing rules (the
        embedded default) every configured notification. The row holds the
        JSON summary the message is built from, and a deterministic id (a
        re-run of the same series version replaces, not duplicates, it).
        """
        names = decision.notify if self.table.rules else tuple(
            n.name for n in self.settings.notifications)
        if not names:
            return []
        import json

        from dicomnode.dispatch.notify import ResultSummary
        from dicomnode.encode.uids import result_uid

        targets = {n.name: n for n in self.settings.notifications}
        summary = ResultSummary.from_result(result, header, objects, job_id=job.id)
        payload = json.dumps(summary.to_json())
        now = self.store.now()
        out = []
        for name in names:
            cfg = targets[name]  # routing validated the names against the settings
            uid = result_uid("notification", cfg.kind, job.series_uid, job.series_version,
                             result.model, name)
            out.append(NewDelivery(name, OutputObject(uid, "", Path(), "notification"),
                                   deadline=now + timedelta(seconds=cfg.retry_deadline_seconds),
                                   kind=cfg.kind, payload=payload))
        return out

    def _formats(self, send: Sequence[SendTarget]) -> tuple[tuple[str, ...], bool]:
        """One encoding per job and model: the union of what the destinations want.

        Result UIDs are deterministic per (series version, model, kind), so two
        variants of "the same" SEG must never exist; a destination that takes
        SEG frames with empty ones gets them, others just receive a few more
        frames. Without destinations the SEG and SR are still made and stored.
        """
        if not send:
            return ("seg", "sr"), False
        formats = tuple(dict.fromkeys(f for t in send for f in t.formats))
        keep = any(self._dests[t.destination].keep_empty_frames for t in send
                   if t.destination in self._dests)
        return formats, keep


# --------------------------------------------------------------------------- loops


class Worker:
    """Claims and processes jobs until stopped (one per worker process)."""

    def __init__(self, settings: Settings, store: Store, *, worker_id: str | None = None,
                 pipeline: Pipeline | None = None) -> None:
        self.settings = settings
        self.store = store
        self.worker_id = worker_id or worker_identity("worker")
        self.pipeline = pipeline or Pipeline(settings, store)
        self._triaged: set[int] = set()
        # Called after a job queued deliveries (the dispatcher's wake-up).
        self.on_deliveries: Callable[[], None] | None = None

    def triage(self) -> int:
        """Give pending jobs their routing rule's ``priority`` before anyone claims them.

        Jobs are created when a series completes, before routing; the rules'
        priorities are applied here so that the queue serves, say, a stroke CT
        before a backlog of routine MR. Returns how many jobs changed.
        """
        if not any(r.priority for r in self.pipeline.table.rules):
            return 0
        if len(self._triaged) > 100_000:
            self._triaged.clear()
        changed = 0
        for job in self.store.list_jobs(states=[JobState.PENDING], limit=500):
            if job.id in self._triaged:
                continue
            self._triaged.add(job.id)
            try:
                refs = self.store.series_instances(job.series_uid, job.series_version)
                sref = self.store.series_ref(job.series_uid, job.series_version)
                decision, _ = self.pipeline.route(refs, sref)
            except Exception:  # noqa: BLE001 - the job fails with its reason when run
                continue
            if decision.priority != job.priority and self.store.set_job_priority(
                    job.id, decision.priority):
                changed += 1
                log.info("job priority from routing", extra=kv(
                    job_id=job.id, priority=decision.priority,
                    rule=decision.rule.label if decision.rule else None))
        return changed

    def poll_once(self) -> JobReport | None:
        """Claim and process one due job; ``None`` when none is due."""
        self.triage()
        job = self.store.claim_job(self.worker_id)
        if job is None:
            return None
        log.info("job claimed", extra=kv(job_id=job.id, series_uid=job.series_uid,
                                         version=job.series_version, attempt=job.attempts,
                                         worker=self.worker_id))
        report = self.pipeline.process(job, self.worker_id)
        if report.deliveries and self.on_deliveries is not None:
            try:
                self.on_deliveries()
            except Exception:  # noqa: BLE001 - the dispatcher's poll finds them anyway
                log.warning("waking the dispatcher failed", exc_info=True)
        return report

    def run(self, stop: threading.Event, *, until_idle: bool = False,
            wake: WakeUp | None = None) -> int:
        """Loop until ``stop`` is set (or, with ``until_idle``, no job is due); jobs done.

        ``wake`` (a :class:`WakeUp`): set on this node when a series completes, so
        that an idle worker claims its job now instead of at its next poll.
        """
        n = 0
        while not stop.is_set():
            if wake is not None:
                wake.clear()  # set again by anything completed from now on
            try:
                report = self.poll_once()
            except StoreError as exc:
                log.warning("claiming a job failed; retrying", extra=kv(error=str(exc)))
                report = None
            if report is not None:
                n += 1
                continue
            if until_idle:
                break
            if wake is not None:
                wake.wait(self.settings.worker.poll_seconds)
            else:
                stop.wait(self.settings.worker.poll_seconds)
        return n


@dataclass
class DispatchReport:
    destination: str
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    associations: int = 0
    seconds: float = 0.0


class Dispatcher:
    """Drains the outbox: per destination, one association per claimed batch."""

    def __init__(self, settings: Settings, store: Store, *, worker_id: str | None = None,
                 batch: int = 64, lease_seconds: float = 300.0) -> None:
        self.settings = settings
        self.store = store
        self.worker_id = worker_id or worker_identity("dispatcher")
        self.batch = batch
        self.lease_seconds = lease_seconds
        self._orphans_checked = 0.0

    def poll_once(self) -> list[DispatchReport]:
        """Send every due delivery once (batch by batch); the reports of this round."""
        reports = []
        for dest in self.settings.destinations:
            while True:
                claimed = self.store.claim_deliveries(dest.name, self.worker_id,
                                                      limit=self.batch,
                                                      lease_seconds=self.lease_seconds)
                if not claimed:
                    break
                reports.append(self.send(dest, claimed))
                if len(claimed) < self.batch:
                    break
        for target in self.settings.notifications:
            while True:
                claimed = self.store.claim_deliveries(target.name, self.worker_id,
                                                      limit=self.batch,
                                                      lease_seconds=self.lease_seconds)
                if not claimed:
                    break
                reports.append(self.notify(target, claimed))
                if len(claimed) < self.batch:
                    break
        if time.monotonic() - self._orphans_checked > 30:
            self._fail_orphans()
        return reports

    def send(self, dest: DestinationConfig, claimed: Sequence[Delivery]) -> DispatchReport:
        """C-STORE ``claimed`` to ``dest`` and record each delivery's outcome."""
        from dicomnode.dispatch import AssociationFailed, store_files

        node = self.settings.node
        rep = DispatchReport(dest.name)
        t0 = time.perf_counter()
        try:
            result = store_files(dest, [d.path for d in claimed], calling_ae_title=node.ae_title,
                                 acse_timeout=node.acse_timeout,
                                 dimse_timeout=node.dimse_timeout,
                                 network_timeout=node.network_timeout)
            outcomes, rep.associations = result.outcomes, result.associations
        except AssociationFailed as exc:
            outcomes = exc.outcomes
            rep.associations = 1
        except Exception as exc:  # noqa: BLE001 - a bug or OS error must not strand 'sending'
            log.exception("dispatch batch failed unexpectedly", extra=kv(destination=dest.name))
            from dicomnode.dispatch import FileOutcome, OutcomeState

            outcomes = tuple(FileOutcome(d.path, d.sop_instance_uid, d.sop_class_uid,
                                         OutcomeState.FAILED, None, True,
                                         f"{type(exc).__name__}: {exc}") for d in claimed)
        for d, o in zip(claimed, outcomes, strict=True):
            if o.ok:
                self.store.delivery_done(d.id, o.status)
                rep.sent += 1
                continue
            msg = o.message or f"status {o.status_hex}"
            after = self.store.delivery_failed(d.id, msg, transient=o.transient,
                                               peer_status=o.status,
                                               max_attempts=_NO_ATTEMPT_LIMIT)
            if after.state.value == "failed":
                rep.failed += 1
                log.error("delivery failed", extra=kv(
                    delivery_id=d.id, job_id=d.job_id, destination=dest.name,
                    sop_instance_uid=d.sop_instance_uid, peer_status=o.status_hex,
                    error=after.last_error))
            else:
                rep.retrying += 1
        rep.seconds = time.perf_counter() - t0
        log.log(logging.INFO if not (rep.failed or rep.retrying) else logging.WARNING,
                "dispatched", extra=kv(destination=dest.name, sent=rep.sent,
                                       retrying=rep.retrying, failed=rep.failed,
                                       associations=rep.associations,
                                       seconds=round(rep.seconds, 3)))
        return rep

    def notify(self, target: NotificationConfig, claimed: Sequence[Delivery]) -> DispatchReport:
        """Send each claimed notification (webhook POST or HL7 ORU^R01) and record it.

        Failures follow the C-STORE rules: transient ones (5xx/408/429,
        timeouts, refused connections, HL7 ``AE``) go back to ``pending`` with
        backoff until the target's ``retry_deadline_seconds``; permanent ones
        (other 4xx, HL7 ``AR``), or any past the deadline, end ``failed``.
        """
        import json

        from dicomnode.dispatch.notify import ResultSummary, notify
        from dicomnode.errors import DispatchError

        rep = DispatchReport(target.name)
        t0 = time.perf_counter()
        for d in claimed:
            status: int | None = None
            try:
                if d.kind != target.kind:
                    raise DispatchError(f"notification {target.name}: queued as {d.kind}, "
                                        f"configured as {target.kind}", transient=False)
                summary = ResultSummary.from_json(json.loads(d.payload or "{}"))
                status = notify(target, summary, d.sop_instance_uid)
            except DispatchError as exc:
                err, transient, status = str(exc), exc.transient, exc.status
            except Exception as exc:  # noqa: BLE001 - a bug must not strand 'sending'
                log.exception("notification failed unexpectedly", extra=kv(
                    delivery_id=d.id, destination=target.name))
                err, transient = f"{type(exc).__name__}: {exc}", False
            else:
                self.store.delivery_done(d.id, status)
                rep.sent += 1
                continue
            after = self.store.delivery_failed(d.id, err, transient=transient,
                                               peer_status=status,
                                               max_attempts=_NO_ATTEMPT_LIMIT)
            if after.state.value == "failed":
                rep.failed += 1
                log.error("notification failed", extra=kv(
                    delivery_id=d.id, job_id=d.job_id, destination=target.name,
                    kind=target.kind, error=after.last_error))
            else:
                rep.retrying += 1
        rep.seconds = time.perf_counter() - t0
        log.log(logging.INFO if not (rep.failed or rep.retrying) else logging.WARNING,
                "notified", extra=kv(destination=target.name, kind=target.kind, sent=rep.sent,
                                     retrying=rep.retrying, failed=rep.failed,
                                     seconds=round(rep.seconds, 3)))
        return rep

    def _fail_orphans(self) -> None:
        """Deliveries to a destination (or notification target) no longer configured
        fail visibly (re-triable)."""
        self._orphans_checked = time.monotonic()
        known = ({d.name for d in self.settings.destinations}
                 | {n.name for n in self.settings.notifications})
        pending = self.store.list_deliveries(states=["pending"], limit=1000)
        for name in sorted({d.destination for d in pending} - known):
            for d in self.store.claim_deliveries(name, self.worker_id, limit=1000):
                self.store.delivery_failed(
                    d.id, f"destination {name!r} is not configured", transient=False)

    def run(self, stop: threading.Event, *, until_idle: bool = False,
            wake: WakeUp | None = None) -> int:
        """Loop until ``stop``; returns the number of deliveries sent.

        ``wake`` (a :class:`WakeUp`): set by workers when they queue
        deliveries; the loop then polls at once instead of waiting
        ``worker.poll_seconds``.
        """
        n = 0
        while not stop.is_set():
            if wake is not None:
                wake.clear()  # set again by anything queued from now on
            try:
                reports = self.poll_once()
            except StoreError as exc:
                log.warning("dispatch round failed; retrying", extra=kv(error=str(exc)))
                reports = []
            n += sum(r.sent for r in reports)
            if until_idle and not reports:
                break
            if not reports:
                if wake is not None:
                    wake.wait(self.settings.worker.poll_seconds)
                else:
                    stop.wait(self.settings.worker.poll_seconds)
        return n


# --------------------------------------------------------------------------- processes


def _holder_pid(worker_id: str | None) -> int | None:
    """The pid in ``role@host:pid[:index]`` when ``host`` is this host, else ``None``."""
    if not worker_id or "@" not in worker_id:
        return None
    host, _, rest = worker_id.partition("@")[2].partition(":")
    if host != socket.gethostname():
        return None
    try:
        return int(rest.split(":")[0])
    except ValueError:
        return None


def _pid_alive(pid: int) -> bool:
    """Is ``pid`` a running process? A zombie (killed, not yet reaped: its parent,
    the killed node, is gone and init has not collected it) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): trust kill(0)
    return state not in (b"Z", b"X")


def release_jobs(store: Store, reason: str, *, holders: Sequence[str] | None = None) -> list[int]:
    """Put running jobs whose worker is gone back in the queue now, not at lease expiry.

    ``holders``: exactly these worker ids (a supervisor's stopped children).
    Otherwise every job held by a worker of *this host* whose process no longer
    exists (the node was killed and restarted). Workers on other hosts, and
    live processes, are left to their leases. The release counts as a transient
    failure (backoff, bounded by ``worker.max_attempts``).
    """
    released = []
    for job in store.list_jobs(states=[JobState.RUNNING], limit=10000):
        if holders is not None:
            if job.worker_id not in holders:
                continue
        else:
            pid = _holder_pid(job.worker_id)
            if pid is None or _pid_alive(pid):
                continue
        try:
            store.fail_job(job.id, job.worker_id or "", reason, transient=True)
        except StoreError:
            continue  # finished or reclaimed meanwhile
        released.append(job.id)
        log.warning("job released", extra=kv(job_id=job.id, worker=job.worker_id,
                                              reason=reason))
    return released


def release_deliveries(store: Store, *, holders: Sequence[str] | None = None) -> int:
    """Deliveries ``sending`` for a dispatcher that is gone go back to ``pending`` now.

    ``holders``: exactly these dispatcher ids; otherwise every dispatcher of this
    host whose process no longer exists (see :func:`release_jobs`).
    """
    if holders is None:
        holders = [h for h in store.delivery_holders()
                   if (pid := _holder_pid(h)) is not None and not _pid_alive(pid)]
    n = store.release_deliveries(holders) if holders else 0
    if n:
        log.warning("deliveries released", extra=kv(deliveries=n, dispatchers=list(holders)))
    return n


def check_settings(settings: Settings) -> None:
    """Fail fast, in the parent, on what would kill every child: models and routes."""
    from dicomnode.infer import ModelRegistry

    registry = ModelRegistry(settings.models.path, settings.models.enabled,
                             settings.models.threads)
    RoutingTable.from_settings(settings, registry.names())


def _child_signals(stop: threading.Event, wake: WakeUp | None = None) -> None:
    def _stop(*_: object) -> None:
        stop.set()
        if wake is not None:
            wake.set()  # a dispatcher waiting for work returns at once

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _die_with_parent()


def _die_with_parent() -> None:
    """A child must not outlive its node: ``kill -9`` of the node kills its workers.

    Otherwise an orphaned worker would keep a job (and send results) that the
    restarted node's workers cannot see ending. Linux: ``PR_SET_PDEATHSIG``;
    elsewhere (and as a fallback) a thread watching the parent pid.
    """
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class WakeUp:
    """Workers -> dispatcher "deliveries queued" signal across processes.

    A counting semaphore, not a ``multiprocessing.Event``: setting an Event
    waits for its sleepers to acknowledge, so a worker would hang forever on a
    dispatcher killed while waiting, and a signal handler could deadlock on it.
    Posting a semaphore never blocks; the dispatcher drains it before each poll.
    """

    def __init__(self) -> None:
        self._sem = mp.get_context("spawn").Semaphore(0)

    def set(self) -> None:
        self._sem.release()

    def clear(self) -> None:
        while self._sem.acquire(False):
            pass

    def wait(self, timeout: float) -> bool:
        """True when woken before ``timeout`` seconds."""
        if self._sem.acquire(True, timeout):
            self._sem.release()  # stays set until the next clear()
            return True
        return False


def _warm_up_and_freeze(pipeline: Pipeline) -> None:
    """Warm up, then move the start-up heap (modules, highdicom's tables of the
    standard, SQLAlchemy metadata) out of the cyclic garbage collector's reach:
    otherwise each full collection during a job rescans it, which made encoding
    a SEG (tens of thousands of new objects) vary by 0.1-0.2 s."""
    pipeline.warm_up()
    gc.collect()
    gc.freeze()


def worker_main(settings: Settings, index: int, wake: WakeUp | None = None,
                jobs: WakeUp | None = None) -> None:
    """Entry point of a worker process (spawned: starts clean, no inherited threads).

    ``wake``: a :class:`WakeUp` shared with the dispatcher, set when a job
    queued deliveries so that the dispatcher sends them now instead of at its
    next poll. ``jobs``: set by the node when a series completed (a job is due).
    """
    setup_logging(settings.logging.level, settings.logging.json, settings.logging.file)
    stop = threading.Event()
    _child_signals(stop, jobs)
    store = Store.open(settings)
    try:
        worker = Worker(settings, store, worker_id=worker_identity("worker", index))
        worker.pipeline.on_timeout = lambda: os._exit(3)
        if wake is not None:
            worker.on_deliveries = wake.set
        # Beside the loop, not before it: a job due now need not wait for it.
        threading.Thread(target=_warm_up_and_freeze, args=(worker.pipeline,), name="warm-up",
                         daemon=True).start()
        log.info("worker process ready", extra=kv(worker=worker.worker_id,
                                                  models=",".join(worker.pipeline.registry.names())))
        worker.run(stop, wake=jobs)
    finally:
        store.close()


def dispatcher_main(settings: Settings, index: int, wake: WakeUp | None = None) -> None:
    """Entry point of the dispatcher process (``wake``: see :func:`worker_main`)."""
    setup_logging(settings.logging.level, settings.logging.json, settings.logging.file)
    stop = threading.Event()
    _child_signals(stop, wake)
    store = Store.open(settings)
    try:
        d = Dispatcher(settings, store, worker_id=worker_identity("dispatcher", index))
        log.info("dispatcher process ready", extra=kv(
            worker=d.worker_id, destinations=",".join(x.name for x in settings.destinations)))
        d.run(stop, wake=wake)
    finally:
        store.close()


def _parent_logging(settings: Settings) -> Settings:
    """``settings`` with the log level and format the parent actually uses.

    ``dicomnode --log-json --log-level DEBUG serve`` configures the parent's
    logging from command-line flags that are not in the settings; children
    must log the same way, into the same stream.
    """
    import dataclasses

    from dicomnode.logs import JsonFormatter

    root = logging.getLogger()
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    level = logging.getLevelName(root.level)
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        return settings  # logging not set up here (library use): keep the settings
    return dataclasses.replace(settings, logging=dataclasses.replace(
        settings.logging, level=level, json=json_lines or settings.logging.json))


class ChildProcesses:
    """A :class:`dicomnode.receive.node.Service`: N spawned processes, restarted if one dies.

    A child that dies is restarted after a delay that doubles (up to a minute)
    while it keeps dying young, so a persistent fault does not spin.
    """

    def __init__(self, name: str, target: Any, settings: Settings, count: int,
                 extra_args: tuple[Any, ...] = ()) -> None:
        self.name = name  # "worker" or "dispatcher": also the role in the children's ids
        self.target = target
        self.extra_args = extra_args  # after (settings, index): e.g. the shared wake event
        # Workers only: wakes them when a series completes (the node's tracker and SCP call it).
        self.job_due: Callable[[], None] | None = None
        self.settings = _parent_logging(settings)
        self.count = count
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._started: list[float] = []
        self._delay: list[float] = []
        self._stop = threading.Event()
        self._recheck = False  # other local processes still held work at start
        self._monitor = threading.Thread(target=self._supervise, name=f"{name}-supervisor",
                                         daemon=True)

    def _spawn(self, index: int) -> Any:
        p = self._ctx.Process(target=self.target,
                              args=(self.settings, index + 1, *self.extra_args),
                              name=f"dicomnode-{self.name}-{index + 1}", daemon=True)
        p.start()
        return p

    def _release(self, reason: str, holders: Sequence[str] | None = None) -> bool:
        """Re-queue what dead children held (jobs or deliveries), not waiting for leases.

        Returns True when work is still held by processes of this host that are
        not our children and still exist (maybe a killed node's, still dying):
        the supervisor then looks again.
        """
        try:
            with Store.open(self.settings) as store:
                if self.name == "worker":
                    release_jobs(store, reason, holders=holders)
                    held = [j.worker_id for j in store.list_jobs(states=[JobState.RUNNING],
                                                                 limit=10000)]
                elif self.name == "dispatcher":
                    release_deliveries(store, holders=holders)
                    held = list(store.delivery_holders())
                else:
                    return False
        except Exception:  # noqa: BLE001 - the leases expire anyway
            log.exception("releasing work of dead children failed; their leases expire")
            return False
        mine = {p.pid for p in self._procs}
        return any((pid := _holder_pid(h)) is not None and pid not in mine
                   and _pid_alive(pid) for h in held)

    def start(self) -> None:
        # Jobs (deliveries) of this host's workers (dispatchers) that died with a
        # previous node (kill -9, power loss) need not wait for their lease.
        self._recheck = self._release("worker lost (its process is gone; node restarted)")
        self._procs = [self._spawn(i) for i in range(self.count)]
        self._started = [time.monotonic()] * self.count
        self._delay = [1.0] * self.count
        self._monitor.start()
        log.info("child processes started", extra=kv(
            service=self.name, pids=[p.pid for p in self._procs]))

    def _supervise(self) -> None:
        started, last_look = time.monotonic(), time.monotonic()
        while not self._stop.wait(0.5):
            # Work of this host's processes that died with a previous node is
            # released at start; a killed process can take seconds to disappear
            # (memory teardown, reaping by init), so while other local processes
            # still hold work, look again every 2 s for a minute.
            if (self._recheck and time.monotonic() - last_look >= 2.0
                    and time.monotonic() - started < 60):
                last_look = time.monotonic()
                self._recheck = self._release("worker lost (its process is gone; "
                                              "node restarted)")
            for i, p in enumerate(self._procs):
                if p.is_alive() or self._stop.is_set():
                    continue
                lived = time.monotonic() - self._started[i]
                self._delay[i] = 1.0 if lived > 60 else min(60.0, self._delay[i] * 2)
                log.error("child process died; restarting", extra=kv(
                    service=self.name, index=i + 1, exitcode=p.exitcode,
                    restart_in_s=self._delay[i]))
                self._release(f"worker process died (exit code {p.exitcode})",
                              [worker_identity(self.name, i + 1, pid=p.pid)])
                if self._stop.wait(self._delay[i]):
                    return
                self._procs[i] = self._spawn(i)
                self._started[i] = time.monotonic()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(2)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout
        killed = []
        for i, p in enumerate(self._procs):
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                # A model still computing: its job goes back to the queue.
                p.kill()
                p.join(2)
                killed.append(worker_identity(self.name, i + 1, pid=p.pid))
        if killed:
            self._release("worker stopped by shutdown before finishing", killed)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]


def services(settings: Settings, *, workers: int | None = None,
             dispatch: bool = True) -> list[ChildProcesses]:
    """The node's service hook: worker processes and the dispatcher process.

    Checks models and routing rules first, so that a bad configuration stops
    ``dicomnode serve`` / ``dicomnode worker`` with the error naming the rule.
    """
    check_settings(settings)
    n = settings.worker.processes if workers is None else workers
    out: list[ChildProcesses] = []
    # Workers wake the dispatcher when a job has queued deliveries; it still
    # polls (worker.poll_seconds) for work queued by other hosts and retries.
    wake = WakeUp() if n > 0 and dispatch else None
    extra = (wake,) if wake is not None else ()
    if n > 0:
        # The node wakes its workers when a series completes (job_due below);
        # they still poll for jobs queued by other hosts and retries.
        jobs = WakeUp()
        workers_svc = ChildProcesses("worker", worker_main, settings, n, (wake, jobs))
        workers_svc.job_due = jobs.set
        out.append(workers_svc)
    if dispatch:
        out.append(ChildProcesses("dispatcher", dispatcher_main, settings, 1, extra))
    return out


def run_workers(settings: Settings, *, workers: int | None = None, dispatch: bool = True,
                once: bool = False) -> int:
    """``dicomnode worker``: run workers (and the dispatcher) against the database.

    ``once``: in this process, process every due job, then send every due
    delivery, and return (for cron-style runs and operators).
    """
    if once:
        check_settings(settings)
        with Store.open(settings) as store:
            stop = threading.Event()
            jobs_done = Worker(settings, store).run(stop, until_idle=True)
            sent = Dispatcher(settings, store).run(stop, until_idle=True) if dispatch else 0
        print(f"processed {jobs_done} job(s), sent {sent} delivery(ies)")
        return 0
    stop = threading.Event()

    def _signal(signum: int, _frame: Any) -> None:
        log.info("signal received", extra=kv(signal=signal.Signals(signum).name))
        stop.set()

    old = {sig: signal.signal(sig, _signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    with Store.open(settings):  # the schema must be current before children start
        pass
    started = services(settings, workers=workers, dispatch=dispatch)
    if not started:
        print("dicomnode worker: nothing to run (0 workers and --no-dispatch)", file=sys.stderr)
        return 2
    try:
        for svc in started:
            svc.start()
        while not stop.wait(1.0):
            pass
    finally:
        for svc in reversed(started):
            svc.stop(10.0)
        for sig, h in old.items():
            signal.signal(sig, h)
    return 0


def storage_relative(store: Store, path: Path) -> str:
    """``path`` relative to the storage root when under it (for display)."""
    try:
        return str(Path(path).resolve().relative_to(store.root))
    except ValueError:
        return str(path)
