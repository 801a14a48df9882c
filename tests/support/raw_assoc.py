"""A DICOM upper-layer client written from PS3.8 by hand, for protocol edge cases.

pynetdicom and DCMTK always fragment messages the same tidy way; a real
network also sees commands split over several PDUs, several fragments in one
PDU, a data set starting in the command's PDU, peers that vanish mid-data set
and peers that break the protocol. :class:`RawAssociation` sends exactly the
PDUs a test builds (loopback only).
"""

from __future__ import annotations

import socket
from struct import pack, unpack, unpack_from

APP_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_FIND_RQ = 0x0020


def _uid(s: str) -> bytes:
    b = s.encode("ascii")
    return b + b"\x00" if len(b) % 2 else b


def _item(item_type: int, body: bytes) -> bytes:
    return pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(called: str, calling: str, contexts: list[tuple[int, str, list[str]]],
                 max_pdu: int = 0) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2)."""
    items = _item(0x10, APP_CONTEXT.encode())
    for cid, abstract, tss in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, t.encode()) for t in tss)
        items += _item(0x20, pack(">BBBB", cid, 0, 0, 0) + sub)
    items += _item(0x50, _item(0x51, pack(">I", max_pdu)))
    body = (pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + b"\x00" * 32 + items)
    return pack(">BBI", 0x01, 0, len(body)) + body


def command(field: int, message_id: int, *, sop_class: str | None = None,
            sop_instance: str | None = None, has_data: bool = True,
            extra: bytes = b"") -> bytes:
    """A DIMSE request command set, Implicit VR Little Endian (PS3.7 6.3.1)."""
    def el(elem: int, value: bytes) -> bytes:
        return pack("<HHI", 0, elem, len(value)) + value

    body = b""
    if sop_class is not None:
        body += el(0x0002, _uid(sop_class))
    body += el(0x0100, pack("<H", field)) + el(0x0110, pack("<H", message_id))
    if field == C_STORE_RQ:
        body += el(0x0700, pack("<H", 0))  # priority
    body += el(0x0800, pack("<H", 0x0001 if has_data else 0x0101))
    if sop_instance is not None:
        body += el(0x1000, _uid(sop_instance))
    body += extra
    return el(0x0000, pack("<I", len(body))) + body


def pdv(context_id: int, is_command: bool, last: bool, data: bytes) -> bytes:
    ctrl = (0x01 if is_command else 0) | (0x02 if last else 0)
    return pack(">IBB", len(data) + 2, context_id, ctrl) + data


def p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return pack(">BBI", 0x04, 0, len(body)) + body


def fragments(context_id: int, is_command: bool, data: bytes, size: int) -> list[bytes]:
    """``data`` cut into PDV items of at most ``size`` bytes, the last one flagged."""
    out = []
    for i in range(0, len(data), size):
        out.append(pdv(context_id, is_command, i + size >= len(data), data[i:i + size]))
    return out or [pdv(context_id, is_command, True, b"")]


RELEASE_RQ = pack(">BBI", 0x05, 0, 4) + b"\x00" * 4


def abort_pdu() -> bytes:
    return pack(">BBI", 0x07, 0, 4) + pack(">BBBB", 0, 0, 0, 0)


def parse_command(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos < len(data):
        _, elem, length = unpack_from("<HHI", data, pos)
        out[elem] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return out


class RawAssociation:
    """One TCP connection speaking raw PDUs to a node on 127.0.0.1."""

    def __init__(self, port: int, *, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, *pdus: bytes) -> None:
        self.sock.sendall(b"".join(pdus))

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def recv_pdu(self) -> tuple[int, bytes]:
        """The next PDU: (type, body without the 6-byte header)."""
        pdu_type, _, length = unpack(">BBI", self._exact(6))
        return pdu_type, self._exact(length)

    def closed(self) -> bool:
        """True once the node closed the connection (after whatever it still sent, such
        as an A-ABORT); False if it stays open for the socket timeout."""
        try:
            while self.sock.recv(1 << 16):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def associate(self, contexts: list[tuple[int, str, list[str]]], *,
                  called: str = "DICOMNODE", calling: str = "RAWSCU",
                  max_pdu: int = 0) -> dict[int, int]:
        """Send A-ASSOCIATE-RQ; return {context id: result} from the A-ASSOCIATE-AC."""
        self.send(associate_rq(called, calling, contexts, max_pdu))
        pdu_type, body = self.recv_pdu()
        if pdu_type != 0x02:
            raise AssertionError(f"association not accepted: PDU type 0x{pdu_type:02X}")
        results, pos = {}, 68
        while pos < len(body):
            item_type, _, length = unpack_from(">BBH", body, pos)
            if item_type == 0x21:
                results[body[pos + 4]] = body[pos + 6]
            pos += 4 + length
        return results

    def responses(self, count: int) -> list[dict[int, bytes]]:
        """Read ``count`` complete response command sets (reassembling fragments)."""
        out: list[dict[int, bytes]] = []
        buf = b""
        while len(out) < count:
            pdu_type, body = self.recv_pdu()
            if pdu_type != 0x04:
                raise AssertionError(f"expected P-DATA-TF, got PDU type 0x{pdu_type:02X}")
            pos = 0
            while pos < len(body):
                length = unpack_from(">I", body, pos)[0]
                ctrl = body[pos + 5]
                assert ctrl & 0x01, "responses carry no data set"
                buf += body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if ctrl & 0x02:
                    out.append(parse_command(buf))
                    buf = b""
        return out

    def release(self) -> int:
        """A-RELEASE-RQ; return the PDU type answered (0x06 = A-RELEASE-RP)."""
        self.send(RELEASE_RQ)
        return self.recv_pdu()[0]


def status_of(rsp: dict[int, bytes]) -> int:
    return int(unpack("<H", rsp[0x0900])[0])


def message_id_of(rsp: dict[int, bytes]) -> int:
    return int(unpack("<H", rsp[0x0120])[0])
