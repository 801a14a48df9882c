"""The composition root: ``dicomnode serve`` and ``dicomnode worker``.

:func:`run_node` (``dicomnode serve``) does, in order:

1. open the store and apply pending migrations (logged),
2. reconcile the store with the database (files without rows are indexed,
   rows without files flagged, leftover temporary files removed),
3. start receiving: ``node.receivers - 1`` receiving processes
   (:mod:`dicomnode.node.receivers`), then the SCP in this process, which
   accepts every connection and serves it itself or hands it to the least busy
   receiving process,
4. start the completeness tracker (a thread turning quiet series into jobs),
5. start the other :class:`Service` objects: by default (``with_worker=True``,
   ``worker.processes > 0``) :func:`worker_services`, the worker processes and
   the dispatcher process,
6. wait for SIGTERM / SIGINT, then stop everything in reverse order.

:func:`run_workers` (``dicomnode worker``) runs :func:`worker_services` alone
against the same database. Every child process is run by the one
:class:`~dicomnode.node.supervisor.Supervisor` policy.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from dicomnode.config import Settings
from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.logs import kv
from dicomnode.node.children import WakeUp, dispatcher_main, parent_logging, worker_main
from dicomnode.node.receivers import ReceiverPool
from dicomnode.node.supervisor import (
    DeliveryRelease,
    JobRelease,
    Proc,
    Supervisor,
    freeze_heap,
    run_until_signalled,
)
from dicomnode.receive.scp import StorageSCP
from dicomnode.store import Store
from dicomnode.worker import Worker, check_settings

log = logging.getLogger(__name__)


@runtime_checkable
class Service(Protocol):
    """Something the node starts after receiving is up and stops at shutdown."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...

    def alive(self) -> bool: ...


class CompletenessTracker:
    """Thread: every ``completion.check_interval_seconds`` completes quiet series."""

    name = "completeness-tracker"

    def __init__(self, store: Store, interval: float) -> None:
        self.store = store
        self.interval = interval
        # Called when series completed (the node's workers claim their jobs now).
        self.on_jobs: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.store.complete_quiet_series():
                    for call in self.on_jobs:
                        call()
            except Exception:  # noqa: BLE001 - keep tracking; the next tick retries
                log.exception("completeness check failed")

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()


def worker_services(settings: Settings, *, workers: int | None = None,
                    dispatch: bool = True) -> list[Supervisor]:
    """The worker processes and the dispatcher process, each run by a :class:`Supervisor`.

    Checks models and routing rules first, so that a bad configuration stops
    ``dicomnode serve`` / ``dicomnode worker`` with the error naming the rule.
    """
    check_settings(settings)
    child_settings = parent_logging(settings)
    n = settings.worker.processes if workers is None else workers
    out: list[Supervisor] = []
    # Workers wake the dispatcher when a job has queued deliveries; it still
    # polls (worker.poll_seconds) for work queued by other hosts and retries.
    wake = WakeUp() if n > 0 and dispatch else None

    def open_store() -> Store:
        return Store.open(child_settings)

    if n > 0:
        # The node wakes its workers when a series completes (job_due below);
        # they still poll for jobs queued by other hosts and retries.
        jobs = WakeUp()
        job_release = JobRelease(open_store)
        workers_svc = Supervisor("worker", _spawner(worker_main, child_settings, wake, jobs),
                                 n, release=job_release)
        job_release.own_pids = workers_svc.pids
        workers_svc.job_due = jobs.set
        out.append(workers_svc)
    if dispatch:
        extra = (wake,) if wake is not None else ()
        delivery_release = DeliveryRelease(open_store)
        dispatcher_svc = Supervisor("dispatcher",
                                    _spawner(dispatcher_main, child_settings, *extra), 1,
                                    release=delivery_release)
        delivery_release.own_pids = dispatcher_svc.pids
        out.append(dispatcher_svc)
    return out


def _spawner(target: Callable[..., None], settings: Settings,
             *extra: object) -> Callable[[int], Proc]:
    """``spawn(index)``: start ``target(settings, index, *extra)`` in a spawned process."""
    ctx = mp.get_context("spawn")
    role = getattr(target, "__name__", "child").removesuffix("_main")

    def spawn(index: int) -> Proc:
        p = ctx.Process(target=target, args=(settings, index, *extra),
                        name=f"dicomnode-{role}-{index}", daemon=True)
        p.start()
        return p

    return spawn


class Node:
    """A running node; :meth:`start` then :meth:`stop` (or use :func:`run_node`)."""

    def __init__(self, settings: Settings, *, with_worker: bool = True,
                 services: Sequence[Service] | None = None) -> None:
        self.settings = settings
        self.with_worker = with_worker
        self._extra = list(services) if services is not None else None
        self.store: Store | None = None
        self.scp: StorageSCP | None = None
        self.receivers: ReceiverPool | None = None
        self.services: list[Service] = []

    def start(self) -> None:
        s = self.settings
        log.info("applying database migrations", extra=kv(
            url=s.database.url.split("@")[-1]))
        self.store = Store.open(s, migrate=True)
        self.store.reconcile()
        if not s.node.allowed_calling_aets:
            log.warning("node.allowed_calling_aets is empty: accepting any calling AE title")
        extra = s.node.receivers - 1
        if extra:
            self.receivers = ReceiverPool(s, extra)
            self.receivers.start()
        self.scp = StorageSCP(s, self.store, balancer=self.receivers)
        self.scp.start()
        tracker = CompletenessTracker(self.store, s.completion.check_interval_seconds)
        services: list[Service] = [tracker]
        services += (self._extra if self._extra is not None
                     else self._default_services())
        for svc in services:
            svc.start()
            self.services.append(svc)
            job_due = getattr(svc, "job_due", None)
            if callable(job_due):  # workers to wake when a series completes
                tracker.on_jobs.append(job_due)
                if self.scp is not None:
                    self.scp.on_job = job_due
        freeze_heap()
        log.info("node ready", extra=kv(
            ae_title=s.node.ae_title, host=s.node.host, port=s.node.port,
            receivers=s.node.receivers, storage=str(self.store.root),
            services=[svc.name for svc in self.services], pid=os.getpid()))

    def _default_services(self) -> list[Service]:
        """The workers and the dispatcher, unless receiving only."""
        if not self.with_worker or self.settings.worker.processes <= 0:
            return []
        return list(worker_services(self.settings))

    def stop(self, grace_seconds: float = 10.0) -> None:
        log.info("node stopping")
        for svc in reversed(self.services):
            try:
                svc.stop(grace_seconds)
            except Exception:  # noqa: BLE001 - stop the rest regardless
                log.exception("stopping service failed", extra=kv(service=svc.name))
        self.services.clear()
        if self.scp is not None:
            self.scp.stop(grace_seconds)
        if self.receivers is not None:
            self.receivers.stop(grace_seconds)
        if self.store is not None:
            self.store.close()
        log.info("node stopped")


def run_node(settings: Settings, *, with_worker: bool = True,
             services: Sequence[Service] | None = None) -> int:
    """Run the node until SIGTERM or SIGINT; return the exit code (0 on a clean stop)."""
    node = Node(settings, with_worker=with_worker, services=services)
    return run_until_signalled(node.start, node.stop)


def run_workers(settings: Settings, *, workers: int | None = None, dispatch: bool = True,
                once: bool = False) -> int:
    """``dicomnode worker``: run workers (and the dispatcher) against the database.

    ``once``: in this process, process every due job, then send every due
    delivery, and return (for cron-style runs and operators).
    """
    if once:
        check_settings(settings)
        with Store.open(settings) as store:
            never = threading.Event()
            jobs_done = Worker(settings, store).run(never, until_idle=True)
            sent = Dispatcher(settings, store).run(never, until_idle=True) if dispatch else 0
        print(f"processed {jobs_done} job(s), sent {sent} delivery(ies)")
        return 0
    with Store.open(settings):  # the schema must be current before children start
        pass
    started = worker_services(settings, workers=workers, dispatch=dispatch)
    if not started:
        print("dicomnode worker: nothing to run (0 workers and --no-dispatch)", file=sys.stderr)
        return 2

    def start() -> None:
        for svc in started:
            svc.start()

    def stop() -> None:
        for svc in reversed(started):
            svc.stop(10.0)

    return run_until_signalled(start, stop)


__all__ = ["CompletenessTracker", "Node", "Service", "run_node", "run_workers",
           "worker_services"]
