"""Entry points of the worker and dispatcher processes, and what they share.

Both are spawned (they start clean: no inherited threads or connections) by a
:class:`dicomnode.node.supervisor.Supervisor`; the receiving processes' entry
point is :func:`dicomnode.node.receivers.receiver_main`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from dicomnode.config import Settings
from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.domain import worker_identity
from dicomnode.logs import JsonFormatter, kv, setup_logging
from dicomnode.node.supervisor import freeze_heap, on_signals
from dicomnode.store import Store
from dicomnode.telemetry import enable_from_env

if TYPE_CHECKING:
    from dicomnode.worker import Pipeline

log = logging.getLogger(__name__)


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


class Ready:
    """Children -> node: "started" (imports done, store open), counted across processes.

    The node waits for every child it starts before it listens (see
    :meth:`dicomnode.node.node.Node.start`). A restarted child posts again; nobody
    waits for that, and the count only grows.
    """

    def __init__(self) -> None:
        self._sem = mp.get_context("spawn").Semaphore(0)

    def set(self) -> None:
        self._sem.release()

    def wait(self, count: int, timeout: float) -> bool:
        """True when ``count`` children said so within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        for _ in range(count):
            left = deadline - time.monotonic()
            if left <= 0 or not self._sem.acquire(True, left):
                return False
        return True


def child_signals(stop: threading.Event, wake: WakeUp | None = None) -> None:
    """SIGTERM / SIGINT set ``stop`` (and ``wake``: a dispatcher waiting for work returns
    at once), through :func:`~dicomnode.node.supervisor.on_signals` (no lock in the
    handler); the child dies with its parent."""
    on_signals(stop, *([wake] if wake is not None else []))
    die_with_parent()


def die_with_parent() -> None:
    """A child must not outlive its node: ``kill -9`` of the node kills its workers.

    Otherwise an orphaned worker would keep a job (and send results) that the
    restarted node's workers cannot see ending. Linux: ``PR_SET_PDEATHSIG``;
    elsewhere (and as a fallback) a thread watching the parent pid.
    """
    parent = os.getppid()
    try:
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


def worker_niceness(increment: int, base_pid: int = 0) -> int:
    """The niceness a worker runs at: ``base_pid``'s (0: this process's) plus
    ``increment`` (``worker.nice``), capped at 19."""
    return min(19, os.getpriority(os.PRIO_PROCESS, base_pid) + increment)


def lower_priority(pid: int, niceness: int) -> int:
    """Give every thread of process ``pid`` (0: this one) at least ``niceness``; return
    the niceness its main thread has after.

    Only ever lowers the priority (raising it back needs privileges). On Linux a
    niceness belongs to a thread, and new threads inherit their creator's, so the
    threads already running are set too (``/proc/<pid>/task``). An error (a process
    already gone, a system refusing it) is logged, never raised: a worker at normal
    priority still works.
    """
    target = pid or os.getpid()
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{target}/task")]
    except OSError:  # no procfs: the main thread only (POSIX: the whole process)
        tids = [target]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError as e:
            if tid == target:
                log.warning("could not lower the CPU priority of a worker process",
                            extra=kv(pid=target, niceness=niceness, error=str(e)))
    try:
        return os.getpriority(os.PRIO_PROCESS, target)
    except OSError:
        return niceness


def parent_logging(settings: Settings) -> Settings:
    """``settings`` with the log level and format the parent actually uses.

    ``dicomnode --log-json --log-level DEBUG serve`` configures the parent's
    logging from command-line flags that are not in the settings; children
    must log the same way, into the same stream.
    """
    root = logging.getLogger()
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    level = logging.getLevelName(root.level)
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        return settings  # logging not set up here (library use): keep the settings
    return dataclasses.replace(settings, logging=dataclasses.replace(
        settings.logging, level=level, json=json_lines or settings.logging.json))


def _warm_up_and_freeze(pipeline: Pipeline) -> None:
    """Warm up, then freeze the start-up heap (see :func:`freeze_heap`)."""
    pipeline.warm_up()
    freeze_heap()


@contextmanager
def _child(settings: Settings, wake: WakeUp | None) -> Iterator[tuple[threading.Event, Store]]:
    """What every spawned child does first: logging, signals (SIGTERM sets the stop
    event and ``wake``), its own store; the store is closed when the child ends."""
    setup_logging(settings.logging.level, settings.logging.json, settings.logging.file)
    stop = threading.Event()
    child_signals(stop, wake)
    enable_from_env()
    store = Store.open(settings)
    try:
        yield stop, store
    finally:
        store.close()


def worker_main(settings: Settings, index: int, wake: WakeUp | None = None,
                jobs: WakeUp | None = None, ready: Ready | None = None) -> None:
    """Entry point of a worker process.

    ``wake``: a :class:`WakeUp` shared with the dispatcher, set when a job
    queued deliveries so that the dispatcher sends them now instead of at its
    next poll. ``jobs``: set by the node when a series completed (a job is due).
    ``ready``: set once the worker runs (its warm-up then continues beside the loop).
    """
    # Normally already done by the parent right after spawning (see
    # dicomnode.node.workers._spawner); again here for a worker started otherwise.
    niceness = lower_priority(0, worker_niceness(settings.worker.nice, os.getppid()))
    # Imported here, not at the top: the dispatcher process is spawned from this module
    # too and must not load the pipeline (encoders, highdicom, the model registry, scipy):
    # measured 0.3-0.4 s CPU at its (receiving) priority and ~40 MB RSS at every start.
    from dicomnode.worker import Worker

    with _child(settings, jobs) as (stop, store):
        worker = Worker(settings, store, worker_id=worker_identity("worker", index))
        worker.pipeline.on_timeout = lambda: os._exit(3)
        worker.pipeline.report_models()
        if wake is not None:
            worker.on_deliveries = wake.set
        # Beside the loop, not before it: a job due now need not wait for it.
        threading.Thread(target=_warm_up_and_freeze, args=(worker.pipeline,), name="warm-up",
                         daemon=True).start()
        log.info("worker process ready", extra=kv(
            worker=worker.worker_id, niceness=niceness,
            models=",".join(worker.pipeline.registry.names())))
        if ready is not None:
            ready.set()
        worker.run(stop, wake=jobs)


def dispatcher_main(settings: Settings, index: int, wake: WakeUp | None = None,
                    ready: Ready | None = None) -> None:
    """Entry point of the dispatcher process (``wake``, ``ready``: see :func:`worker_main`)."""
    with _child(settings, wake) as (stop, store):
        d = Dispatcher(settings, store, worker_id=worker_identity("dispatcher", index))
        log.info("dispatcher process ready", extra=kv(
            worker=d.worker_id, destinations=",".join(x.name for x in settings.destinations)))
        if ready is not None:
            ready.set()
        d.run(stop, wake=wake)


__all__ = ["Ready", "WakeUp", "child_signals", "die_with_parent", "dispatcher_main",
           "lower_priority", "parent_logging", "worker_main", "worker_niceness"]
