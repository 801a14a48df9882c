"""Several receiving processes behind one port, each connection to the least busy one.

One Python process receives on one core at a time (the GIL), and three
associations in one process also spend CPU handing the GIL back and forth.
With ``node.receivers = N`` the node process accepts every connection itself
and passes it (the socket's file descriptor, over a Unix socket pair,
SCM_RIGHTS) to whichever of the N receiving processes, itself included, has
the fewest open connections; ties go to the lowest index, the node process
first. Each receiving process runs the same :class:`StorageSCP` on connections
it is given instead of a listening socket, and says when each one closes.

Kernel load balancing (SO_REUSEPORT, used before) hashes connections to
processes: three concurrent senders on three processes all landed on different
processes only 2 times in 9, so one process served two or three of them.

A receiving process that dies is restarted by the node's one restart policy
(:class:`dicomnode.node.supervisor.Supervisor`); a
connection is never given to a dead or not yet ready one (the node serves it
itself). When the node process dies, its receiving processes see their socket
pair close and stop: an orphan must not keep serving.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from dicomnode.config import Settings
from dicomnode.logs import kv, setup_logging
from dicomnode.node.supervisor import DeadChild, Proc, Supervisor, freeze_heap, on_signals
from dicomnode.receive.scp import StorageSCP
from dicomnode.store import Store
from dicomnode.telemetry import enable_from_env

log = logging.getLogger(__name__)

READY = b"r"  # child -> node: serving
CLOSED = b"c"  # child -> node: one connection closed
_READY_TIMEOUT_S = 60.0


class _Child:
    __slots__ = ("index", "proc", "chan", "ready", "active")

    def __init__(self, index: int, proc: Any, chan: socket.socket) -> None:
        self.index = index
        self.proc = proc
        self.chan = chan
        self.ready = False
        self.active = 0


class ReceiverPool:
    """The node-process side: ``count`` receiving processes and the connection counts.

    :meth:`forward` is called by the node's SCP server for every accepted
    connection; :meth:`local_closed` by the node's own SCP when one of its
    connections closes. The processes are run by a :class:`Supervisor` (the
    node's one restart policy); a dead one's connections are released by
    :meth:`_release`, and it is given none until its successor says it is ready.
    """

    name = "receivers"

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._ctx = mp.get_context("spawn")
        self._children: dict[int, _Child] = {}
        self._local_active = 0
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self.supervisor = Supervisor("receiver", self._spawn, count, release=self._release)

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, index: int) -> Proc:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        p = self._ctx.Process(target=receiver_main,
                              args=(self.settings, index, os.getpid(), theirs),
                              name=f"dicomnode-receiver-{index}", daemon=True)
        p.start()
        theirs.close()
        # A receiving process that stops reading must not block the node's accept loop:
        # after this long the connection is served by the node process instead.
        mine.settimeout(2.0)
        child = _Child(index, p, mine)
        with self._lock:
            old = self._children.get(index)
            if old is not None:
                self._drop(old)
            self._children[index] = child
            self._sel.register(mine, selectors.EVENT_READ, child)
        return p

    def _release(self, dead: Sequence[DeadChild] | None, reason: str) -> bool:
        """A receiving process died: stop counting and listening to it (its
        connections died with it); it gets no connection until restarted and ready."""
        with self._lock:
            for d in dead or ():
                c = self._children.get(d.index)
                if c is not None and c.proc.pid == d.pid:
                    c.active = 0
                    self._drop(c)
        return False

    def start(self) -> None:
        """Spawn the processes and wait until each says it is serving."""
        self.supervisor.start()
        self._reader = threading.Thread(target=self._read_loop, name="receivers-status",
                                        daemon=True)
        self._reader.start()
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            with self._lock:
                if all(c.ready for c in self._children.values()):
                    return
            time.sleep(0.02)
        log.error("receiver processes not ready in time; the node serves alone until they are",
                  extra=kv(timeout_s=_READY_TIMEOUT_S))

    def _drop(self, c: _Child) -> None:
        """Stop listening to a receiving process and close our end (idempotent)."""
        c.ready = False
        try:
            self._sel.unregister(c.chan)
        except (KeyError, ValueError):
            pass
        c.chan.close()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self.supervisor.stop(timeout)
        with self._lock:
            for c in self._children.values():
                self._drop(c)  # idempotent
        if self._reader is not None:
            self._reader.join(2)

    def alive(self) -> bool:
        return self.supervisor.alive()

    # ------------------------------------------------------------------ balancing

    def forward(self, conn: socket.socket, address: Any) -> bool:
        """Give ``conn`` to the least busy receiving process; False: serve it here.

        On True the node's copy of the socket is closed (the process has its own).
        """
        with self._lock:
            best = min((c for c in self._children.values() if c.ready),
                       key=lambda c: (c.active, c.index), default=None)
            if best is None or self._local_active <= best.active:
                self._local_active += 1  # ties: the node process serves it
                return False
            try:
                host, port = address[0], address[1]
                socket.send_fds(best.chan, [json.dumps([host, port]).encode()],
                                [conn.fileno()])
            except OSError as exc:
                log.warning("cannot hand a connection to a receiver process; serving it here",
                            extra=kv(receiver=best.index, error=str(exc)))
                if not isinstance(exc, TimeoutError):
                    best.ready = False  # gone: the supervisor restarts it
                self._local_active += 1
                return False
            best.active += 1
        conn.close()
        return True

    def local_closed(self) -> None:
        with self._lock:
            self._local_active = max(0, self._local_active - 1)

    def counts(self) -> list[int]:
        """Open connections per receiving process, the node process first."""
        with self._lock:
            return [self._local_active] + [c.active for _, c in sorted(self._children.items())]

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._sel.select(0.5)
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            for key, _ in events:
                child: _Child = key.data
                try:
                    msg = child.chan.recv(16)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    msg = b""
                with self._lock:
                    if msg == CLOSED:
                        child.active = max(0, child.active - 1)
                    elif msg == READY:
                        child.ready = True
                        log.info("receiver process ready", extra=kv(
                            receiver=child.index, pid=child.proc.pid))
                    elif not msg:  # the process is gone: the supervisor restarts it
                        child.active = 0
                        self._drop(child)


def receiver_main(settings: Settings, index: int, parent_pid: int, chan: socket.socket) -> None:
    """Entry point of a receiving process (spawned, so it starts clean)."""
    setup_logging(settings.logging.level, settings.logging.json, settings.logging.file)
    stop = threading.Event()
    on_signals(stop)  # no lock in the handler (see on_signals)
    enable_from_env()
    store = Store.open(settings)
    send_lock = threading.Lock()

    def closed() -> None:
        with send_lock:
            try:
                chan.send(CLOSED)
            except OSError:
                pass

    scp = StorageSCP(settings, store, detached=True, on_conn_close=closed)
    scp.start()
    freeze_heap()

    def take() -> None:
        while not stop.is_set():
            try:
                msg, fds, _, _ = socket.recv_fds(chan, 1024, 4)
            except OSError:
                break
            if not msg and not fds:
                break  # the node process is gone (or closed our pair)
            for fd in fds:
                conn = socket.socket(fileno=fd)
                try:
                    host, port = json.loads(msg)
                    scp.adopt(conn, (str(host), int(port)))
                except Exception:  # noqa: BLE001 - one bad hand-over must not stop us
                    log.exception("cannot serve a handed-over connection",
                                  extra=kv(receiver=index))
                    conn.close()
                    closed()
        stop.set()

    reader = threading.Thread(target=take, name=f"receiver-{index}-take", daemon=True)
    reader.start()
    with send_lock:
        chan.send(READY)
    log.info("receiver process serving", extra=kv(receiver=index, pid=os.getpid()))
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:
            break
    if os.getppid() != parent_pid or not reader.is_alive():
        log.error("node process gone; receiver stopping", extra=kv(receiver=index))
    scp.stop()
    store.close()
    chan.close()
