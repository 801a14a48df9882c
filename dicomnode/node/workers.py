"""The worker and dispatcher processes as services: ``dicomnode worker``, and what
``dicomnode serve`` starts beside receiving (:meth:`dicomnode.node.node.Node.start`).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
from collections.abc import Callable

from dicomnode.config import Settings
from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.node.children import (
    Ready,
    WakeUp,
    dispatcher_main,
    lower_priority,
    parent_logging,
    worker_main,
    worker_niceness,
)
from dicomnode.node.supervisor import (
    DeliveryRelease,
    JobRelease,
    Proc,
    Supervisor,
    run_until_signalled,
)
from dicomnode.store import Store
from dicomnode.worker import Worker, check_settings


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
        workers_ready = Ready()
        job_release = JobRelease(open_store)
        workers_svc = Supervisor("worker", _spawner(worker_main, child_settings, wake, jobs,
                                                    workers_ready, nice=settings.worker.nice),
                                 n, release=job_release)
        job_release.own_pids = workers_svc.pids
        workers_svc.job_due = jobs.set
        workers_svc.wait_ready = lambda timeout: workers_ready.wait(n, timeout)
        out.append(workers_svc)
    if dispatch:
        dispatcher_ready = Ready()
        delivery_release = DeliveryRelease(open_store)
        dispatcher_svc = Supervisor("dispatcher",
                                    _spawner(dispatcher_main, child_settings, wake,
                                             dispatcher_ready), 1,
                                    release=delivery_release)
        delivery_release.own_pids = dispatcher_svc.pids
        dispatcher_svc.wait_ready = lambda timeout: dispatcher_ready.wait(1, timeout)
        out.append(dispatcher_svc)
    return out


def _spawner(target: Callable[..., None], settings: Settings,
             *extra: object, nice: int = 0) -> Callable[[int], Proc]:
    """``spawn(index)``: start ``target(settings, index, *extra)`` in a spawned process.

    ``nice`` > 0: the process runs that much below this one's CPU priority from its
    first instructions on (set here, right after the exec, not by the child once its
    imports are done: the imports and warm-up are what must not slow receiving).
    """
    ctx = mp.get_context("spawn")
    role = getattr(target, "__name__", "child").removesuffix("_main")

    def spawn(index: int) -> Proc:
        p = ctx.Process(target=target, args=(settings, index, *extra),
                        name=f"dicomnode-{role}-{index}", daemon=True)
        p.start()
        if nice > 0 and p.pid is not None:
            lower_priority(p.pid, worker_niceness(nice))
        return p

    return spawn


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


__all__ = ["run_workers", "worker_services"]
