"""The fast C-STORE-RSP encoder produces pynetdicom's bytes exactly."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from dicomnode.receive.fastrsp import encode_store_rsp, p_data_tf, plain_store_rsp


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC210, 0xC2FF, 0xB000])
@pytest.mark.parametrize(("cls", "inst"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.10.1234.1.1.17"),  # even / odd
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3"),
])
def test_same_bytes_as_pynetdicom(status: int, cls: str, inst: str) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = cls
    rsp.AffectedSOPInstanceUID = inst
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(1, 16382))
    ((ctx, pdv),) = pdata.presentation_data_value_list
    assert ctx == 1 and pdv[:1] == b"\x03"
    assert plain_store_rsp(rsp) == (cls, inst, 7, status)
    assert encode_store_rsp(cls, inst, 7, status) == pdv[1:]
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    assert p_data_tf(1, pdv[1:]) == pdu.encode()


def test_error_details_take_pynetdicom_path() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = "1.2.3"
    rsp.AffectedSOPInstanceUID = "1.2.4"
    rsp.Status = 0xC210
    rsp.ErrorComment = "bad"
    assert plain_store_rsp(rsp) is None
