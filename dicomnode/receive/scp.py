"""The DICOM SCP: C-ECHO and C-STORE over pynetdicom, answering with the right status.

Every C-STORE is written through :meth:`dicomnode.store.Store.ingest`, which
returns only once the file is durable and its row committed; only then does
the handler return success (0x0000). Failure statuses (all documented in the
docs/receiving.md):

========  ============================================================
0xA700    free disk below ``storage.min_free_mb`` (checked before writing)
0xA701    the store could not write the file or commit the row
0xA702    data set larger than ``storage.max_instance_mb`` (nothing written)
0xA703    the series would exceed ``storage.max_series_instances`` / ``_mb``
0xA900    SOP Class (or Instance) UID in the dataset differs from the request
0xC210    dataset cannot be decoded
0xC220    Study/Series/SOP Instance UID or SOP Class UID missing
0xC221    a UID is not a valid DICOM UID (never used in a path)
0xC2FF    unexpected error in the handler (logged with the association)
========  ============================================================
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import threading
import time
import types
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from dicomnode.audit import AuditEvent, AuditLog
from dicomnode.codec.part10 import part10_header
from dicomnode.compat.pynetdicom import (
    copy_context,
    queue_transport_closed,
    register_server,
    run_before_reactor,
    socket_connected,
    wait_for_messages,
)
from dicomnode.config import Settings
from dicomnode.errors import StoreError
from dicomnode.logs import kv
from dicomnode.receive import fastrsp, pump
from dicomnode.store import (
    IngestOutcome,
    InvalidUIDError,
    MissingAttributeError,
    Store,
    UndecodableError,
)
from dicomnode.store.parse import read_meta_fast
from dicomnode.telemetry import METRICS, guard

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_DISK = 0xA700
STORE_FAILED = 0xA701
# PS3.4 C.4.2.1.4: A7xx is "Refused: Out of Resources"; the low byte is ours.
INSTANCE_TOO_LARGE = 0xA702
SERIES_TOO_LARGE = 0xA703
SOP_MISMATCH = 0xA900
CANNOT_DECODE = 0xC210
MISSING_ATTRIBUTE = 0xC220
INVALID_UID = 0xC221
INTERNAL_ERROR = 0xC2FF


class _Contexts(list[Any]):
    """The server's supported contexts, cheap to deep-copy.

    pynetdicom deep-copies the supported contexts for every new association;
    with every storage SOP class x every transfer syntax (about 7,700 UIDs)
    that took ~0.1 s of CPU per association. Contexts hold only immutable UIDs
    and flags, so a shallow copy of each with its own transfer syntax list is
    an equivalent, independent copy (:func:`~dicomnode.compat.pynetdicom.copy_context`).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return [copy_context(cx) for cx in self]


class _Server(ThreadedAssociationServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = _Contexts(self.contexts)


class _BalancingServer(_Server):
    """The node process's server with ``node.receivers`` > 1: each accepted
    connection goes to the least busy receiving process (dicomnode/node/receivers.py)."""

    balancer: Any = None

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.balancer is not None and self.balancer.forward(request, client_address):
            return
        super().process_request(request, client_address)


class _DetachedServer(_Server):
    """A receiving process's server: no listening socket; the node process hands
    connections in (:meth:`StorageSCP.adopt`)."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass


def _recv_exactly(assoc_sock: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with the same contract (``nr_bytes`` bytes, or
    fewer if the peer closed the connection; socket errors propagate), reading
    with ``recv_into`` in large chunks; bytes given back by the pump
    (``WaitingSocket.unread_buffer``) come first."""
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    prefix = getattr(assoc_sock, "unread_buffer", None)
    if prefix:
        got = min(len(prefix), nr_bytes)
        view[:got] = prefix[:got]
        del prefix[:got]
    sock = assoc_sock.socket
    try:
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if n == 0:  # connection closed: return what arrived
                break
            got += n
    finally:
        view.release()
    if got < nr_bytes:
        del buf[got:]
    limit = getattr(assoc_sock, "pdu_limit", 0)
    if limit and nr_bytes == 6 and got == 6 and buf[0] == 0x04:
        # A P-DATA-TF header (pynetdicom reads each PDU's 6-byte header, then its
        # body): refuse one longer than we announced before its bytes are read.
        length = int.from_bytes(buf[2:6], "big")
        if length > limit:
            assoc = getattr(assoc_sock, "pdu_assoc", None)
            log.warning("protocol error from peer: aborting association", extra=kv(
                **(_assoc_fields(assoc) if assoc is not None else {}),
                error=f"P-DATA-TF PDU of {length} bytes exceeds node.max_pdu ({limit})"))
            # As if the connection had closed: pynetdicom drops it (Evt17) quietly.
            return bytearray()
    return buf


# How long the DUL thread waits in select() for the peer's next PDU before
# looking at its queues again (outgoing primitives, timers, stop flag).
READY_WAIT_S = 0.004
# How often the free disk space is asked of the file system (see _has_space).
_SPACE_CHECK_S = 0.25
# How long the DUL thread sleeps between looks at its queues while the pump
# owns the socket (a local abort at shutdown waits at most this much longer).
_TAKEN_WAIT_S = 0.02


class WaitingSocket(AssociationSocket):
    """An association socket whose ``ready`` waits briefly for data.

    pynetdicom's DUL thread polls ``ready`` (a zero-timeout select) and sleeps
    1 ms when nothing came: ~1,000 wake-ups a second per association, and with
    its association thread's own 1 ms loop an idle association cost ~6 % of a
    core (3 idle associations: 19 %), CPU the busy ones lack on a small
    machine. Waiting in select() wakes at once when data arrives and otherwise
    ~200 times a second; the DUL thread's other duties (primitives queued by
    the association thread, the ARTIM timer, stopping) wait at most
    ``READY_WAIT_S`` longer. Plain C-STORE responses bypass that queue
    (:mod:`dicomnode.receive.fastrsp`).
    """

    taken_flag: pump.TakenFlag | None = None  # set while the pump may own the socket
    unread_buffer: bytearray | None = None  # read by the pump, handed back unserved

    def unread(self, data: bytes) -> None:
        """Make ``data`` the next bytes read from this socket."""
        self.unread_buffer = bytearray(data) + (self.unread_buffer or b"")

    @property
    def ready(self) -> bool:
        if self.unread_buffer:
            return True
        flag = self.taken_flag
        if flag is not None and flag.taken:
            # The pump reads this socket (dicomnode.receive.pump): wait until it
            # gives the association back, looking at the DUL's queues meanwhile.
            flag.wake.wait(_TAKEN_WAIT_S)
            if flag.taken:
                return False
        sock = self.socket
        if sock is None or not socket_connected(self) or isinstance(sock, ssl.SSLSocket):
            return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]
        try:
            readable, _, _ = select.select([sock], [], [], READY_WAIT_S)
        except (OSError, TimeoutError, ValueError):
            queue_transport_closed(self)  # as pynetdicom does
            return False
        return bool(readable)


class _AssocStats:
    __slots__ = ("stored", "failed", "bytes", "started", "studies")

    def __init__(self) -> None:
        self.stored = 0
        self.failed = 0
        self.bytes = 0
        self.started = time.monotonic()
        self.studies: dict[str, list[int]] = {}  # Study Instance UID -> [instances, bytes]


def _assoc_fields(assoc: Any) -> dict[str, Any]:
    req = assoc.requestor
    return {"assoc": assoc.name, "calling_aet": req.ae_title,
            "peer": f"{req.address}:{req.port}"}


class StorageSCP:
    """C-ECHO + C-STORE SCP for every storage SOP class and transfer syntax.

    Parameters
    ----------
    settings
        Node settings (``node.*``, ``storage.*``).
    store
        The store every instance is written through.
    balancer
        With ``node.receivers`` > 1, in the node process: the
        :class:`~dicomnode.node.receivers.ReceiverPool` that takes accepted
        connections for the receiving processes.
    detached
        In a receiving process: do not listen; serve connections given to :meth:`adopt`.
    on_conn_close
        Called when a connection this SCP served closes.
    """

    def __init__(self, settings: Settings, store: Store, *, balancer: Any = None,
                 detached: bool = False, on_conn_close: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.balancer = balancer
        self.detached = detached
        self.on_conn_close = on_conn_close
        self.ae = self._build_ae()
        self.server: ThreadedAssociationServer | None = None
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self._space_at = -1e9
        self._space_free = 0.0
        # Series UID -> [instances, bytes, when asked] (storage.max_series_*).
        self._series_seen: dict[str, list[Any]] = {}
        # Called when an instance completed its series by count (a job is due).
        self.on_job: Any = None
        self.audit = AuditLog.from_settings(settings, role="scp")

    def _build_ae(self) -> AE:
        n = self.settings.node
        ae = AE(ae_title=n.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(n.allowed_calling_aets)
        ae.maximum_associations = n.max_associations
        ae.maximum_pdu_size = n.max_pdu
        ae.acse_timeout = n.acse_timeout
        ae.dimse_timeout = n.dimse_timeout
        ae.network_timeout = n.network_timeout
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Listen on ``node.host:node.port`` (non-blocking: associations run in threads)."""
        n = self.settings.node
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if self.on_conn_close is not None or self.balancer is not None:
            handlers.append((evt.EVT_CONN_CLOSE, self._on_conn_close))
        if self.detached:
            self.server = self.ae.make_server(("127.0.0.1", 0), evt_handlers=handlers,
                                              server_class=_DetachedServer)
            return
        server_class = _BalancingServer if self.balancer is not None else _Server
        try:
            server = self.ae.make_server((n.host, n.port), evt_handlers=handlers,
                                         server_class=server_class)
        except OSError as exc:
            raise StoreError(f"node.port: cannot listen on {n.host}:{n.port}: {exc}") from None
        if self.balancer is not None:
            server.balancer = self.balancer  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, name=f"scp-{n.port}",
                                  daemon=True)
        thread.start()
        register_server(self.ae, server)  # so that AE.shutdown() stops it too
        self.server = server

    def adopt(self, conn: socket.socket, address: tuple[str, int]) -> None:
        """Serve a connection accepted by the node process (``detached`` receivers)."""
        if self.server is None:
            raise RuntimeError("adopt() before start()")
        self.server.process_request(conn, address)

    def _on_conn_close(self, event: Any) -> None:
        if self.balancer is not None:
            self.balancer.local_closed()
        if self.on_conn_close is not None:
            self.on_conn_close()

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop listening, let running associations finish for ``grace_seconds``, then abort."""
        if self.server is not None and not self.detached:
            self.server.shutdown()
            self.server.server_close()
        elif self.server is not None:
            self.server.server_close()
        deadline = time.monotonic() + grace_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = len(self.ae.active_associations)
        if left:
            log.warning("aborting associations at shutdown", extra=kv(count=left))
        self.ae.shutdown()

    # ------------------------------------------------------------------ events

    def _on_conn_open(self, event: Any) -> None:
        # Without TCP_NODELAY small PDUs (responses) wait for Nagle + delayed ACK.
        try:
            assoc_sock = event.assoc.dul.socket
            assoc_sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):  # pragma: no cover - socket already gone
            return
        # pynetdicom reads PDUs 4 KiB per recv() call (130 calls and copies for
        # a CT slice); read straight into the PDU buffer instead.
        assoc_sock.recv = types.MethodType(_recv_exactly, assoc_sock)
        if self.settings.node.max_pdu:
            assoc_sock.pdu_limit = self.settings.node.max_pdu
            assoc_sock.pdu_assoc = event.assoc
        if type(assoc_sock) is AssociationSocket:
            assoc_sock.__class__ = WaitingSocket
        fastrsp.install(event.assoc.dimse)
        # pynetdicom's association thread polls its message queue every 1 ms; wait on it.
        wait_for_messages(event.assoc.dimse, READY_WAIT_S)
        if self.settings.node.fast_receive and type(assoc_sock) is WaitingSocket:
            self._install_pump(event.assoc, assoc_sock)

    def _install_pump(self, assoc: Any, assoc_sock: WaitingSocket) -> None:
        """Serve the association's established phase with :class:`pump.Pump`."""
        flag = pump.TakenFlag()
        assoc_sock.taken_flag = flag
        acse = assoc.acse
        send_accept = acse.send_accept

        def accept_and_take() -> None:
            # Before the A-ASSOCIATE-AC is queued: the peer cannot have sent any
            # P-DATA yet, so the DUL thread never reads a PDU meant for the pump.
            flag.taken = True
            send_accept()

        acse.send_accept = accept_and_take

        def serve_established() -> None:
            raw = assoc_sock.socket
            if flag.taken and raw is not None:
                try:
                    hb = pump.Pump(assoc, raw, flag, self._store_bytes,
                                   max_dataset=self._max_instance_bytes(),
                                   too_large=self._refuse_too_large,
                                   max_pdu=self.settings.node.max_pdu).run()
                except Exception as exc:  # noqa: BLE001 - never leave the association hanging
                    log.exception("receive loop failed: aborting association", extra=kv(
                        **_assoc_fields(assoc), error=f"{type(exc).__name__}: {exc}"))
                    hb = pump.Handback([], abort=True)
                if hb is not None:
                    pump.handback(assoc, flag, hb, assoc_sock.unread)
            flag.release()

        # pynetdicom's reactor then serves whatever the pump handed back, and the rest.
        run_before_reactor(assoc, serve_established)

    def _refusal(self, a: Any) -> tuple[dict[str, Any], str | None, str]:
        """The requestor's fields, and why pynetdicom refuses (or refused) the
        association by its AE titles: ``(fields, metric label or None, reason)``."""
        n = self.settings.node
        prim = a.requestor.primitive
        calling = str(prim.calling_ae_title).strip() if prim is not None else ""
        called = str(prim.called_ae_title).strip() if prim is not None else ""
        fields = {"assoc": a.name, "calling_aet": calling, "called_aet": called,
                  "peer": f"{a.requestor.address}:{a.requestor.port}"}
        if called != n.ae_title:
            return fields, "called_ae_title", "called AE title is not ours"
        if n.allowed_calling_aets and calling not in n.allowed_calling_aets:
            return fields, "calling_ae_title", "calling AE title not allowed"
        return fields, None, ""

    def _on_requested(self, event: Any) -> None:
        # pynetdicom rejects by itself (require_called_aet / require_calling_aet);
        # this only says why in our log, naming the peer, as it happens.
        fields, label, _ = self._refusal(event.assoc)
        if label is None:
            log.debug("association requested", extra=kv(**fields))
        elif label == "called_ae_title":
            log.warning("rejecting association: called AE title is not ours",
                        extra=kv(**fields, expected=self.settings.node.ae_title))
        else:
            log.warning("rejecting association: calling AE title not allowed",
                        extra=kv(**fields))

    def _on_rejected(self, event: Any) -> None:
        # pynetdicom rejected it: the AE-title reasons _on_requested logged, or its own
        # association limit. Counted and audited here, for every reason alike.
        fields, label, reason = self._refusal(event.assoc)
        if label is None:
            label, reason = "max_associations", "node.max_associations reached"
            log.warning("rejecting association: node.max_associations reached (transient)",
                        extra=kv(**fields, max_associations=self.settings.node.max_associations))
        with guard():
            METRICS.associations_refused.labels(label).inc()
        self.audit.safe_record(AuditEvent.ASSOCIATION_REJECTED, "minor-failure", reason=reason,
                               **fields)

    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self._stats[id(event.assoc)] = _AssocStats()
        with guard():
            METRICS.associations_active.inc()
        # pid: which receiving process serves it (node.receivers > 1)
        log.info("association accepted", extra=kv(**_assoc_fields(event.assoc),
                                                   pid=os.getpid()))
        self.audit.safe_record(AuditEvent.ASSOCIATION_ACCEPTED, **_assoc_fields(event.assoc),
                               called_aet=self.settings.node.ae_title)

    def _on_closed(self, event: Any) -> None:
        with self._lock:
            st = self._stats.pop(id(event.assoc), None)
        if st is None:
            return
        with guard():
            METRICS.associations_active.dec()
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        log.info(f"association {how}", extra=kv(
            **_assoc_fields(event.assoc), stored=st.stored, failed=st.failed,
            mb=round(st.bytes / 1e6, 2), seconds=round(time.monotonic() - st.started, 3)))
        if st.studies or st.failed:
            fields = _assoc_fields(event.assoc)
            for study_uid, (count, nbytes) in st.studies.items():
                self.audit.safe_record(AuditEvent.INSTANCES_RECEIVED, study_uid=study_uid,
                                       instances=count, bytes=nbytes, **fields)
            if st.failed:
                self.audit.safe_record(AuditEvent.INSTANCES_RECEIVED, "minor-failure",
                                       refused=st.failed, association_end=how, **fields)

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _count(self, assoc: Any, ok: bool, size: int = 0, study_uid: str = "") -> None:
        st = self._stats.get(id(assoc))
        if st is not None:
            if ok:
                st.stored += 1
                st.bytes += size
                per = st.studies.get(study_uid)
                if per is None:
                    st.studies[study_uid] = [1, size]
                else:
                    per[0] += 1
                    per[1] += size
            else:
                st.failed += 1

    def _fail(self, assoc: Any, status: int, msg: str, **fields: Any) -> int:
        log.warning(msg, extra=kv(**_assoc_fields(assoc), status=f"0x{status:04X}", **fields))
        self._count(assoc, False)
        return status

    def _on_store(self, event: Any) -> int:
        """C-STORE: validate, write durably, commit the row, then answer."""
        try:
            return self._store(event)
        except Exception as exc:  # noqa: BLE001 - any failure is a status, never a crash
            log.exception("C-STORE handler failed", extra=kv(
                **_assoc_fields(event.assoc), error=f"{type(exc).__name__}: {exc}",
                sop_instance_uid=str(getattr(event.request, "AffectedSOPInstanceUID", ""))))
            self._count(event.assoc, False)
            return INTERNAL_ERROR

    def _store(self, event: Any) -> int:
        req = event.request
        return self._store_bytes(event.assoc, event.context,
                                 str(req.AffectedSOPInstanceUID or ""), req.DataSet.getvalue())

    def _store_bytes(self, assoc: Any, ctx: Any, sop_uid_cmd: str,
                     body: bytes | bytearray) -> int:
        """Validate and store one data set as received; return the C-STORE status.

        ``ctx`` is the presentation context as pynetdicom's events give it
        (``abstract_syntax``, ``transfer_syntax``).
        """
        try:
            status = self._store_checked(assoc, ctx, sop_uid_cmd, body)
        except Exception as exc:  # noqa: BLE001 - any failure is a status, never a crash
            log.exception("C-STORE handler failed", extra=kv(
                **_assoc_fields(assoc), error=f"{type(exc).__name__}: {exc}",
                sop_instance_uid=sop_uid_cmd))
            self._count(assoc, False)
            status = INTERNAL_ERROR
        # Both receive paths (pynetdicom's handler and the pump) answer here.
        METRICS.instance(assoc.requestor.ae_title, status, len(body))
        return status

    def _max_instance_bytes(self) -> int:
        return int(self.settings.storage.max_instance_mb * 1048576)

    def _refuse_too_large(self, assoc: Any, ctx: Any, sop_uid_cmd: str, size: int) -> int:
        """The answer to a data set over ``storage.max_instance_mb`` (nothing written)."""
        status = self._fail(assoc, INSTANCE_TOO_LARGE,
                            "refusing instance: larger than storage.max_instance_mb",
                            mb=round(size / 1048576, 2),
                            max_instance_mb=self.settings.storage.max_instance_mb,
                            sop_instance_uid=sop_uid_cmd)
        with guard():
            METRICS.instance(assoc.requestor.ae_title, status, size)
        return status

    def _series_fits(self, count: int, nbytes: int, size: int) -> bool:
        cfg = self.settings.storage
        return not ((cfg.max_series_instances and count + 1 > cfg.max_series_instances)
                    or (cfg.max_series_mb and nbytes + size > cfg.max_series_mb * 1048576))

    def _series_room(self, assoc: Any, series_uid: str, sop_uid: str, size: int) -> int | None:
        """A refusal status if this instance would take its series over
        ``storage.max_series_instances`` / ``storage.max_series_mb``.

        What the series holds is asked of the store at most every ``_SPACE_CHECK_S``
        seconds per series and process, plus what this process stored since; an
        instance that seems not to fit is checked against the store before refusing
        (an instance sent again replaces itself and always fits).
        """
        cfg = self.settings.storage
        if not cfg.max_series_instances and not cfg.max_series_mb:
            return None
        now = time.monotonic()
        with self._lock:
            seen = self._series_seen.get(series_uid)
        if (seen is not None and now - seen[2] <= _SPACE_CHECK_S
                and self._series_fits(seen[0], seen[1], size)):
            return None
        try:
            count, nbytes = self.store.series_usage(series_uid, sop_uid,
                                                    with_bytes=bool(cfg.max_series_mb))
        except StoreError as exc:
            return self._fail(assoc, STORE_FAILED, "cannot check the series size limit",
                              error=str(exc), sop_instance_uid=sop_uid)
        with self._lock:
            if len(self._series_seen) > 4096:
                self._series_seen.clear()
            self._series_seen[series_uid] = [count, nbytes, now]
        if cfg.max_series_instances and count + 1 > cfg.max_series_instances:
            return self._fail(assoc, SERIES_TOO_LARGE,
                              "refusing instance: series holds storage.max_series_instances",
                              series_uid=series_uid, instances=count,
                              max_series_instances=cfg.max_series_instances,
                              sop_instance_uid=sop_uid)
        if cfg.max_series_mb and nbytes + size > cfg.max_series_mb * 1048576:
            return self._fail(assoc, SERIES_TOO_LARGE,
                              "refusing instance: series would exceed storage.max_series_mb",
                              series_uid=series_uid, mb=round(nbytes / 1048576, 2),
                              max_series_mb=cfg.max_series_mb, sop_instance_uid=sop_uid)
        return None

    def _has_space(self, incoming: int) -> bool:
        """``storage.min_free_mb`` is still free after ``incoming`` more bytes.

        The file system is asked (statvfs) at most every ``_SPACE_CHECK_S`` seconds
        per process; in between, the bytes this process wrote are subtracted from
        the last answer, so the check stays conservative for this process's writes.
        """
        now = time.monotonic()
        with self._lock:
            if now - self._space_at > _SPACE_CHECK_S:
                self._space_free = self.store.free_mb() * 1048576
                self._space_at = now
            if self._space_free - incoming < self.settings.storage.min_free_mb * 1048576:
                return False
            self._space_free -= incoming
        return True

    def _store_checked(self, assoc: Any, ctx: Any, sop_uid_cmd: str,
                       body: bytes | bytearray) -> int:
        limit = self._max_instance_bytes()
        if limit and len(body) > limit:
            # pynetdicom's own path has the whole data set in memory by now (never on disk).
            return self._fail(assoc, INSTANCE_TOO_LARGE,
                              "refusing instance: larger than storage.max_instance_mb",
                              mb=round(len(body) / 1048576, 2),
                              max_instance_mb=self.settings.storage.max_instance_mb,
                              sop_instance_uid=sop_uid_cmd)
        if not self._has_space(len(body)):
            return self._fail(assoc, OUT_OF_DISK, "refusing instance: disk space below minimum",
                              free_mb=round(self.store.free_mb()),
                              min_free_mb=self.settings.storage.min_free_mb,
                              sop_instance_uid=sop_uid_cmd)
        # Write exactly the bytes received, behind a file meta group of our own
        # (pynetdicom's encoder builds a pydicom Dataset per instance: too slow).
        calling = assoc.requestor.ae_title
        head = part10_header(str(ctx.abstract_syntax), sop_uid_cmd, str(ctx.transfer_syntax),
                             calling)
        try:
            meta = read_meta_fast(head, body, str(ctx.transfer_syntax))
        except UndecodableError as exc:
            return self._fail(assoc, CANNOT_DECODE, "cannot decode dataset", error=str(exc),
                              sop_instance_uid=sop_uid_cmd)
        except MissingAttributeError as exc:
            return self._fail(assoc, MISSING_ATTRIBUTE, "required attribute missing",
                              error=str(exc), sop_instance_uid=sop_uid_cmd)
        except InvalidUIDError as exc:
            return self._fail(assoc, INVALID_UID, "invalid UID", error=str(exc),
                              sop_instance_uid=sop_uid_cmd)
        ctx_class = str(ctx.abstract_syntax)
        if meta.sop_class_uid != ctx_class:
            return self._fail(assoc, SOP_MISMATCH, "SOP Class UID differs from the context",
                              dataset_sop_class=meta.sop_class_uid, context_sop_class=ctx_class,
                              sop_instance_uid=meta.sop_instance_uid)
        if sop_uid_cmd and meta.sop_instance_uid != sop_uid_cmd:
            return self._fail(assoc, SOP_MISMATCH, "SOP Instance UID differs from the command",
                              dataset_sop_instance=meta.sop_instance_uid,
                              command_sop_instance=sop_uid_cmd)
        refused = self._series_room(assoc, meta.series_uid, meta.sop_instance_uid, len(body))
        if refused is not None:
            return refused
        meta = meta.with_peer(calling, self.settings.node.ae_title)
        try:
            result = self.store.ingest(meta, (head, body))
        except OSError as exc:
            status = OUT_OF_DISK if exc.errno in (errno.ENOSPC, errno.EDQUOT) else STORE_FAILED
            return self._fail(assoc, status, "cannot write instance", error=str(exc),
                              sop_instance_uid=meta.sop_instance_uid)
        except StoreError as exc:
            return self._fail(assoc, STORE_FAILED, "cannot record instance", error=str(exc),
                              sop_instance_uid=meta.sop_instance_uid)
        self._count(assoc, True, len(body), meta.study_uid)
        if result.outcome is IngestOutcome.STORED and self._series_seen:
            with self._lock:
                seen = self._series_seen.get(meta.series_uid)
                if seen is not None:
                    seen[0] += 1
                    seen[1] += len(body)
        if result.job is not None:
            with guard():
                METRICS.series_completed.inc()
            if self.on_job is not None:
                self.on_job()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("instance stored", extra=kv(
                **_assoc_fields(assoc), outcome=result.outcome.value,
                study_uid=meta.study_uid, series_uid=meta.series_uid,
                sop_instance_uid=meta.sop_instance_uid, version=result.series_version))
        return SUCCESS
