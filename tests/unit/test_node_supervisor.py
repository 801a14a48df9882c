"""The one restart policy of the node's child processes, checked with fakes: no
processes, no threads, no timing (the clock is a variable the test moves)."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import pytest

from dicomnode.node.supervisor import Backoff, DeadChild, Supervisor


class FakeProc:
    def __init__(self, pid: int, *, stubborn: bool = False) -> None:
        self.pid: int | None = pid
        self.exitcode: int | None = None
        self.stubborn = stubborn  # ignores SIGTERM
        self.terminated = self.killed = False
        self._alive = True

    def is_alive(self) -> bool:
        return self._alive

    def die(self, code: int = 9) -> None:
        self._alive, self.exitcode = False, code

    def terminate(self) -> None:
        self.terminated = True
        if not self.stubborn:
            self.die(-15)

    def kill(self) -> None:
        self.killed = True
        self.die(-9)

    def join(self, timeout: float | None = None) -> None:
        pass


class Harness:
    """A supervisor of fake children with a clock the test sets."""

    def __init__(self, count: int = 2, *, holds_work: Sequence[bool] = (False,),
                 stubborn: bool = False) -> None:
        self.now = 1000.0
        self.spawned: list[tuple[int, FakeProc]] = []
        self.released: list[tuple[list[DeadChild] | None, str]] = []
        self._holds = list(holds_work)
        self._stubborn = stubborn
        self.sup = Supervisor("worker", self.spawn, count, release=self.release,
                              clock=lambda: self.now, thread=False)

    def spawn(self, index: int) -> FakeProc:
        p = FakeProc(100 + len(self.spawned), stubborn=self._stubborn)
        self.spawned.append((index, p))
        return p

    def release(self, dead: Sequence[DeadChild] | None, reason: str) -> bool:
        self.released.append((None if dead is None else list(dead), reason))
        return self._holds.pop(0) if self._holds else False

    def current(self, index: int) -> FakeProc:
        return [p for i, p in self.spawned if i == index][-1]

    def spawns_of(self, index: int) -> int:
        return sum(1 for i, _ in self.spawned if i == index)


def test_backoff_doubles_while_dying_young_capped_and_reset_after_a_long_life() -> None:
    b = Backoff()
    assert b.next(None, 0.1) == 0.0  # the first restart: at once
    delays, d = [], b.next(None, 0.1)
    for _ in range(9):
        d = b.next(d, 0.1)
        delays.append(d)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert b.next(60.0, 61.0) == 0.0  # lived > 60 s: starts over
    assert b.next(60.0, 59.0) == 60.0


def test_children_are_numbered_from_one_and_start_releases_a_previous_nodes_work() -> None:
    h = Harness(count=3)
    h.sup.start()
    assert [i for i, _ in h.spawned] == [1, 2, 3]
    assert h.released == [(None, "worker lost (its process is gone; node restarted)")]
    assert h.sup.alive()
    assert h.sup.pids() == [100, 101, 102]


def test_a_dead_child_is_restarted_at_once_then_with_doubling_delays() -> None:
    h = Harness(count=2)
    h.sup.start()
    h.released.clear()
    h.sup.check()
    assert len(h.spawned) == 2  # nothing died: nothing happens

    first = h.current(1)
    first.die(9)
    h.sup.check()
    # The release got the dead child's identity (index and pid), then it was restarted
    # in the same round: the prompt first restart.
    (dead,), reason = h.released[-1]
    assert dead == DeadChild(1, first.pid, 9, f"worker@{socket.gethostname()}:{first.pid}:1")
    assert reason == "worker process died (exit code 9)"
    assert h.spawns_of(1) == 2 and h.spawns_of(2) == 1
    assert h.sup.alive()

    # It keeps dying young: 1 s, then 2 s, 4 s ... before the next start.
    for delay in (1.0, 2.0, 4.0, 8.0):
        h.current(1).die(1)
        h.sup.check()
        n = h.spawns_of(1)
        assert not h.sup.alive()  # dead and waiting: not counted as alive
        h.now += delay - 0.01
        h.sup.check()
        assert h.spawns_of(1) == n, f"restarted before {delay} s"
        h.now += 0.01
        h.sup.check()
        assert h.spawns_of(1) == n + 1, f"not restarted after {delay} s"
    assert h.spawns_of(2) == 1  # the other child is left alone


def test_the_delay_is_capped_at_a_minute_and_reset_after_a_long_life() -> None:
    h = Harness(count=1)
    h.sup.start()
    delays = []
    for _ in range(10):
        n, t0 = h.spawns_of(1), h.now
        h.current(1).die()
        h.sup.check()
        while h.spawns_of(1) == n:
            assert h.now - t0 <= 120, "never restarted"
            h.now += 0.5
            h.sup.check()
        delays.append(h.now - t0)
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    h.now += 61.0  # this one lives longer than a minute, then dies: at once again
    h.current(1).die()
    n = h.spawns_of(1)
    h.sup.check()
    assert h.spawns_of(1) == n + 1


def test_no_restart_after_stop_and_a_child_that_ignores_sigterm_is_killed_and_released() -> None:
    h = Harness(count=2, stubborn=True)
    h.sup.start()
    h.released.clear()
    procs = [h.current(1), h.current(2)]
    h.sup.stop(0.0)
    assert all(p.terminated and p.killed for p in procs)
    (dead, reason), = h.released
    assert [d.index for d in dead or []] == [1, 2]
    assert [d.pid for d in dead or []] == [p.pid for p in procs]
    assert reason == "worker stopped by shutdown before finishing"
    h.now += 3600
    h.sup.check()
    assert len(h.spawned) == 2  # stopped: nothing is restarted


def test_a_clean_stop_releases_nothing() -> None:
    h = Harness(count=2)
    h.sup.start()
    h.released.clear()
    h.sup.stop(5.0)
    assert h.released == []
    assert all(p.terminated and not p.killed for _, p in h.spawned)


def test_start_looks_again_while_other_local_processes_still_hold_work() -> None:
    """A killed node's children can take seconds to disappear: while the release says
    others still hold work, it is called again every 2 s, for a minute at most."""
    h = Harness(count=1, holds_work=[True, True, False])
    h.sup.start()
    assert len(h.released) == 1
    h.now += 1.0
    h.sup.check()
    assert len(h.released) == 1
    h.now += 1.0
    h.sup.check()
    assert len(h.released) == 2 and h.released[-1][0] is None
    h.now += 2.0
    h.sup.check()
    assert len(h.released) == 3  # said "nobody else": no more looks
    h.now += 10.0
    h.sup.check()
    assert len(h.released) == 3


def test_looking_again_ends_after_a_minute() -> None:
    h = Harness(count=1, holds_work=[True] * 100)
    h.sup.start()
    for _ in range(60):
        h.now += 2.0
        h.sup.check()
    assert 25 <= len(h.released) <= 31


def test_a_failing_release_does_not_stop_supervision() -> None:
    def release(dead: Sequence[DeadChild] | None, reason: str) -> bool:
        raise RuntimeError("database gone")

    procs: list[FakeProc] = []

    def spawn(index: int) -> FakeProc:
        procs.append(FakeProc(len(procs) + 1))
        return procs[-1]

    sup = Supervisor("dispatcher", spawn, 1, release=release, clock=lambda: 0.0,
                     thread=False)
    sup.start()
    procs[-1].die()
    sup.check()
    assert len(procs) == 2 and sup.alive()


@pytest.mark.parametrize("count", [0, 1])
def test_supervisor_without_release(count: int) -> None:
    procs: list[FakeProc] = []

    def spawn(index: int) -> FakeProc:
        procs.append(FakeProc(index))
        return procs[-1]

    sup = Supervisor("receiver", spawn, count, clock=lambda: 0.0, thread=False)
    sup.start()
    assert len(procs) == count
    for p in list(procs):
        p.die()
    sup.check()
    assert len(procs) == 2 * count
    sup.stop(1.0)


def test_a_clean_exit_waits_for_the_nodes_own_stop() -> None:
    """SIGTERM to the whole process group reaches the children with the node: a child
    that exited cleanly is not restarted before the node's stop can come."""
    from dicomnode.node.supervisor import CLEAN_EXIT_GRACE_S

    h = Harness(1)
    h.sup.start()
    h.current(1).die(0)  # asked to stop, exited 0
    h.sup.check()
    assert h.spawns_of(1) == 1  # not at once, although a first restart usually is
    h.now += CLEAN_EXIT_GRACE_S - 0.1
    h.sup.check()
    assert h.spawns_of(1) == 1
    h.sup.stop(1.0)  # the node's stop arrives within the grace
    h.now += 10
    h.sup.check()
    assert h.spawns_of(1) == 1

    h2 = Harness(1)
    h2.sup.start()
    h2.current(1).die(0)
    h2.sup.check()
    h2.now += CLEAN_EXIT_GRACE_S
    h2.sup.check()  # no stop came: a child that exits on its own is restarted
    assert h2.spawns_of(1) == 2


def test_signal_handler_takes_no_lock() -> None:
    """A signal can arrive while the main thread holds an Event's (non-reentrant) lock,
    inside Event.wait or Event.set: a handler that calls Event.set() then deadlocks the
    node (it did, on two SIGTERMs at once). The handler must only record the signal."""
    import signal
    import threading

    from dicomnode.node.supervisor import on_signals

    stop = threading.Event()
    old = signal.getsignal(signal.SIGUSR1)
    try:
        on_signals(stop, signals=(signal.SIGUSR1,))
        handler = signal.getsignal(signal.SIGUSR1)
        assert callable(handler)
        done = threading.Event()

        def arrive_while_locked() -> None:
            with stop._cond:  # noqa: SLF001 - the lock Event.wait / Event.set hold
                handler(signal.SIGUSR1, None)
            done.set()

        t = threading.Thread(target=arrive_while_locked, daemon=True)
        t.start()
        t.join(5)
        assert done.is_set(), "the signal handler blocked on the event's lock"
        assert stop.wait(5), "the watcher did not set the event"
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_the_old_handler_would_deadlock() -> None:
    """The check above can fail: a handler calling Event.set() blocks on that lock."""
    import threading

    stop = threading.Event()
    done = threading.Event()

    def arrive_while_locked() -> None:
        with stop._cond:  # noqa: SLF001
            stop.set()  # what the handler used to do
        done.set()

    t = threading.Thread(target=arrive_while_locked, daemon=True)
    t.start()
    t.join(1)
    assert not done.is_set()
