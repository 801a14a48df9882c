"""pynetdicom internals dicomnode relies on, each behind one named function.

Written and tested against pynetdicom 3.0.4 (checked at import: any other release
fails at once with one line, see :func:`dicomnode.compat.require`). Nothing else in
dicomnode reads or writes a leading-underscore name of a pynetdicom object, imports a
private pynetdicom module or spells one of its state machine's state or event names.

What each function relies on, and why the node needs it, is in its docstring. In
short:

* receiving (``dicomnode.receive``): the state machine's state names
  (:data:`STA_ESTABLISHED`, :data:`STA_ACCEPT_QUEUED`) and the transport-closed event
  (:data:`EVT_TRANSPORT_CLOSED`), the association's kill flags, the DUL's idle timer,
  the reactor entry point (:func:`run_before_reactor`), the acceptor loop's
  non-blocking ``get_msg`` (:func:`wait_for_messages`), the socket's connected flag,
  presentation contexts' transfer syntax lists (:func:`copy_context`) and the AE's
  server list (:func:`register_server`);
* sending (``dicomnode.dispatch.scu``): the configuration module ``pynetdicom._config``
  (:func:`set_store_send_chunked`) and the reactor's request handler
  (:func:`guard_reactor_race`).

These functions sit on the receive path: they are plain module-level functions
with no indirection beyond the call itself.
"""

from __future__ import annotations

import copy
import logging
import queue
from typing import Any

from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from dicomnode.compat import require
from dicomnode.logs import kv

require("pynetdicom", "3.0.4")

log = logging.getLogger(__name__)

__all__ = [
    "EVT_TRANSPORT_CLOSED",
    "STA_ACCEPT_QUEUED",
    "STA_ESTABLISHED",
    "copy_context",
    "dul_established",
    "guard_reactor_race",
    "queue_transport_closed",
    "register_server",
    "restart_idle_timer",
    "run_before_reactor",
    "set_store_send_chunked",
    "socket_connected",
    "stopped_locally",
    "wait_for_messages",
]

#: The DUL state machine's "Data Transfer" state (association established), PS3.8 9.2.
STA_ESTABLISHED = "Sta6"
#: "Awaiting local A-ASSOCIATE response primitive": an acceptor's state until its
#: DUL thread has sent the A-ASSOCIATE-AC that the association thread queued.
STA_ACCEPT_QUEUED = "Sta3"
#: The DUL event "transport connection closed indication", PS3.8 9.2.
EVT_TRANSPORT_CLOSED = "Evt17"
_PUMP_STATES = (STA_ACCEPT_QUEUED, STA_ESTABLISHED)


# --------------------------------------------------------------------------- receiving


def copy_context(cx: Any) -> Any:
    """An independent copy of a presentation context, without ``copy.deepcopy``.

    Relies on ``PresentationContext._transfer_syntax`` being its only mutable part (a
    list of UIDs; everything else is immutable UIDs and flags). pynetdicom deep-copies
    the supported contexts for every new association; with every storage SOP class x
    every transfer syntax that took ~0.1 s of CPU per association.
    """
    c = copy.copy(cx)
    c._transfer_syntax = list(cx._transfer_syntax)
    return c


def register_server(ae: Any, server: Any) -> None:
    """Add a server made by ``AE.make_server`` to the AE's own list (``AE._servers``).

    ``AE.start_server`` does this itself; the node starts its server thread on its own
    (``make_server`` + ``serve_forever``), and only servers in that list are stopped by
    ``AE.shutdown()``.
    """
    ae._servers.append(server)


def socket_connected(assoc_sock: AssociationSocket) -> bool:
    """``AssociationSocket._is_connected`` is not ``False``.

    pynetdicom's own ``ready`` answers ``False`` without looking at the socket once this
    flag is cleared (connection closed or failed); the node's waiting ``ready``
    (:class:`dicomnode.receive.scp.WaitingSocket`) leaves that case to pynetdicom.
    """
    return assoc_sock._is_connected is not False


def queue_transport_closed(assoc_sock: AssociationSocket) -> None:
    """Tell the DUL state machine that the transport connection closed.

    Queues :data:`EVT_TRANSPORT_CLOSED` on the socket's event queue, as pynetdicom's
    ``AssociationSocket.ready`` does when ``select()`` fails on a dead descriptor.
    """
    assoc_sock.event_queue.put(EVT_TRANSPORT_CLOSED)


def dul_established(dul: Any) -> bool:
    """The DUL state machine is in :data:`STA_ESTABLISHED` (``state_machine.current_state``).

    The fast C-STORE-RSP path (:mod:`dicomnode.receive.fastrsp`) sends a P-DATA-TF
    itself only then; in any other state the response goes through the DUL.
    """
    return bool(dul.state_machine.current_state == STA_ESTABLISHED)


def stopped_locally(assoc: Any) -> bool:
    """The association was killed, aborted or is closing on our side.

    Relies on ``Association._kill`` (set by ``Association.kill``), ``DULServiceProvider.
    _kill_thread`` (the DUL thread is stopping) and the state machine's state: while
    :mod:`dicomnode.receive.pump` owns the socket the state is :data:`STA_ACCEPT_QUEUED`
    (the A-ASSOCIATE-AC is still queued) or :data:`STA_ESTABLISHED`; any other state
    means a local release or abort began.
    """
    dul = assoc.dul
    return bool(assoc._kill or assoc.is_aborted or dul._kill_thread
                or dul.state_machine.current_state not in _PUMP_STATES)


def restart_idle_timer(assoc: Any) -> None:
    """Restart the DUL's network idle timer (``DULServiceProvider._idle_timer``).

    The pump, not the DUL, read the peer's traffic; without this the association would
    time out ``network_timeout`` seconds after the pump took over.
    """
    assoc.dul._idle_timer.restart()


def run_before_reactor(assoc: Association, before: Any) -> None:
    """Call ``before()`` in the association thread, then pynetdicom's reactor.

    Wraps ``Association._run_reactor``, the loop an acceptor's association thread runs
    once the association is established (after ``EVT_ACCEPTED``): the pump serves the
    established phase there and hands what it does not serve back before the reactor
    starts.
    """
    run_reactor = assoc._run_reactor

    def reactor() -> None:
        before()
        run_reactor()

    assoc._run_reactor = reactor  # type: ignore[method-assign]


def wait_for_messages(dimse: Any, timeout: float) -> None:
    """Let the association thread wait for the next DIMSE message instead of polling.

    Relies on pynetdicom's acceptor loop (``Association._run_reactor``) sleeping 1 ms,
    then taking a message with ``DIMSEServiceProvider.get_msg(block=False)``. Here the
    non-blocking take waits up to ``timeout`` seconds on ``dimse.msg_queue``: a message
    arriving is served at once, an idle association wakes its thread ~1/timeout
    instead of ~1,000 times a second. Release, abort and timeout checks of the loop
    come at most that much later. Blocking takes stay pynetdicom's.
    """
    msg_queue = dimse.msg_queue
    original = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if block:
            return original(block)
        try:
            return msg_queue.get(timeout=timeout)
        except queue.Empty:
            return None, None

    dimse.get_msg = get_msg


# --------------------------------------------------------------------------- sending


def set_store_send_chunked(enabled: bool) -> bool:
    """Set ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET``; return the previous value.

    With it, ``send_c_store(path)`` streams the data set bytes from the file instead of
    decoding and re-encoding them (the file goes out exactly as stored, in bounded
    memory; it then requires an exact transfer syntax match). Datasets passed as
    objects are unaffected. ``pynetdicom._config`` is pynetdicom's documented switch
    module, but a private module by name.
    """
    previous = bool(pynetdicom_config.STORE_SEND_CHUNKED_DATASET)
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = enabled
    return previous


def guard_reactor_race(assoc: Association) -> None:
    """Hand back DIMSE responses that pynetdicom's reactor thread takes by mistake.

    pynetdicom 3.0 pauses its reactor around ``send_c_store`` with an event and
    an ``_is_paused`` flag, but after one C-STORE the flag still reads "paused"
    until the reactor thread runs again. A fast peer's next C-STORE-RSP can then
    be dequeued by the waking reactor, which logs "Received unexpected C-STORE
    service message" and drops it; ``send_c_store`` waits the whole DIMSE
    timeout and aborts the association. Seen here about once in 1000 C-STOREs
    to DCMTK storescp on a busy 2-core machine. The reactor only ever serves
    *requests* on our (requestor) side, so a response reaching it
    (``Association._serve_request``) is put back on the queue that
    ``send_c_store`` is blocked on.
    """
    serve = assoc._serve_request

    def _serve(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and msg.is_valid_response:
            log.debug("returning a DIMSE response taken by the pynetdicom reactor",
                      extra=kv(msg_type=msg.msg_type, context_id=context_id))
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = _serve  # type: ignore[method-assign]
