"""The composition root: ``dicomnode serve`` and ``dicomnode worker``.

:func:`run_node` (``dicomnode serve``) does, in order:

1. open the store and apply pending migrations (logged),
2. reconcile the store with the database (files without rows are indexed,
   rows without files flagged, leftover temporary files removed),
3. build the services (this loads the pipeline's modules and checks models
   and routes, before anything is accepted),
4. start ``node.receivers - 1`` receiving processes
   (:mod:`dicomnode.node.receivers`) and wait until each serves,
5. start the completeness tracker (a thread turning quiet series into jobs) and
   the other :class:`Service` objects: by default (``with_worker=True``,
   ``worker.processes > 0``) :func:`dicomnode.node.workers.worker_services`, the
   worker processes (at ``worker.nice`` lower CPU priority from their start, so
   their warm-up and models leave the cores to receiving) and the dispatcher;
   wait until they run (their imports done; at most 30 s),
6. start the SCP in this process, which accepts every connection and serves it
   itself or hands it to the least busy receiving process,
7. wait for SIGTERM / SIGINT, then stop everything in reverse order.

:func:`dicomnode.node.workers.run_workers` (``dicomnode worker``) runs those
services alone against the same database. Every child process is run by the one
:class:`~dicomnode.node.supervisor.Supervisor` policy.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from dicomnode.audit import AuditEvent, AuditLog, config_identity
from dicomnode.config import Settings
from dicomnode.errors import ConfigError
from dicomnode.logs import kv
from dicomnode.node.receivers import ReceiverPool
from dicomnode.node.supervisor import (
    freeze_heap,
    run_until_signalled,
)
from dicomnode.receive.scp import StorageSCP
from dicomnode.store import Store
from dicomnode.telemetry import METRICS, enable, guard, metrics_dir
from dicomnode.web import HttpServer, bind_http, create_app

log = logging.getLogger(__name__)

# How long start-up waits for the worker and dispatcher processes before listening
# anyway (a child that cannot start is logged and restarted by its supervisor).
_READY_TIMEOUT_S = 30.0


@runtime_checkable
class Service(Protocol):
    """Something the node starts after receiving is up and stops at shutdown."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...

    def alive(self) -> bool: ...


class PeriodicService:
    """A thread calling :meth:`tick` every ``interval`` seconds until stopped; a failing
    tick is logged and the next one tries again."""

    name = "periodic"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep the node up; the next tick retries
                log.exception(f"{self.name} failed")

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()


class CompletenessTracker(PeriodicService):
    """Every ``completion.check_interval_seconds``: completes quiet series."""

    name = "completeness-tracker"

    def __init__(self, store: Store, interval: float) -> None:
        super().__init__(interval)
        self.store = store
        # Called when series completed (the node's workers claim their jobs now).
        self.on_jobs: list[Callable[[], None]] = []

    def tick(self) -> None:
        done = self.store.complete_quiet_series()
        if done:
            for call in self.on_jobs:
                call()
            with guard():
                METRICS.series_completed.inc(len(done))


class RetentionService(PeriodicService):
    """Every ``retention.interval_seconds``: applies the retention rules
    (:meth:`dicomnode.store.Store.purge`, audited)."""

    name = "retention"

    def __init__(self, store: Store, interval: float, audit: AuditLog) -> None:
        super().__init__(interval)
        self.store = store
        self.audit = audit

    @staticmethod
    def wanted(settings: Settings) -> bool:
        r = settings.retention
        return r.interval_seconds > 0 and bool(
            r.instances_days or r.per_calling_aet or r.results_days or r.high_water_percent)

    def tick(self) -> None:
        self.store.purge(audit=self.audit)


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
        self.audit = AuditLog.from_settings(settings, role="node")
        self._http_sock: socket.socket | None = None

    def start(self) -> None:
        s = self.settings
        if s.http.enabled:
            # First: a port in use stops the node before anything listens or spawns;
            # metrics on before any child starts (they inherit the folder).
            self._http_sock = bind_http(s.http)
            try:
                enable(metrics_dir(s.storage.path))
            except OSError as exc:
                raise ConfigError(f"storage.path: cannot create the metrics folder "
                                  f"{metrics_dir(s.storage.path)}: {exc.strerror or exc}") from None
        self.audit.record(AuditEvent.CONFIGURATION_LOADED, **config_identity(s))
        log.info("applying database migrations", extra=kv(
            url=s.database.url.split("@")[-1]))
        self.store = Store.open(s, migrate=True)
        self.store.reconcile()
        if not s.node.allowed_calling_aets:
            log.warning("node.allowed_calling_aets is empty: accepting any calling AE title")
        # Receiving first. Services are built and started before the node listens: loading
        # the pipeline's modules and checking models and routes is CPU work in this
        # process, a bad configuration must stop the node before it accepts anything, and
        # the worker and dispatcher processes' start-up (their imports, the store) must
        # be over before the first association. The workers' warm-up then continues
        # beside their loop at their lower CPU priority (worker.nice).
        tracker = CompletenessTracker(self.store, s.completion.check_interval_seconds)
        services: list[Service] = [tracker]
        if RetentionService.wanted(s):
            services.append(RetentionService(self.store, s.retention.interval_seconds,
                                             self.audit))
        services += (self._extra if self._extra is not None
                     else self._default_services())
        extra = s.node.receivers - 1
        if extra:
            self.receivers = ReceiverPool(s, extra)
            self.receivers.start()
        job_due: Callable[[], None] | None = None
        for svc in services:
            svc.start()
            self.services.append(svc)
            due = getattr(svc, "job_due", None)
            if callable(due):  # workers to wake when a series completes
                tracker.on_jobs.append(due)
                job_due = due
        self._wait_ready(services)
        self.scp = StorageSCP(s, self.store, balancer=self.receivers)
        if job_due is not None:
            self.scp.on_job = job_due
        self.scp.start()
        if self._http_sock is not None:
            http = HttpServer(create_app(self), self._http_sock)
            http.start()
            self.services.append(http)
        self.audit.record(AuditEvent.APPLICATION_START, ae_title=s.node.ae_title,
                          listen=f"{s.node.host}:{s.node.port}", receivers=s.node.receivers,
                          services=[svc.name for svc in self.services])
        freeze_heap()
        log.info("node ready", extra=kv(
            ae_title=s.node.ae_title, host=s.node.host, port=s.node.port,
            receivers=s.node.receivers, storage=str(self.store.root),
            services=[svc.name for svc in self.services], pid=os.getpid()))

    # -- what the HTTP side asks (dicomnode.web.NodeView)

    def scp_listening(self) -> bool:
        server = self.scp.server if self.scp is not None else None
        sock = server.socket if server is not None else None
        return sock is not None and sock.fileno() >= 0

    def service_states(self) -> list[tuple[str, bool]]:
        states = [(svc.name, svc.alive()) for svc in self.services if svc.name != "http"]
        if self.receivers is not None:
            states.append((self.receivers.name, self.receivers.alive()))
        return states

    @staticmethod
    def _wait_ready(services: Sequence[Service]) -> None:
        """Wait (at most ``_READY_TIMEOUT_S`` in all) until the child processes run."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        for svc in services:
            wait = getattr(svc, "wait_ready", None)
            if callable(wait) and not wait(max(0.0, deadline - time.monotonic())):
                log.warning("child processes not ready in time; receiving starts anyway",
                            extra=kv(service=svc.name, timeout_s=_READY_TIMEOUT_S))

    def _default_services(self) -> list[Service]:
        """The workers and the dispatcher, unless receiving only."""
        if not self.with_worker or self.settings.worker.processes <= 0:
            return []
        # Imported here, not at the top: the pipeline (encoders, highdicom, the model
        # registry, scipy) is what workers run; a receive-only node (worker.processes 0,
        # --no-worker) does not load it (measured: +37 MB peak RSS and ~0.4 s start-up
        # in the receiving node process otherwise).
        from dicomnode.node.workers import worker_services

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
        self.audit.safe_record(AuditEvent.APPLICATION_STOP)
        if self._http_sock is not None:
            self._http_sock.close()
        log.info("node stopped")


def run_node(settings: Settings, *, with_worker: bool = True,
             services: Sequence[Service] | None = None) -> int:
    """Run the node until SIGTERM or SIGINT; return the exit code (0 on a clean stop)."""
    node = Node(settings, with_worker=with_worker, services=services)
    return run_until_signalled(node.start, node.stop)


__all__ = ["CompletenessTracker", "Node", "RetentionService", "Service", "run_node"]
