"""dicomnode/compat/pynetdicom.py: the pinned-release check, and each wrapper of a
pynetdicom internal doing what it says on real pynetdicom objects."""

from __future__ import annotations

import importlib.util
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pynetdicom import AE, evt, fsm
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket

from dicomnode import compat
from dicomnode.compat import IncompatibleLibrary
from dicomnode.compat import pynetdicom as pnd

# --------------------------------------------------------------------------- the pin


def test_require_names_package_found_and_pinned_version_in_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat.metadata, "version", lambda name: "3.1.0")
    with pytest.raises(IncompatibleLibrary) as info:
        compat.require("pynetdicom", "3.0.4")
    msg = str(info.value)
    assert "\n" not in msg
    assert "pynetdicom 3.1.0 is installed" in msg and "pynetdicom 3.0.4" in msg


def test_importing_the_compat_module_under_another_release_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat.metadata, "version", lambda name: "2.1.1")
    spec = importlib.util.find_spec("dicomnode.compat.pynetdicom")
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)  # not put in sys.modules
    with pytest.raises(IncompatibleLibrary, match=r"pynetdicom 2\.1\.1 is installed.*3\.0\.4"):
        spec.loader.exec_module(fresh)


def test_installed_release_is_the_pinned_one() -> None:
    compat.require("pynetdicom", "3.0.4")  # what the import of compat.pynetdicom checked


def test_state_and_event_names_are_pynetdicoms() -> None:
    assert "established" in fsm.STATES[pnd.STA_ESTABLISHED].lower()
    assert "local a-associate response" in fsm.STATES[pnd.STA_ACCEPT_QUEUED].lower()
    assert "transport connection closed" in fsm.EVENTS[pnd.EVT_TRANSPORT_CLOSED].lower()


# --------------------------------------------------------------------------- on real objects


@contextmanager
def _echo_scp(handlers: list[Any] | None = None) -> Iterator[tuple[AE, int]]:
    ae = AE(ae_title="COMPAT")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers or [])
    try:
        yield ae, server.server_address[1]
    finally:
        ae.shutdown()


def _associate(port: int) -> Any:
    ae = AE(ae_title="CALLER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="COMPAT")
    assert assoc.is_established
    return assoc


def test_established_and_stopped_locally_follow_the_association() -> None:
    with _echo_scp() as (_, port):
        assoc = _associate(port)
        assert pnd.dul_established(assoc.dul)
        assert not pnd.stopped_locally(assoc)
        pnd.restart_idle_timer(assoc)
        assert not assoc.dul.idle_timer_expired()
        assoc.abort()
        assert pnd.stopped_locally(assoc)
        assert not pnd.dul_established(assoc.dul)


def test_stopped_locally_once_released() -> None:
    with _echo_scp() as (_, port):
        assoc = _associate(port)
        assoc.release()
        assert pnd.stopped_locally(assoc)
        assoc.kill()  # its DUL has stopped: returns at once
        assert pnd.stopped_locally(assoc)


def test_run_before_reactor_runs_first_in_the_acceptors_thread() -> None:
    calls: list[str] = []

    def on_open(event: Any) -> None:
        pnd.run_before_reactor(event.assoc, lambda: calls.append(threading.current_thread().name))

    with _echo_scp([(evt.EVT_CONN_OPEN, on_open)]) as (_, port):
        assoc = _associate(port)
        try:
            assert assoc.send_c_echo().Status == 0x0000  # the reactor still serves
        finally:
            assoc.release()
    assert len(calls) == 1 and calls[0] != threading.current_thread().name


def test_register_server_lets_ae_shutdown_stop_it() -> None:
    ae = AE(ae_title="COMPAT")
    ae.add_supported_context(Verification)
    server = ae.make_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    pnd.register_server(ae, server)
    ae.shutdown()
    thread.join(5)
    assert not thread.is_alive()


def test_copy_context_is_independent() -> None:
    cx = PresentationContext()
    cx.abstract_syntax = Verification
    cx.transfer_syntax = ["1.2.840.10008.1.2"]
    c = pnd.copy_context(cx)
    c.add_transfer_syntax("1.2.840.10008.1.2.1")
    assert cx.transfer_syntax == ["1.2.840.10008.1.2"]
    assert c.transfer_syntax == ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
    assert c.abstract_syntax == cx.abstract_syntax


class _FakeAssoc:
    """Just what AssociationSocket.__init__ needs from an association."""

    def __init__(self) -> None:
        class _Dul:
            def __init__(self) -> None:
                self.event_queue: queue.Queue[str] = queue.Queue()

        self.dul = _Dul()


def test_socket_connected_and_transport_closed_event() -> None:
    a, b = socket.socketpair()
    try:
        s = AssociationSocket(_FakeAssoc(), client_socket=a)  # type: ignore[arg-type]
        assert s.event_queue.get_nowait() == "Evt5"
        assert pnd.socket_connected(s)
        pnd.queue_transport_closed(s)
        assert s.event_queue.get_nowait() == pnd.EVT_TRANSPORT_CLOSED
        s.close()
        assert not pnd.socket_connected(s)
    finally:
        b.close()


def test_set_store_send_chunked_returns_the_previous_value() -> None:
    before = pnd.set_store_send_chunked(False)
    try:
        assert pnd.set_store_send_chunked(True) is False
        assert pnd.set_store_send_chunked(True) is True
    finally:
        pnd.set_store_send_chunked(before)


def test_wait_for_messages_on_a_real_dimse_provider() -> None:
    with _echo_scp() as (_, port):
        assoc = _associate(port)
        try:
            pnd.wait_for_messages(assoc.dimse, 0.05)
            t0 = time.monotonic()
            assert assoc.dimse.get_msg(block=False) == (None, None)
            assert time.monotonic() - t0 >= 0.04
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
