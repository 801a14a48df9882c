"""The receive loop (dicomnode/receive/pump.py) against hand-built PDUs on a real socket.

Each test speaks raw PS3.8 PDUs to the node running as a process, so that
fragmentations no common toolkit produces are covered: commands split over
PDUs, several items in one PDU, a data set starting in the command's PDU,
peers that vanish or abort mid-data set, protocol violations, services the
loop does not serve itself (handed to pynetdicom) and a peer's tiny maximum
PDU length. After each, the node must still serve a normal peer.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.store import Store
from tests.support.raw_assoc import (
    C_ECHO_RQ,
    C_FIND_RQ,
    C_STORE_RQ,
    EXPLICIT_LE,
    RawAssociation,
    abort_pdu,
    command,
    fragments,
    message_id_of,
    p_data,
    parse_command,
    pdv,
    status_of,
)
from tests.support.receive_node import (
    CT_IMAGE,
    VERIFICATION,
    NodeProcess,
    dataset_bytes,
    echo,
    make_instance,
    start_node,
    store_files,
)

CT = 1  # presentation context ids used below
ECHO = 3
CONTEXTS = [(CT, CT_IMAGE, [EXPLICIT_LE]), (ECHO, VERIFICATION, [EXPLICIT_LE])]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    n = start_node(tmp_path_factory.mktemp("pump"), node={"network_timeout": 3})
    yield n
    assert n.stop() == 0, n.log()[-3000:]


def _instance(tmp: Path, rows: int = 64, **kw: object) -> tuple[str, bytes, Path]:
    uid = generate_uid()
    path = make_instance(tmp / f"{uid}.dcm", sop_uid=uid, rows=rows, **kw)  # type: ignore[arg-type]
    return uid, dataset_bytes(path), path


def _stored_bytes(node: NodeProcess, sop_uid: str) -> bytes | None:
    with Store.open(node.settings) as store:
        for study in store.studies():
            for se in study.series:
                for ref in store.series_instances(se.series_uid):
                    if ref.sop_instance_uid == sop_uid:
                        return Path(ref.path).read_bytes()
    return None


def _still_serves(node: NodeProcess, tmp: Path) -> None:
    assert node.alive(), node.log()[-3000:]
    assert echo(node.port) == 0x0000
    _, _, path = _instance(tmp / "after")
    assert store_files(node.port, [path]) == [(path, 0x0000)]


def _store_cmd(uid: str, msg_id: int) -> bytes:
    return command(C_STORE_RQ, msg_id, sop_class=CT_IMAGE, sop_instance=uid)


def test_odd_fragmentations_are_stored_byte_identical(node: NodeProcess, tmp_path: Path) -> None:
    uids = []
    with RawAssociation(node.port) as a:
        assert a.associate(CONTEXTS)[CT] == 0
        # 1: command split over two PDUs; data set in 7-byte fragments, 50 per PDU.
        uid, data, _ = _instance(tmp_path)
        cmd = _store_cmd(uid, 1)
        a.send(p_data(pdv(CT, True, False, cmd[:10])), p_data(pdv(CT, True, True, cmd[10:])))
        frags = fragments(CT, False, data, 7)
        for i in range(0, len(frags), 50):
            a.send(p_data(*frags[i:i + 50]))
        uids.append((uid, data))
        # 2: command and the whole data set in one PDU, as two items.
        uid, data, _ = _instance(tmp_path)
        a.send(p_data(pdv(CT, True, True, _store_cmd(uid, 2)), pdv(CT, False, True, data)))
        uids.append((uid, data))
        # 3: a large data set as one item in one PDU (read straight into its buffer).
        uid, data, _ = _instance(tmp_path, rows=512)
        a.send(p_data(pdv(CT, True, True, _store_cmd(uid, 3))), p_data(pdv(CT, False, True, data)))
        uids.append((uid, data))
        # 4: the same, fragmented in 64 KiB items across several PDUs.
        uid, data, _ = _instance(tmp_path, rows=512)
        a.send(p_data(pdv(CT, True, True, _store_cmd(uid, 4))))
        for f in fragments(CT, False, data, 65536):
            a.send(p_data(f))
        uids.append((uid, data))
        # 5: C-ECHO between stores, on the same association.
        a.send(p_data(pdv(ECHO, True, True, command(C_ECHO_RQ, 5, sop_class=VERIFICATION,
                                                    has_data=False))))
        rsps = a.responses(5)
        assert [message_id_of(r) for r in rsps] == [1, 2, 3, 4, 5]
        assert [status_of(r) for r in rsps] == [0, 0, 0, 0, 0]
        assert rsps[4][0x0100] == (0x8030).to_bytes(2, "little")  # C-ECHO-RSP
        assert rsps[0][0x1000].rstrip(b"\x00").decode() == uids[0][0]
        assert a.release() == 0x06
    for uid, data in uids:
        stored = _stored_bytes(node, uid)
        assert stored is not None, uid
        assert stored.endswith(data), "the data set must be stored exactly as received"


def test_peer_with_tiny_max_pdu_gets_fragmented_responses(node: NodeProcess,
                                                          tmp_path: Path) -> None:
    with RawAssociation(node.port) as a:
        assert a.associate(CONTEXTS, max_pdu=64)[CT] == 0
        uid, data, _ = _instance(tmp_path)
        a.send(p_data(pdv(CT, True, True, _store_cmd(uid, 9))), p_data(pdv(CT, False, True, data)))
        pdus = []
        rsp = b""
        while True:
            pdu_type, body = a.recv_pdu()
            assert pdu_type == 0x04
            # Maximum Length Received bounds the PDU's variable field (PS3.8 D.1.1).
            assert len(body) <= 64, "no PDU may exceed the peer's maximum length"
            pdus.append(body)
            rsp += body[6:]
            if body[5] & 0x02:
                break
        assert len(pdus) > 1
        assert status_of(parse_command(rsp)) == 0
        assert a.release() == 0x06
    assert _stored_bytes(node, uid) is not None


def test_peer_vanishing_mid_dataset_loses_only_that_instance(node: NodeProcess,
                                                             tmp_path: Path) -> None:
    uid, data, _ = _instance(tmp_path, rows=256)
    with RawAssociation(node.port) as a:
        a.associate(CONTEXTS)
        a.send(p_data(pdv(CT, True, True, _store_cmd(uid, 1))),
               p_data(pdv(CT, False, False, data[:1000])))
        time.sleep(0.2)
    time.sleep(0.5)
    assert _stored_bytes(node, uid) is None
    _still_serves(node, tmp_path)


def test_abort_mid_dataset(node: NodeProcess, tmp_path: Path) -> None:
    uid, data, _ = _instance(tmp_path)
    with RawAssociation(node.port) as a:
        a.associate(CONTEXTS)
        a.send(p_data(pdv(CT, True, True, _store_cmd(uid, 1))),
               p_data(pdv(CT, False, False, data[:100])), abort_pdu())
        assert a.closed()
    assert _stored_bytes(node, uid) is None
    _still_serves(node, tmp_path)


@pytest.mark.parametrize("bad", ["other_context", "command_inside_data", "item_too_long"])
def test_protocol_violation_inside_a_dataset_aborts(node: NodeProcess, tmp_path: Path,
                                                    bad: str) -> None:
    uid, data, _ = _instance(tmp_path)
    with RawAssociation(node.port) as a:
        a.associate(CONTEXTS)
        a.send(p_data(pdv(CT, True, True, _store_cmd(uid, 1))),
               p_data(pdv(CT, False, False, data[:100])))
        if bad == "other_context":
            a.send(p_data(pdv(ECHO, False, True, data[100:])))
        elif bad == "command_inside_data":
            a.send(p_data(pdv(CT, True, True, data[100:])))
        else:
            item = pdv(CT, False, True, data[100:200])
            broken = (len(item) + 50).to_bytes(4, "big") + item[4:]
            a.send(p_data(broken))
        pdu_type, _ = a.recv_pdu()
        assert pdu_type == 0x07, "the node aborts the association (A-ABORT)"
    assert _stored_bytes(node, uid) is None
    _still_serves(node, tmp_path)


def test_other_services_are_handed_to_pynetdicom(node: NodeProcess, tmp_path: Path) -> None:
    """A C-FIND on a storage context is not the loop's to serve: pynetdicom gets the
    byte stream as sent (the command PDU and the identifier PDU the loop had already
    buffered) and does what it does without the loop: it aborts at once."""
    with RawAssociation(node.port) as a:
        a.associate(CONTEXTS)
        t0 = time.monotonic()
        a.send(p_data(pdv(CT, True, True, command(C_FIND_RQ, 1, sop_class=CT_IMAGE))),
               p_data(pdv(CT, False, True, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")))
        pdu_type, _ = a.recv_pdu()
        assert pdu_type == 0x07
        # Not the 3 s network timeout: pynetdicom saw the whole message.
        assert time.monotonic() - t0 < 2.5
    _still_serves(node, tmp_path)


def test_store_request_without_instance_uid_gets_a_status(node: NodeProcess,
                                                          tmp_path: Path) -> None:
    """A C-STORE-RQ lacking the mandatory Affected SOP Instance UID is answered
    0xC220 (pynetdicom alone would leave the peer waiting); the association goes on."""
    uid, data, _ = _instance(tmp_path)
    with RawAssociation(node.port) as a:
        a.associate(CONTEXTS)
        a.send(p_data(pdv(CT, True, True, command(C_STORE_RQ, 7, sop_class=CT_IMAGE))),
               p_data(pdv(CT, False, True, data)))
        rsp = a.responses(1)[0]
        assert status_of(rsp) == 0xC220
        assert message_id_of(rsp) == 7
        uid2, data2, _ = _instance(tmp_path)
        a.send(p_data(pdv(CT, True, True, _store_cmd(uid2, 8))),
               p_data(pdv(CT, False, True, data2)))
        assert status_of(a.responses(1)[0]) == 0
        assert a.release() == 0x06
    assert _stored_bytes(node, uid) is None
    assert _stored_bytes(node, uid2) is not None
    _still_serves(node, tmp_path)


def test_idle_association_is_closed_after_network_timeout(node: NodeProcess) -> None:
    with RawAssociation(node.port) as a:
        a.associate(CONTEXTS)
        t0 = time.monotonic()
        pdu_type, _ = a.recv_pdu()  # network_timeout is 3 s in this node
        waited = time.monotonic() - t0
        # pynetdicom's network_timeout_response (A-RELEASE) or an abort.
        assert pdu_type in (0x05, 0x07), pdu_type
        assert waited >= 2.5
    assert node.alive()


def test_stop_ends_an_idle_association(tmp_path: Path) -> None:
    n = start_node(tmp_path / "n")
    try:
        with RawAssociation(n.port) as a:
            a.associate(CONTEXTS)
            assert n.stop() == 0, n.log()[-3000:]
            assert a.closed()
    finally:
        n.stop()


def test_pynetdicom_reactor_still_serves_when_the_loop_is_off(tmp_path: Path) -> None:
    n = start_node(tmp_path / "n", node={"fast_receive": False})
    try:
        _still_serves(n, tmp_path)
        uid, data, _ = _instance(tmp_path)
        with RawAssociation(n.port) as a:
            a.associate(CONTEXTS)
            a.send(p_data(pdv(CT, True, True, _store_cmd(uid, 1))),
                   p_data(*fragments(CT, False, data, 100)))
            assert status_of(a.responses(1)[0]) == 0
            assert a.release() == 0x06
        assert (_stored_bytes(n, uid) or b"").endswith(data)
    finally:
        assert n.stop() == 0, n.log()[-3000:]
