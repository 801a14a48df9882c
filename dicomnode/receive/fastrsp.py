"""C-STORE responses encoded directly, bypassing pynetdicom's generic path.

pynetdicom builds a pydicom ``Dataset`` for every C-STORE-RSP command set and
encodes it through pydicom's writer: 0.7 ms of CPU per instance, a quarter of
the node's Python time when receiving CT slices. A C-STORE-RSP without error
details is six fixed elements; this module encodes them (Implicit VR Little
Endian, PS3.7 6.3.1 and 9.3.1.2) and sends the P-DATA-TF PDU itself when the
association is established and nothing else is queued (else through the DUL
as pynetdicom would). Anything else (other messages, error comments,
offending elements, PDUs too small) goes through pynetdicom unchanged.
``tests/unit/test_receive_fastrsp.py`` checks the bytes against pynetdicom's.
"""

from __future__ import annotations

import types
from struct import pack
from typing import Any

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dicomnode.compat.pynetdicom import dul_established

C_STORE_RSP = 0x8001
NO_DATASET = 0x0101


def ui_element(tag_elem: int, uid: str) -> bytes:
    """A UI element of group 0000 (Implicit VR LE), padded to even length with NUL."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return pack("<HHI", 0x0000, tag_elem, len(value)) + value


def us_element(tag_elem: int, value: int) -> bytes:
    """A US element of group 0000 (Implicit VR LE)."""
    return pack("<HHIH", 0x0000, tag_elem, 2, value)


def encode_store_rsp(sop_class_uid: str, sop_instance_uid: str, message_id: int,
                     status: int) -> bytes:
    """The encoded command set of a C-STORE-RSP (no data set, no error details).

    An empty UID is left out (both are optional in the response, PS3.7 9.3.1.2).
    """
    body = b"".join((
        ui_element(0x0002, sop_class_uid) if sop_class_uid else b"",
        us_element(0x0100, C_STORE_RSP),
        us_element(0x0120, message_id),
        us_element(0x0800, NO_DATASET),
        us_element(0x0900, status),
        ui_element(0x1000, sop_instance_uid) if sop_instance_uid else b"",
    ))
    return pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def p_data_tf(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU carrying ``command`` as one last-fragment command PDV (PS3.8 9.3.5)."""
    item_length = 2 + len(command)  # context ID + message control header + fragment
    return (pack(">BBI", 0x04, 0x00, 4 + item_length) + pack(">IBB", item_length, context_id,
                                                             0x03) + command)


def plain_store_rsp(p: Any) -> tuple[str, str, int, int] | None:
    if type(p) is not C_STORE or p.MessageIDBeingRespondedTo is None:
        return None
    if p.ErrorComment is not None or p.OffendingElement is not None:
        return None
    status, cls, inst = p.Status, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID
    if not isinstance(status, int) or not cls or not inst:
        return None
    return str(cls), str(inst), int(p.MessageIDBeingRespondedTo), status


def install(dimse: Any) -> None:
    """Route plain C-STORE-RSPs of one association's DIMSE provider through the fast path.

    The ``EVT_DIMSE_SENT`` notification is not triggered for them (the node binds
    no handler to it; pynetdicom's own only logs at debug level).
    """
    original = dimse.send_msg

    def send_msg(self: Any, primitive: Any, context_id: int) -> None:
        fields = plain_store_rsp(primitive)
        if fields is not None:
            cmd = encode_store_rsp(*fields)
            max_pdu = self.maximum_pdu_size
            if not max_pdu or len(cmd) + 6 <= max_pdu:
                dul = self.dul
                if (dul_established(dul) and dul.to_provider_queue.empty()
                        and dul.socket is not None):
                    # Established and nothing queued for the peer: send the PDU from
                    # this thread (P-DATA does not change the state machine's state)
                    # instead of waking the DUL thread from its 1 ms polling sleep.
                    # Transport errors reach the state machine as pynetdicom's do.
                    dul.socket.send(p_data_tf(context_id, cmd))
                    return
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + cmd))
                dul.send_pdu(pdata)
                return
        original(primitive, context_id)

    dimse.send_msg = types.MethodType(send_msg, dimse)
