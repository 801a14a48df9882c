"""The established phase of an association, read straight from the socket.

pynetdicom runs every association on two threads: its DUL thread reads each
PDU, decodes it into objects, runs the state machine and queues the
fragments; the association thread polls that queue, reassembles the DIMSE
message, decodes the command set with pydicom, builds a C-STORE primitive and
an event object, and calls the handler. Profiled while three DCMTK senders
pushed CT slices, that machinery was about half of the receiver's Python time
and its thread hand-offs most of the kernel's scheduling time.

Once an association is accepted, :class:`Pump` takes its socket over in the
association thread and does the common work itself: it reads P-DATA-TF PDUs
(PS3.8 9.3.5), reassembles each message's command and data set fragments,
parses the command set (Implicit VR Little Endian, PS3.7 6.3.1), hands each
C-STORE data set to the node's store and answers C-STORE and C-ECHO requests
with the encoded response. pynetdicom keeps everything else: association
negotiation before, and as soon as anything other than a plain C-STORE or
C-ECHO request arrives (A-RELEASE-RQ, A-ABORT, another DIMSE service, a
malformed command, a context that was not accepted), the PDUs read so far for
that message are given to pynetdicom's DUL exactly as its own reader would
have queued them and pynetdicom's reactor runs the rest of the association.

While the pump reads, pynetdicom's DUL thread does not touch the socket
(:attr:`TakenFlag.taken`, consulted by the socket's ``ready``) but still sends
what the association thread queues (an abort at shutdown).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from struct import pack, unpack_from
from typing import Any

from dicomnode.compat.pynetdicom import restart_idle_timer, stopped_locally
from dicomnode.logs import kv
from dicomnode.receive import fastrsp

log = logging.getLogger(__name__)

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATASET = 0x0101
MISSING_ATTRIBUTE = 0xC220  # as dicomnode.receive.scp
VERIFICATION = "1.2.840.10008.1.1"

P_DATA_TF = 0x04
# Wake-up interval while waiting for the peer: how soon a local abort (shutdown)
# or the network timeout is noticed.
_WAIT_S = 0.25
# Data set fragments are read in pieces of at most this size, so that memory grows
# only with the bytes that actually arrive (a PDU header may claim up to 4 GiB).
_CHUNK = 4 << 20


class TakenFlag:
    """Shared between the pump (association thread) and the socket's ``ready``
    (DUL thread): while ``taken``, the DUL thread must not read the socket."""

    __slots__ = ("taken", "wake")

    def __init__(self) -> None:
        self.taken = False
        self.wake = threading.Event()

    def release(self) -> None:
        self.taken = False
        self.wake.set()


class Handback(Exception):  # noqa: N818 - control flow, not an error
    """Stop pumping; let pynetdicom handle ``pdus`` (raw PDUs, in order) and the rest."""

    def __init__(self, pdus: list[bytes], *, idle: bool = False,
                 abort: bool = False) -> None:
        super().__init__()
        self.pdus = list(pdus)  # raw bytes read from the peer and not served, in order
        self.idle = idle  # nothing came for network_timeout seconds
        self.abort = abort  # protocol violation inside a data set: abort the association


class _Stop(Exception):  # noqa: N818
    """The association was aborted or killed locally: stop without handing anything back."""


def parse_command(data: bytes | bytearray) -> dict[int, bytes] | None:
    """The elements of a command set (group 0000, Implicit VR LE) by element number,
    or ``None`` if it is not a well-formed command set."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            return None
        group, elem, length = unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or length > end - pos:
            return None
        out[elem] = bytes(data[pos:pos + length])
        pos += length
    return out


def _us(cmd: dict[int, bytes], elem: int) -> int | None:
    v = cmd.get(elem)
    return unpack_from("<H", v)[0] if v is not None and len(v) == 2 else None


def _ui(cmd: dict[int, bytes], elem: int) -> str | None:
    v = cmd.get(elem)
    if v is None:
        return None
    try:
        return v.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        return None


def encode_echo_rsp(sop_class_uid: str, message_id: int, status: int) -> bytes:
    """The encoded command set of a C-ECHO-RSP (PS3.7 9.3.5.2)."""
    body = b"".join((
        fastrsp.ui_element(0x0002, sop_class_uid),
        fastrsp.us_element(0x0100, C_ECHO_RSP),
        fastrsp.us_element(0x0120, message_id),
        fastrsp.us_element(0x0800, NO_DATASET),
        fastrsp.us_element(0x0900, status),
    ))
    return pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def p_data_pdus(context_id: int, command: bytes, max_pdu: int) -> bytes:
    """``command`` as P-DATA-TF PDUs no larger than the peer's ``max_pdu`` (0: unlimited)."""
    room = len(command) if not max_pdu else max(1, max_pdu - 6)
    if len(command) <= room:
        return fastrsp.p_data_tf(context_id, command)
    out = []
    for i in range(0, len(command), room):
        piece = command[i:i + room]
        last = i + room >= len(command)
        item_length = 2 + len(piece)
        out.append(pack(">BBI", 0x04, 0x00, 4 + item_length)
                   + pack(">IBB", item_length, context_id, 0x03 if last else 0x01) + piece)
    return b"".join(out)


StoreFn = Callable[[Any, Any, str, bytes | bytearray], int]
TooLargeFn = Callable[[Any, Any, str, int], int]


class _TooLarge:
    """A data set over the size limit, read to its end and dropped."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class Pump:
    """Serve one established association's C-STORE / C-ECHO requests from its socket.

    ``store(assoc, context, command_sop_instance_uid, dataset_bytes) -> status``
    stores one instance; the pump answers with its status. A data set longer than
    ``max_dataset`` bytes (0: no limit) is read to its end without keeping its bytes
    past the limit and answered with ``too_large(assoc, context, uid, size)``; the
    association goes on. A P-DATA-TF PDU longer than ``max_pdu`` (the maximum length
    the node announced, 0: unlimited) aborts the association, logged naming the peer.
    """

    def __init__(self, assoc: Any, sock: socket.socket, flag: TakenFlag, store: StoreFn, *,
                 max_dataset: int = 0, too_large: TooLargeFn | None = None,
                 max_pdu: int = 0) -> None:
        self.assoc = assoc
        self.sock = sock
        self.flag = flag
        self.store = store
        # As pynetdicom's events show them: (context_id, abstract_syntax, transfer_syntax).
        self.contexts: dict[int, Any] = {cx.context_id: cx.as_tuple
                                         for cx in assoc.accepted_contexts}
        self.buf = bytearray(1 << 18)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.timeout = assoc.network_timeout
        self.last_io = time.monotonic()
        self.max_pdu = int(assoc.requestor.maximum_length or 0)
        self.max_dataset = max_dataset if too_large is not None else 0
        self.too_large = too_large
        self.local_max_pdu = max_pdu
        self._scratch: bytearray | None = None
        self._got = 0  # data set bytes of the message being read

    # ------------------------------------------------------------------ reading

    def _check_local(self) -> None:
        # Killed, aborted, or the state machine left "A-ASSOCIATE-AC queued" /
        # "established": closing locally.
        if stopped_locally(self.assoc):
            raise _Stop()

    def _fill(self, pending: list[bytes]) -> None:
        """Read whatever the socket has (at least one byte) into the buffer."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            # Move what is left to the front (never more than a header's worth).
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start:self.end]
            self.start, self.end = 0, n
        self.end += self._recv(self.view[self.end:], pending)

    def _recv(self, dest: memoryview, pending: list[bytes]) -> int:
        """Read at least one byte into ``dest`` (waiting for it); hand back if the
        connection closed or broke."""
        while True:
            try:
                n = self.sock.recv_into(dest, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                self._wait(pending)
                continue
            except OSError:
                self._check_local()
                raise Handback(pending) from None
            if n == 0:
                self._check_local()
                raise Handback(pending)
            self.last_io = time.monotonic()
            return n

    def _wait(self, pending: list[bytes]) -> None:
        while True:
            self._check_local()
            try:
                readable, _, _ = select.select([self.sock], [], [], _WAIT_S)
            except (OSError, ValueError):
                self._check_local()
                raise Handback(pending) from None
            if readable:
                return
            if self.timeout is not None and time.monotonic() - self.last_io > self.timeout:
                raise Handback(pending, idle=True)

    def _take(self, n: int, pending: list[bytes]) -> bytes:
        """Exactly ``n`` buffered bytes (``n`` small: headers)."""
        while self.end - self.start < n:
            self._fill(pending)
        out = bytes(self.view[self.start:self.start + n])
        self.start += n
        return out

    def _read_into(self, dest: memoryview, pending: list[bytes]) -> None:
        """Fill ``dest``: from the buffer first, then straight from the socket."""
        have = min(self.end - self.start, len(dest))
        if have:
            dest[:have] = self.view[self.start:self.start + have]
            self.start += have
        got = have
        while got < len(dest):
            got += self._recv(dest[got:], pending)

    def _discard(self, n: int) -> None:
        """Read ``n`` bytes and drop them (memory: one chunk)."""
        if self._scratch is None:
            self._scratch = bytearray(min(_CHUNK, 1 << 20))
        view = memoryview(self._scratch)
        try:
            while n:
                piece = min(n, len(view))
                self._read_into(view[:piece], [])
                n -= piece
        finally:
            view.release()

    def _check_pdu(self, length: int) -> None:
        if self.local_max_pdu and length > self.local_max_pdu:
            self._violation(f"P-DATA-TF PDU of {length} bytes exceeds node.max_pdu "
                            f"({self.local_max_pdu})")

    def _read_bytes(self, n: int, pending: list[bytes]) -> bytearray:
        out = bytearray(n)
        view = memoryview(out)
        try:
            for i in range(0, n, _CHUNK):
                self._read_into(view[i:i + _CHUNK], pending)
        finally:
            view.release()
        return out

    # ------------------------------------------------------------------ serving

    def run(self) -> Handback | None:
        """Serve until something must go to pynetdicom (returned) or the association
        is stopped locally (``None``)."""
        old_timeout = self.sock.gettimeout()
        self.sock.settimeout(None)
        try:
            while True:
                self._message()
        except Handback as hb:
            hb.pdus.append(bytes(self.buf[self.start:self.end]))  # read, not yet parsed
            return hb
        except _Stop:
            self.flag.release()
            return None
        finally:
            self.view.release()
            try:
                self.sock.settimeout(old_timeout)
            except OSError:
                pass

    def _message(self) -> None:
        """Read one DIMSE message (command, then data set if any) and serve it."""
        raw: list[bytes] = []  # raw PDUs of the command, kept until it is understood
        cmd_parts: list[bytes] = []
        ctx_id = -1
        # ---- command fragments: small, kept raw so that pynetdicom can take over
        rest: bytes = b""
        while True:
            hdr = self._take(6, raw)
            pdu_type, _, length = unpack_from(">BBI", hdr)
            if pdu_type != P_DATA_TF or length < 6:
                raw.append(hdr + self._read_bytes(length, raw))
                raise Handback(raw)
            self._check_pdu(length)
            pdu = hdr + self._read_bytes(length, raw)
            raw.append(pdu)
            pos, done = 6, False
            while pos < len(pdu):
                if len(pdu) - pos < 6:
                    raise Handback(raw)
                item_len = unpack_from(">I", pdu, pos)[0]
                if item_len < 2 or pos + 4 + item_len > len(pdu):
                    raise Handback(raw)
                cid, ctrl = pdu[pos + 4], pdu[pos + 5]
                if not ctrl & 0x01 or (ctx_id >= 0 and cid != ctx_id) or done:
                    raise Handback(raw)  # data before the command ends: pynetdicom decides
                ctx_id = cid
                cmd_parts.append(pdu[pos + 6:pos + 4 + item_len])
                pos += 4 + item_len
                if ctrl & 0x02:
                    done = True
                    rest = b""
                    if pos < len(pdu):
                        rest = pdu[pos:]  # data fragments in the same PDU
                        break
            if done:
                break
        cmd = parse_command(b"".join(cmd_parts))
        cx = self.contexts.get(ctx_id)
        if cmd is None or cx is None:
            raise Handback(raw)
        field = _us(cmd, 0x0100)
        msg_id = _us(cmd, 0x0110)
        has_data = _us(cmd, 0x0800)
        abstract = str(cx.abstract_syntax)
        if field == C_ECHO_RQ and msg_id is not None and has_data == NO_DATASET \
                and abstract == VERIFICATION and not rest:
            self._send(ctx_id, encode_echo_rsp(abstract, msg_id, 0x0000))
            return
        cls_uid = _ui(cmd, 0x0002) or ""
        inst_uid = _ui(cmd, 0x1000) or ""
        if (field != C_STORE_RQ or msg_id is None or has_data is None or has_data == NO_DATASET
                or abstract == VERIFICATION):
            raise Handback(raw)
        # ---- data set fragments: from here on the message is ours
        body = self._dataset(ctx_id, rest)
        if isinstance(body, _TooLarge):
            assert self.too_large is not None  # max_dataset is 0 without it
            status = self.too_large(self.assoc, cx, inst_uid, body.size)
        elif not cls_uid or not inst_uid:
            # Both are mandatory in a C-STORE-RQ (PS3.7 9.3.1.1); pynetdicom would fail
            # on it and leave the peer waiting. Answer "cannot understand" instead.
            log.warning("C-STORE request without Affected SOP Class/Instance UID", extra=kv(
                assoc=self.assoc.name, calling_aet=self.assoc.requestor.ae_title,
                status="0xC220", message_id=msg_id))
            status = MISSING_ATTRIBUTE
        else:
            status = self.store(self.assoc, cx, inst_uid, body)
        self._send(ctx_id, fastrsp.encode_store_rsp(cls_uid, inst_uid, msg_id, status))

    def _dataset(self, ctx_id: int, rest: bytes) -> bytes | bytearray | _TooLarge:
        """The data set's bytes, or :class:`_TooLarge` once more than ``max_dataset``
        came (the rest is read and dropped, so the next message is found)."""
        parts: list[bytes | bytearray] = []
        done = False
        self._got = 0
        if rest:
            done = self._items(rest, 0, ctx_id, parts)
        while not done:
            hdr = self._take(6, [])
            pdu_type, _, length = unpack_from(">BBI", hdr)
            if pdu_type != P_DATA_TF:
                # A release or abort in the middle of a data set: the message is lost
                # (never acknowledged); pynetdicom handles the PDU.
                raise Handback([hdr + self._read_bytes(length, [])])
            self._check_pdu(length)
            if length >= 6 + 65536:
                done = self._big_pdu(length, ctx_id, parts)
            else:
                done = self._items(self._read_bytes(length, []), 0, ctx_id, parts)
        if self.max_dataset and self._got > self.max_dataset:
            return _TooLarge(self._got)
        if len(parts) == 1:
            return parts[0]  # one fragment (a large PDU): no copy
        return b"".join(parts)

    def _items(self, pdu: bytes | bytearray, pos: int, ctx_id: int,
               parts: list[bytes | bytearray]) -> bool:
        """Collect the data fragments of a P-DATA-TF body; True once the last one came."""
        done = False
        view = memoryview(pdu)
        try:
            while pos < len(pdu):
                if done or len(pdu) - pos < 6:
                    self._violation("P-DATA-TF items after the last fragment or truncated")
                item_len = unpack_from(">I", pdu, pos)[0]
                if item_len < 2 or pos + 4 + item_len > len(pdu):
                    self._violation("presentation data value item length out of range")
                cid, ctrl = pdu[pos + 4], pdu[pos + 5]
                if cid != ctx_id or ctrl & 0x01:
                    self._violation("command or other context inside a data set")
                self._keep(parts, bytes(view[pos + 6:pos + 4 + item_len]))
                pos += 4 + item_len
                done = bool(ctrl & 0x02)
        finally:
            view.release()
        return done

    def _big_pdu(self, length: int, ctx_id: int, parts: list[bytes | bytearray]) -> bool:
        """A large P-DATA-TF: read each item's header, then its fragment straight into
        its own buffer (one copy from the kernel)."""
        left = length
        done = False
        while left:
            if done or left < 6:
                self._violation("P-DATA-TF items after the last fragment or truncated")
            head = self._take(6, [])
            item_len = unpack_from(">I", head)[0]
            cid, ctrl = head[4], head[5]
            if item_len < 2 or 4 + item_len > left:
                self._violation("presentation data value item length out of range")
            if cid != ctx_id or ctrl & 0x01:
                self._violation("command or other context inside a data set")
            if self._over(item_len - 2):
                self._discard(item_len - 2)
                parts.clear()
            else:
                parts.append(self._read_bytes(item_len - 2, []))
            left -= 4 + item_len
            done = bool(ctrl & 0x02)
        return done

    def _over(self, n: int) -> bool:
        """Count ``n`` more data set bytes; True once past ``max_dataset``."""
        self._got += n
        return bool(self.max_dataset) and self._got > self.max_dataset

    def _keep(self, parts: list[bytes | bytearray], fragment: bytes) -> None:
        if self._over(len(fragment)):
            parts.clear()  # over the limit: keep nothing more
        else:
            parts.append(fragment)

    def _violation(self, what: str) -> None:
        req = self.assoc.requestor
        log.warning("protocol error from peer: aborting association", extra=kv(
            assoc=self.assoc.name, calling_aet=req.ae_title,
            peer=f"{req.address}:{req.port}", error=what))
        raise Handback([], abort=True)

    def _send(self, ctx_id: int, command: bytes) -> None:
        try:
            self.sock.sendall(p_data_pdus(ctx_id, command, self.max_pdu))
        except OSError:
            self._check_local()
            raise Handback([]) from None


def handback(assoc: Any, flag: TakenFlag, hb: Handback,
             unread: Callable[[bytes], None]) -> None:
    """Give the association back to pynetdicom.

    The bytes the pump read but did not serve (``hb.pdus``: whole PDUs, then
    whatever was buffered after them, possibly part of a PDU) go to ``unread``,
    which makes the socket return them before anything else: pynetdicom's
    reader sees exactly the byte stream the peer sent.
    """
    if hb.abort:
        flag.release()
        assoc.abort()
        return
    data = b"".join(hb.pdus)
    if data:
        unread(data)
    if not hb.idle:
        restart_idle_timer(assoc)  # the pump, not the DUL, saw the traffic
    flag.release()
