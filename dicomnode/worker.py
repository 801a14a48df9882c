"""The pipeline: the only module that knows the order of the stages.

::

    claim job (lease) -> load series version -> route -> load volume -> run models
        -> encode per destination formats -> write outputs -> ONE transaction:
           record outputs + queue deliveries (outbox) + finish the job

The outbox is drained by :class:`dicomnode.dispatch.dispatcher.Dispatcher`.

Processes
---------
``dicomnode serve`` starts :func:`dicomnode.node.workers.worker_services`:
``worker.processes`` worker processes and one dispatcher process, so inference
never runs in the SCP's process; ``dicomnode worker`` runs the same services
alone against the same database. Any number of workers and dispatchers may
share a database: jobs and deliveries are claimed atomically with a lease.

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

Routes decide
-------------
A model a matching rule names runs unless a *hard* constraint of its manifest
fails: modality, minimum number of slices (counted in the stack the loader
keeps), planes it can handle. The soft hints (series description, body part)
only select models for the embedded default. A refused model is recorded in
the job's notes (``refused``, with the constraint); when every model is
refused and nothing is forwarded, the job fails with the refusals.

Series as scanners send them
----------------------------
The loader keeps the stack a model asks for (the largest by default) and
leaves out scouts and other stacks; what it left out is in the job's notes
(``excluded``) and in the SR. A later version of a series that adds only
images the loader leaves out (a late scout) ends ``skipped``, and the job of
the version before stays current with its result (it is not superseded).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from dicomnode.codec.part10 import to_part10
from dicomnode.config import Settings
from dicomnode.dispatch.notify import ResultSummary
from dicomnode.domain import (
    Exclusion,
    InferenceResult,
    InstanceRef,
    Job,
    JobState,
    OutputObject,
    SeriesRef,
    Volume,
    WakeSignal,
    worker_identity,
)
from dicomnode.encode import EncodeOptions, encode_results, load_sources
from dicomnode.encode import common as encode_common
from dicomnode.encode.uids import result_uid
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
from dicomnode.infer import ModelRegistry, StackChoice, VolumeBuffer, load_volume
from dicomnode.infer.manifest import Refusal
from dicomnode.infer.volume import (
    UNREADABLE,
    NoStackInPlanes,
    describe_exclusions,
    unreadable_reason,
)
from dicomnode.logs import kv
from dicomnode.routing import RouteDecision, RoutingTable, SendTarget, representative
from dicomnode.store import NewDelivery, Store
from dicomnode.telemetry import METRICS, guard

log = logging.getLogger(__name__)


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
    #: Kept with the job: ``excluded`` images, ``refused`` models (see the module doc).
    notes: dict[str, Any] = field(default_factory=dict)
    #: Why the job was skipped (nothing to do), when it was.
    skipped: str | None = None


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
        self.volume_buffer = VolumeBuffer()

    # -- start-up

    def warm_up(self) -> None:
        """One-time costs of the first job, paid at start instead (call from a thread).

        Loading highdicom's tables of the standard (~0.4 s; the encoders
        themselves are imported with this module), importing the model runtimes the
        enabled models use, and touching ``worker.volume_buffer_mb`` of volume
        memory (fresh pages cost 0.3-0.7 s per 300 MB on first touch). Models
        themselves still load on first use (their sessions hold memory;
        ``model loaded`` is logged then).
        """
        t0 = time.perf_counter()
        try:
            self.volume_buffer.prefault(self.settings.worker.volume_buffer_mb << 20)
            encode_common.warm_up()
            backends = {self.registry.manifest(n).backend for n in self.registry.names()}
            if "onnx" in backends:
                # Imported here on purpose: importing it is the warm-up (0.2 s),
                # and only when an enabled model runs on onnxruntime.
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
                    if report.skipped is not None:
                        done = self.store.skip_job(job.id, worker_id, report.skipped,
                                                   report.notes)
                    else:
                        done = self.store.finish_job(job.id, worker_id, outputs, deliveries,
                                                     report.notes)
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
                failed = self.store.fail_job(job.id, worker_id, reason, transient=transient,
                                             notes=report.notes)
                report.state = failed.state
            except StoreError as exc2:
                # The lease is gone (cancelled / reclaimed): its new owner decides.
                log.warning("could not record the job failure", extra=kv(
                    job_id=job.id, error=str(exc2)))
                report.state = self._current_state(job.id)
        timings["total"] = time.perf_counter() - t0
        with guard():
            self._observe(report)
        log.info("job done" if report.state is JobState.DONE else f"job {report.state.value}",
                 extra=kv(job_id=job.id, study_uid=job.study_uid, series_uid=job.series_uid,
                          version=job.series_version, state=report.state.value,
                          rule=report.rule, models=",".join(report.models),
                          outputs=len(report.outputs), deliveries=len(report.deliveries),
                          error=report.error, skipped=report.skipped,
                          refused=",".join(r["model"] for r in report.notes.get("refused", ()))
                          or None,
                          **{f"{k}_s": round(v, 3) for k, v in timings.items()}))
        return report

    def _observe(self, report: JobReport) -> None:
        """Metrics of one finished job (cheap: once per job)."""
        if not METRICS.enabled:
            return
        model = ",".join(report.models) or "none"
        state = report.state.value
        METRICS.jobs.labels(state).inc()
        if report.state is JobState.PENDING:
            METRICS.retries.labels("job").inc()
        METRICS.job_seconds.labels(model, state).observe(report.timings.get("total", 0.0))
        for stage in ("route", "load", "model", "encode", "write", "finish"):
            if stage in report.timings:
                METRICS.stage_seconds.labels(model, stage).observe(report.timings[stage])
        for name in report.models:
            with contextlib.suppress(DicomNodeError):
                METRICS.model_loaded.labels(
                    name, self.registry.manifest(name).info.version).set(1)

    def report_models(self) -> None:
        """Every model this worker offers, as loadable (0) until a job loads it (1)."""
        with guard():
            for name in self.registry.names():
                METRICS.model_loaded.labels(
                    name, self.registry.manifest(name).info.version).set(0)

    def _current_state(self, job_id: int) -> JobState:
        try:
            return self.store.get_job(job_id).state
        except StoreError:
            return JobState.FAILED

    def _run(self, job: Job, report: JobReport,
             hb: _Heartbeat) -> tuple[list[OutputObject], list[NewDelivery]]:
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

        models, volumes = self._prepare(job, refs, header, decision.models, report)
        hb.check()
        if report.skipped is not None:
            return [], []
        if not models:
            report.models = ()
            if deliveries:  # the originals are still forwarded
                return outputs, deliveries
            # The route asked for these models and none can run: a configuration
            # (or data) problem for the operator to see, not a silent skip.
            raise ModelError("; ".join(
                f"{r['model']} does not apply to this series: {r['refusal']}"
                for r in report.notes.get("refused", ())))
        report.models = tuple(models)
        outputs_, deliveries_ = self._infer(job, report, hb, decision, header, models, volumes)
        return outputs + outputs_, deliveries + deliveries_

    def _prepare(self, job: Job, refs: Sequence[InstanceRef], header: Any,
                 names: Sequence[str], report: JobReport) -> tuple[list[str], dict[str, Volume]]:
        """The models that run and the volume each runs on; refusals and exclusions noted.

        Routed models are checked against their manifests' hard constraints only;
        models of the embedded default were selected by their manifests already.
        One volume is loaded per distinct stack the models ask for.
        """
        explicit = bool(self.table.rules)
        refused: list[dict[str, Any]] = []

        def refuse(name: str, r: Refusal) -> None:
            refused.append({"model": name, "constraint": r.constraint, "reason": r.reason,
                            "refusal": str(r)})
            log.info("model refused by its manifest", extra=kv(
                job_id=job.id, model=name, constraint=r.constraint, reason=r.reason))

        candidates: list[str] = []
        for name in names:
            r = self.registry.manifest(name).refusal(_text(header, "Modality"),
                                                     _frame_count(refs, header))
            if r is not None and (explicit or r.hard):
                refuse(name, r)
            else:
                candidates.append(name)
        by_stack: dict[StackChoice, Volume] = {}
        chosen: dict[str, Volume] = {}
        models: list[str] = []
        timings = report.timings
        for name in candidates:
            manifest = self.registry.manifest(name)
            choice = manifest.stack
            if choice not in by_stack:
                try:
                    with _timed(timings, "load"):
                        # The first into the worker's reused buffer (valid until this
                        # worker's next job); another stack into its own memory.
                        by_stack[choice] = load_volume(
                            [r.path for r in refs], stack=choice,
                            buffer=self.volume_buffer if not by_stack else None)
                except NoStackInPlanes as exc:
                    refuse(name, Refusal("applies_to.planes", str(exc), True))
                    continue
                except VolumeError as exc:
                    # Unreadable files made the rest unusable (a gap in the stack):
                    # still move them aside, so that sending them again recovers.
                    if UNREADABLE in str(exc):
                        self._quarantine_unreadable(job, [
                            (r.sop_instance_uid, why) for r in refs
                            if (why := unreadable_reason(Path(r.path))) is not None], report)
                    raise
                self._quarantine_unreadable(job, [
                    (uid, e.reason) for e in by_stack[choice].excluded
                    if e.reason.startswith(UNREADABLE) for uid in e.instances], report)
            volume = by_stack[choice]
            n = volume.shape[0]
            if n < manifest.applicability.min_slices:
                left = (f" ({sum(len(e.instances) for e in volume.excluded)} image(s) left "
                        "out)") if volume.excluded else ""
                refuse(name, Refusal(
                    "applies_to.min_slices", f"{n} slice(s) in the stack used{left}, the model "
                    f"needs at least {manifest.applicability.min_slices}", True))
                continue
            chosen[name] = volume
            models.append(name)
        if refused:
            report.notes["refused"] = refused
        used = list({id(v): v for v in chosen.values()}.values())
        excluded = [
            {"reason": e.reason, "count": len(e.instances), "instances": list(e.instances),
             "models": [m for m, v in chosen.items() if v is vol]}
            for vol in used for e in vol.excluded]
        if excluded:
            report.notes["excluded"] = excluded
        if used and job.series_version > 1:
            self._skip_if_nothing_new(job, refs, used, report)
        return models, chosen

    def _quarantine_unreadable(self, job: Job, found: Sequence[tuple[str, str]],
                               report: JobReport) -> None:
        """Move the files the loader could not read at all (``(SOP Instance UID,
        reason)``) to the quarantine, their rows flagged ``file_missing``; the job
        goes on with the rest. Noted in the job's ``quarantined``."""
        done: list[str] = report.notes.setdefault("quarantined", [])
        for uid, reason in found:
            if uid in done:
                continue
            try:
                self.store.quarantine(uid, reason)
            except (OSError, StoreError) as exc:  # never fail the job for it
                log.warning("cannot quarantine an unreadable instance", extra=kv(
                    job_id=job.id, sop_instance_uid=uid, error=str(exc)))
                continue
            done.append(uid)
        if not done:
            del report.notes["quarantined"]

    def _skip_if_nothing_new(self, job: Job, refs: Sequence[InstanceRef],
                             volumes: Sequence[Volume], report: JobReport) -> None:
        """A version whose new images the loader all leaves out (a late scout) is
        skipped when the version before it has a result: that one stays current."""
        before = {r.sop_instance_uid for r in self.store.series_instances(
            job.series_uid, job.series_version - 1)}
        new = {r.sop_instance_uid for r in refs} - before
        if not new:
            return
        for vol in volumes:
            left_out = {uid for e in vol.excluded for uid in e.instances}
            if not new <= left_out:
                return
        previous = self.store.job_handed_back_to(job.id)
        if previous is None:
            return
        what = [Exclusion(e.reason, tuple(u for u in e.instances if u in new))
                for e in volumes[0].excluded]
        report.skipped = (
            f"version {job.series_version} added only images left out of the volume "
            f"({describe_exclusions(e for e in what if e.instances)}); the result of job "
            f"{previous.id} (version {previous.series_version}) stays current")

    def _infer(self, job: Job, report: JobReport, hb: _Heartbeat, decision: RouteDecision,
               header: Any, models: Sequence[str], volumes: dict[str, Volume],
               ) -> tuple[list[OutputObject], list[NewDelivery]]:
        timings = report.timings
        outputs: list[OutputObject] = []
        deliveries: list[NewDelivery] = []
        volume = volumes[models[0]]
        # The encoders need the source headers; read them while the first model
        # computes (onnxruntime releases the GIL), not after it.
        first = InferenceResult(self.registry.manifest(models[0]).info, volume)
        headers = _Prefetch(lambda: load_sources(first))
        formats, keep_empty = self._formats(decision.send)
        options = EncodeOptions(series_version=job.series_version, keep_empty_frames=keep_empty)
        for name in models:
            with _timed(timings, "model"):
                result = self.registry.run(name, volumes[name])
            hb.check()
            with _timed(timings, "encode"):
                if volumes[name] is volume:
                    sources = headers.get()  # any wait for the reading is encode time
                else:  # another stack of the series: its own source headers
                    sources = load_sources(result)
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
            wake: WakeSignal | None = None) -> int:
        """Loop until ``stop`` is set (or, with ``until_idle``, no job is due); jobs done.

        ``wake`` (the node's :class:`~dicomnode.node.children.WakeUp`): set on this
        node when a series completes, so that an idle worker claims its job now
        instead of at its next poll.
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


def check_settings(settings: Settings) -> None:
    """Fail fast, in the parent, on what would kill every child: models and routes."""
    registry = ModelRegistry(settings.models.path, settings.models.enabled,
                             settings.models.threads)
    RoutingTable.from_settings(settings, registry.names())
