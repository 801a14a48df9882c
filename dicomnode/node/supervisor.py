"""The one process runtime policy: spawn, restart with backoff, stop; heap freeze; signals.

Every child process of the node (receiving processes, workers, the dispatcher)
is run by a :class:`Supervisor`:

* **spawn**: ``count`` children, numbered from 1, by a ``spawn(index)`` callable
  of the child kind;
* **restart**: a child that dies is restarted at once the first time; while it
  keeps dying young (within ``reset_after`` seconds of its start) the delay
  doubles from ``base`` up to ``cap`` (1, 2, 4 ... 60 s), so a persistent fault
  does not spin; a child that lived longer is again restarted at once
  (:class:`Backoff`);
* **release**: the work a dead child held is handed back by a release callable
  of the child kind (jobs for workers, deliveries for the dispatcher, open
  connections for receivers), called with the dead children's identities; at
  start with ``None``: the work of this host's processes that died with a
  previous node;
* **stop**: terminate, wait, kill what is still running, release its work.

:func:`freeze_heap` is the one start-up heap freeze, :func:`run_until_signalled`
the one SIGTERM / SIGINT runner (``dicomnode serve`` and ``dicomnode worker``).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from dicomnode.domain import JobState, worker_identity
from dicomnode.errors import StoreError
from dicomnode.logs import kv
from dicomnode.store import Store
from dicomnode.telemetry import process_dead

log = logging.getLogger(__name__)

#: A child that exited cleanly (asked to stop, e.g. by a signal to the whole process
#: group) is restarted only after this long, unless the supervisor is stopped first.
CLEAN_EXIT_GRACE_S = 3.0


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Backoff:
    """Restart delays: at once, then ``base`` doubling to ``cap`` while a child dies young."""

    base: float = 1.0
    cap: float = 60.0
    reset_after: float = 60.0  # a child that lived longer than this starts over

    def next(self, previous: float | None, lived: float) -> float:
        """The delay before restarting a child that died after ``lived`` seconds,
        ``previous`` being the delay before its last (re)start (``None``: first start)."""
        if previous is None or lived > self.reset_after:
            return 0.0
        return min(self.cap, max(self.base, previous * 2))


class Proc(Protocol):
    """What the supervisor needs of a child process (``multiprocessing.Process``)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exitcode(self) -> int | None: ...

    def is_alive(self) -> bool: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


@dataclass(frozen=True)
class DeadChild:
    """A child that is gone: its number, pid, exit code and lease identity."""

    index: int
    pid: int | None
    exitcode: int | None
    identity: str


#: ``release(dead, reason) -> others_hold_work``. ``dead``: the children that are gone,
#: or ``None`` at start (every process of this host that no longer exists). Returns True
#: when work is still held by other live processes of this host (a killed node's
#: children, still dying): the supervisor then looks again for a minute.
Release = Callable[[Sequence[DeadChild] | None, str], bool]


@dataclass
class _Slot:
    index: int
    proc: Proc
    started: float
    delay: float | None = None  # the delay before the current process's start
    restart_at: float | None = None  # dead: when to start the next one


class Supervisor:
    """``count`` children of one kind, restarted by the :class:`Backoff` policy.

    ``clock`` and the supervising thread are injectable for tests: with
    ``thread=False`` nothing runs by itself and :meth:`check` does one round.
    A :class:`dicomnode.node.node.Service`.
    """

    def __init__(self, name: str, spawn: Callable[[int], Proc], count: int, *,
                 release: Release | None = None, policy: Backoff | None = None,
                 clock: Callable[[], float] = time.monotonic, interval: float = 0.5,
                 thread: bool = True) -> None:
        self.name = name  # the role: also in the children's identities
        self.spawn = spawn
        self.count = count
        self.release = release
        self.policy = policy or Backoff()
        self.clock = clock
        self.interval = interval
        # Workers only: wakes them when a series completes (the node's tracker and SCP call it).
        self.job_due: Callable[[], None] | None = None
        # ``wait_ready(timeout)``: True once every child started said it runs (the node
        # waits for it before listening); set by dicomnode.node.workers.
        self.wait_ready: Callable[[float], bool] | None = None
        self._slots: list[_Slot] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._started_at = 0.0
        self._recheck = False  # other local processes still held work at start
        self._last_look = 0.0
        self._thread = (threading.Thread(target=self._supervise, name=f"{name}-supervisor",
                                         daemon=True) if thread else None)

    # -- lifecycle

    def start(self) -> None:
        # Work of this host's children that died with a previous node (kill -9,
        # power loss) need not wait for its lease.
        self._started_at = self._last_look = self.clock()
        self._recheck = self._release(None, f"{self.name} lost (its process is gone; "
                                            "node restarted)")
        with self._lock:
            now = self.clock()
            self._slots = [_Slot(i, self.spawn(i), now) for i in range(1, self.count + 1)]
        if self._thread is not None:
            self._thread.start()
        log.info("child processes started", extra=kv(service=self.name, pids=self.pids()))

    def _supervise(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - supervision must go on
                log.exception("supervising child processes failed", extra=kv(service=self.name))

    def check(self) -> None:
        """One round: restart dead children that are due, release their work."""
        with self._lock:
            now = self.clock()
            # A killed process can take seconds to disappear (memory teardown,
            # reaping by init), so while other local processes still hold work,
            # look again every 2 s for a minute.
            if (self._recheck and now - self._last_look >= 2.0
                    and now - self._started_at < 60):
                self._last_look = now
                self._recheck = self._release(None, f"{self.name} lost (its process is gone; "
                                                    "node restarted)")
            for slot in self._slots:
                if self._stop.is_set():
                    return
                if slot.restart_at is None:
                    if slot.proc.is_alive():
                        continue
                    slot.delay = self.policy.next(slot.delay, now - slot.started)
                    code = slot.proc.exitcode
                    wait = slot.delay
                    if code == 0:
                        # A clean exit is a child told to stop: SIGTERM to the whole
                        # process group or cgroup (systemd, timeout, Ctrl-C) reaches the
                        # children with the node. Give the node's own stop the time to
                        # come before restarting.
                        wait = max(wait, CLEAN_EXIT_GRACE_S)
                    slot.restart_at = now + wait
                    process_dead(slot.proc.pid)  # its live gauges (active associations)
                    fields = kv(service=self.name, index=slot.index, exitcode=code,
                                restart_in_s=wait)
                    if code == 0:
                        log.warning(f"{self.name} process exited; restarting", extra=fields)
                    else:
                        log.error(f"{self.name} process died; restarting", extra=fields)
                    self._release([self._dead(slot)],
                                  f"{self.name} process died (exit code {code})")
                if now >= slot.restart_at:
                    slot.proc = self.spawn(slot.index)
                    slot.started, slot.restart_at = now, None

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(2)
        with self._lock:
            slots = list(self._slots)
        for s in slots:
            if s.proc.is_alive():
                s.proc.terminate()
        deadline = self.clock() + timeout
        killed = []
        for s in slots:
            s.proc.join(max(0.1, deadline - self.clock()))
            if s.proc.is_alive():
                # A model still computing: its job goes back to the queue.
                s.proc.kill()
                s.proc.join(2)
                killed.append(self._dead(s))
        if killed:
            self._release(killed, f"{self.name} stopped by shutdown before finishing")

    def alive(self) -> bool:
        with self._lock:
            return all(s.restart_at is None and s.proc.is_alive() for s in self._slots)

    def pids(self) -> list[int | None]:
        with self._lock:
            return [s.proc.pid for s in self._slots]

    # -- helpers

    def _dead(self, slot: _Slot) -> DeadChild:
        pid = slot.proc.pid
        return DeadChild(slot.index, pid, slot.proc.exitcode,
                         worker_identity(self.name, slot.index, pid=pid))

    def _release(self, dead: Sequence[DeadChild] | None, reason: str) -> bool:
        if self.release is None:
            return False
        try:
            return self.release(dead, reason)
        except Exception:  # noqa: BLE001 - the leases expire anyway
            log.exception("releasing work of dead children failed; their leases expire",
                          extra=kv(service=self.name))
            return False


# --------------------------------------------------------------------------- release per kind


def holder_pid(worker_id: str | None) -> int | None:
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


def pid_alive(pid: int) -> bool:
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
            pid = holder_pid(job.worker_id)
            if pid is None or pid_alive(pid):
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
                   if (pid := holder_pid(h)) is not None and not pid_alive(pid)]
    n = store.release_deliveries(holders) if holders else 0
    if n:
        log.warning("deliveries released", extra=kv(deliveries=n, dispatchers=list(holders)))
    return n


def _others_hold(held: Sequence[str | None], own_pids: Callable[[], Sequence[int | None]]) -> bool:
    """Is any of ``held`` a live process of this host that is not one of ours?"""
    ours = set(own_pids())
    return any((pid := holder_pid(h)) is not None and pid not in ours and pid_alive(pid)
               for h in held)


class JobRelease:
    """Workers' release: their running jobs go back to the queue (transient failure)."""

    def __init__(self, open_store: Callable[[], Store],
                 own_pids: Callable[[], Sequence[int | None]] = list) -> None:
        self.open_store = open_store
        self.own_pids = own_pids  # the supervisor's live children (set by the node)

    def __call__(self, dead: Sequence[DeadChild] | None, reason: str) -> bool:
        with self.open_store() as store:
            release_jobs(store, reason,
                         holders=None if dead is None else [d.identity for d in dead])
            held = [j.worker_id for j in store.list_jobs(states=[JobState.RUNNING],
                                                         limit=10000)]
        return _others_hold(held, self.own_pids)


class DeliveryRelease:
    """The dispatcher's release: its ``sending`` deliveries go back to ``pending``."""

    def __init__(self, open_store: Callable[[], Store],
                 own_pids: Callable[[], Sequence[int | None]] = list) -> None:
        self.open_store = open_store
        self.own_pids = own_pids

    def __call__(self, dead: Sequence[DeadChild] | None, reason: str) -> bool:
        with self.open_store() as store:
            release_deliveries(store, holders=None if dead is None
                               else [d.identity for d in dead])
            held = list(store.delivery_holders())
        return _others_hold(held, self.own_pids)


# --------------------------------------------------------------------------- heap, signals


def freeze_heap() -> None:
    """Move everything allocated during start-up (modules, migrations, metadata,
    highdicom's tables of the standard) out of the cyclic garbage collector's
    reach: otherwise every full collection while receiving (or encoding a SEG:
    tens of thousands of new objects) rescans that whole heap, which made the
    main process measurably slower per instance than a fresh receiving process,
    and SEG encoding vary by 0.1-0.2 s."""
    gc.collect()
    gc.freeze()


def on_signals(*events: Any, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
               poll: float = 0.05) -> None:
    """SIGTERM / SIGINT set ``events`` (anything with ``set()``), without a lock in the
    handler.

    A signal handler runs in the main thread between two bytecodes, possibly while
    that thread is inside ``Event.wait`` or ``Event.set`` holding the event's
    (non-reentrant) lock: a handler calling ``Event.set()`` then deadlocks the
    process. Seen: SIGTERM from ``timeout`` (or systemd) and its process group at
    once left a node hanging forever in its own handler. So the handler only stores
    the signal number; a watcher thread sets the events and logs which signal came.
    """
    state: dict[str, int] = {}

    def _handler(signum: int, _frame: Any) -> None:
        state.setdefault("signum", signum)  # a dict store: no lock taken

    def _watch() -> None:
        while "signum" not in state:
            time.sleep(poll)
        log.info("signal received", extra=kv(signal=signal.Signals(state["signum"]).name))
        for e in events:
            e.set()

    threading.Thread(target=_watch, name="signal-watch", daemon=True).start()
    for sig in signals:
        signal.signal(sig, _handler)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set (by :func:`on_signals`) on SIGTERM / SIGINT while inside; the old
    handlers come back after."""
    stop = threading.Event()
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    on_signals(stop)
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_until_signalled(start: Callable[[], None], stop: Callable[[], None],
                        tick: Callable[[], None] | None = None, interval: float = 1.0) -> int:
    """``start()``, then wait for SIGTERM / SIGINT (``tick()`` every ``interval``),
    then ``stop()`` (also when ``start`` fails); the exit code, 0 on a clean stop."""
    with stop_on_signals() as stopped:
        try:
            start()
            while not stopped.wait(interval):
                if tick is not None:
                    tick()
        finally:
            stop()
    return 0


__all__ = ["Backoff", "DeadChild", "DeliveryRelease", "JobRelease", "Proc", "Release",
           "Supervisor", "freeze_heap", "holder_pid", "pid_alive", "release_deliveries",
           "on_signals", "release_jobs", "run_until_signalled", "stop_on_signals"]
