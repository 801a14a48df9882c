"""The receiving association threads wait for data instead of polling (receive/scp.py,
compat/pynetdicom.py wait_for_messages)."""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Any

from pynetdicom.transport import AssociationSocket

from dicomnode.compat.pynetdicom import wait_for_messages
from dicomnode.receive import scp


class _FakeAssoc:
    """Just what AssociationSocket.__init__ needs from an association."""

    def __init__(self) -> None:
        class _Dul:
            def __init__(self) -> None:
                self.event_queue: queue.Queue[str] = queue.Queue()

        self.dul = _Dul()


def _waiting_socket(sock: socket.socket) -> Any:
    s = AssociationSocket(_FakeAssoc(), client_socket=sock)  # type: ignore[arg-type]
    s.__class__ = scp.WaitingSocket
    return s


def test_ready_is_false_without_data_and_true_once_data_arrives() -> None:
    a, b = socket.socketpair()
    try:
        s = _waiting_socket(a)
        assert s.ready is False
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(s.ready))
        b.sendall(b"\x04")
        t.start()
        t.join(5)
        assert got == [True]
        assert s.recv(1) == bytearray(b"\x04")
    finally:
        a.close()
        b.close()


def test_ready_reports_a_closed_connection_as_pynetdicom_does() -> None:
    a, b = socket.socketpair()
    s = _waiting_socket(a)
    assert s.event_queue.get_nowait() == "Evt5"  # connection open, queued at creation
    b.close()
    assert s.ready is True  # EOF is readable: recv() then returns b'' and Evt17 follows
    a.close()  # a dead descriptor: select fails and Evt17 is queued
    s.socket = a
    assert s.ready is False
    assert s.event_queue.get_nowait() == "Evt17"


def test_non_blocking_get_waits_briefly_and_returns_a_message_at_once() -> None:
    class _Dimse:
        def __init__(self) -> None:
            self.msg_queue: queue.Queue[tuple[int, str]] = queue.Queue()

        def get_msg(self, block: bool = False) -> Any:  # pynetdicom's, for block=True
            return self.msg_queue.get(block=block)

    d = _Dimse()
    wait_for_messages(d, scp.READY_WAIT_S)
    assert d.get_msg(block=False) == (None, None)  # nothing queued: empty after the wait
    d.msg_queue.put((1, "C-STORE-RQ"))
    assert d.get_msg(block=False) == (1, "C-STORE-RQ")

    def later() -> None:
        time.sleep(0.001)
        d.msg_queue.put((3, "C-ECHO-RQ"))

    threading.Thread(target=later).start()
    got = None
    for _ in range(1000):  # served by one of the waits, never lost
        got = d.get_msg(block=False)
        if got != (None, None):
            break
    assert got == (3, "C-ECHO-RQ")
    d.msg_queue.put((5, "x"))
    assert d.get_msg(block=True) == (5, "x")  # blocking takes stay pynetdicom's
