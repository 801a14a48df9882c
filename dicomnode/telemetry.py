"""Prometheus metrics of every process of the node (prometheus_client, multiprocess mode).

The receivers, the workers and the dispatcher are separate processes, so the
metrics are kept in prometheus_client's multiprocess mode: each process writes
its values to memory-mapped files in one folder (``PROMETHEUS_MULTIPROC_DIR``,
``<storage.path>/.metrics``), which ``GET /metrics`` (:mod:`dicomnode.web.metrics`)
aggregates. The node process calls :func:`enable` at start (cleaning the folder);
child processes inherit the variable and call :func:`enable_from_env`.

Until :func:`enable` runs, :data:`METRICS` holds no-op metrics: a process that
does not export metrics (``http.enabled: false``, tests, the CLI) pays one
attribute lookup and an empty call per event.

Cost on the receive path: one counter increment per instance and one per byte
count (a labelled child looked up in a dict, a lock, an 8-byte write into an
mmap): see ``benchmarks/metrics_cost.py``; nothing per PDU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import mark_process_dead

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger(__name__)
_warned = False


def _failed() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("updating a metric failed; metrics may be incomplete (logged once)",
                    exc_info=True)


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Metrics never fail the work they count (a full disk can fail an mmap write)."""
    try:
        yield
    except Exception:  # noqa: BLE001 - see above
        _failed()

# Job durations: a few seconds (small MR) to many minutes (big CT, CPU inference).
_JOB_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800)


class _Noop:
    """Stands in for a metric while metrics are off."""

    def labels(self, *args: Any, **kwargs: Any) -> _Noop:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


_NOOP = _Noop()


class Metrics:
    """The node's metrics; each attribute is a prometheus_client metric (or a no-op)."""

    def __init__(self) -> None:
        self.enabled = False
        self.instances: Any = _NOOP
        self.received_bytes: Any = _NOOP
        self.associations_active: Any = _NOOP
        self.associations_refused: Any = _NOOP
        self.series_completed: Any = _NOOP
        self.jobs: Any = _NOOP
        self.job_seconds: Any = _NOOP
        self.stage_seconds: Any = _NOOP
        self.deliveries: Any = _NOOP
        self.notifications: Any = _NOOP
        self.retries: Any = _NOOP
        self.model_loaded: Any = _NOOP
        self._instance_children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def _create(self) -> None:
        self.instances = Counter(
            "dicomnode_instances_received", "C-STORE requests answered, by calling AE title "
            "and the status returned (0x0000 stored).", ["calling_ae", "status"])
        self.received_bytes = Counter(
            "dicomnode_received_bytes", "Data set bytes of stored instances, by calling AE "
            "title.", ["calling_ae"])
        self.associations_active = Gauge(
            "dicomnode_associations_active", "Associations accepted and not yet closed.",
            multiprocess_mode="livesum")
        self.associations_refused = Counter(
            "dicomnode_associations_refused", "Associations rejected, by reason.", ["reason"])
        self.series_completed = Counter(
            "dicomnode_series_completed", "Series versions completed (each becomes a job).")
        self.jobs = Counter(
            "dicomnode_jobs_finished", "Jobs a worker ran to an end state (done, failed, or "
            "pending again for a retry), by state.", ["state"])
        self.job_seconds = Histogram(
            "dicomnode_job_duration_seconds", "Wall time of a job in a worker, by model(s) "
            "and end state.", ["model", "state"], buckets=_JOB_BUCKETS)
        self.stage_seconds = Histogram(
            "dicomnode_stage_duration_seconds", "Wall time of one pipeline stage of a job "
            "(route, load, model, encode, write, finish), by model(s).", ["model", "stage"],
            buckets=_STAGE_BUCKETS)
        self.deliveries = Counter(
            "dicomnode_deliveries", "C-STORE deliveries of results, by destination and outcome "
            "(done, retrying, failed).", ["destination", "outcome"])
        self.notifications = Counter(
            "dicomnode_notifications", "Webhook / HL7 notifications, by target, kind and outcome "
            "(done, retrying, failed).", ["target", "kind", "outcome"])
        self.retries = Counter(
            "dicomnode_retries", "Failures scheduled for another attempt, by what (job, "
            "delivery, notification).", ["what"])
        self.model_loaded = Gauge(
            "dicomnode_model_loaded", "1 when a worker process has the model loaded.",
            ["model", "version"], multiprocess_mode="livemax")
        self.enabled = True

    def instance(self, calling_ae: str, status: int, nbytes: int) -> None:
        """One C-STORE answered (the receive path: a dict lookup and one or two incs)."""
        if not self.enabled:
            return
        try:
            key = (calling_ae, status)
            children = self._instance_children.get(key)
            if children is None:
                children = (self.instances.labels(calling_ae, f"0x{status:04X}"),
                            self.received_bytes.labels(calling_ae))
                self._instance_children[key] = children
            children[0].inc()
            if status == 0 and nbytes:
                children[1].inc(nbytes)
        except Exception:  # noqa: BLE001 - never fail a C-STORE for a metric
            _failed()

METRICS = Metrics()


def metrics_dir(storage: Path) -> Path:
    """Where the node's processes write their metric files: beside the storage folder,
    not in it (it holds received instances and results only), and per host (the folder
    is emptied at every start: nodes sharing a storage path must not share it)."""
    return Path(storage).parent / f".metrics-{socket.gethostname()}"


def enable(directory: Path, *, clean: bool = True) -> None:
    """Turn metrics on in this process, writing to ``directory`` (emptied when ``clean``).

    Sets ``PROMETHEUS_MULTIPROC_DIR`` so that child processes started afterwards
    write to the same folder.
    """
    if METRICS.enabled:
        return
    directory = Path(directory)
    if clean and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[ENV_DIR] = str(directory)
    # prometheus_client chooses the value class when it is first imported; this
    # process may have imported it before the folder was known (documented way to
    # switch: assign values.ValueClass).
    values.ValueClass = values.MultiProcessValue()
    METRICS._create()


def enable_from_env() -> None:
    """In a child process: turn metrics on when the node process did."""
    directory = os.environ.get(ENV_DIR)
    if directory and Path(directory).is_dir():
        enable(Path(directory), clean=False)


def process_dead(pid: int | None) -> None:
    """A child process exited: drop its live gauges (``livesum`` / ``livemax``)."""
    directory = os.environ.get(ENV_DIR)
    if pid and directory and Path(directory).is_dir():
        mark_process_dead(pid, directory)


__all__ = ["METRICS", "Metrics", "enable", "enable_from_env", "guard", "metrics_dir",
           "process_dead"]
