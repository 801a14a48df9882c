"""Bounded inputs (issue 15): instance and series size limits, association and PDU limits.

The node runs as a process; real peers (pynetdicom's SCU, DCMTK storescu, and
raw PS3.8 PDUs on a socket) send to it. A refused instance is never written,
the association goes on, and the next instance is stored.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicomnode.audit import read
from dicomnode.store import Store
from tests.support.peers import dcmtk
from tests.support.raw_assoc import (
    C_STORE_RQ,
    EXPLICIT_LE,
    RawAssociation,
    command,
    p_data,
    pdv,
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
    try_associate,
)

SMALL_ROWS = 16  # ~0.5 KiB of pixels
BIG_ROWS = 256  # ~128 KiB of pixels
LIMIT_MB = 0.05  # ~52 KiB


def _stored_uids(node: NodeProcess) -> set[str]:
    with Store.open(node.settings) as store:
        return {ref.sop_instance_uid for study in store.studies() for se in study.series
                for ref in store.series_instances(se.series_uid)}


def _files_on_disk(node: NodeProcess) -> set[str]:
    return {p.stem for p in (node.workdir / "storage").rglob("*.dcm")}


def _uid(path: Path) -> str:
    from pydicom.filereader import read_file_meta_info
    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


@pytest.mark.parametrize("fast_receive", [True, False], ids=["pump", "pynetdicom"])
def test_oversized_instance_refused_and_association_goes_on(tmp_path: Path,
                                                            fast_receive: bool) -> None:
    n = start_node(tmp_path / "node", storage={"max_instance_mb": LIMIT_MB},
                   node={"fast_receive": fast_receive})
    try:
        study, series = generate_uid(), generate_uid()
        files = [make_instance(tmp_path / f"{i}.dcm", study_uid=study, series_uid=series,
                               instance_number=i + 1, rows=rows)
                 for i, rows in enumerate([SMALL_ROWS, BIG_ROWS, SMALL_ROWS])]
        assert [s for _, s in store_files(n.port, files)] == [0x0000, 0xA702, 0x0000]
        small = {_uid(files[0]), _uid(files[2])}
        assert _stored_uids(n) == small
        assert _files_on_disk(n) == small, "nothing of the refused instance is written"
        assert not list((tmp_path / "node" / "storage").rglob("*.tmp*"))
        assert echo(n.port) == 0x0000
    finally:
        assert n.stop() == 0, n.log()[-3000:]
    log = n.log()
    assert "refusing instance: larger than storage.max_instance_mb" in log
    assert _uid(files[1]) in log and "TESTSCU" in log


def test_oversized_instance_from_dcmtk_storescu(tmp_path: Path) -> None:
    n = start_node(tmp_path / "node", storage={"max_instance_mb": LIMIT_MB})
    try:
        files = [make_instance(tmp_path / f"{i}.dcm", instance_number=i + 1, rows=rows)
                 for i, rows in enumerate([BIG_ROWS, SMALL_ROWS])]
        r = dcmtk("storescu", "-v", "-aec", "DICOMNODE", "127.0.0.1", str(n.port),
                  *[str(f) for f in files])
        out = r.stdout + r.stderr
        # storescu reports the refusal (A7xx) and, as DCMTK does on Out of Resources,
        # stops sending on that association; the node stored nothing of it.
        assert "Refused: OutOfResources" in out, out
        assert _files_on_disk(n) == set()
        r = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(n.port), str(files[1]))
        assert r.returncode == 0, r.stdout + r.stderr
        assert _stored_uids(n) == {_uid(files[1])}
        assert _files_on_disk(n) == {_uid(files[1])}
    finally:
        assert n.stop() == 0, n.log()[-3000:]


def test_series_over_the_instance_limit(tmp_path: Path) -> None:
    n = start_node(tmp_path / "node", storage={"max_series_instances": 2})
    try:
        study, series = generate_uid(), generate_uid()
        files = [make_instance(tmp_path / f"s{i}.dcm", study_uid=study, series_uid=series,
                               instance_number=i + 1) for i in range(3)]
        other = make_instance(tmp_path / "other.dcm", study_uid=study)
        statuses = [s for _, s in store_files(n.port, [*files, other])]
        assert statuses == [0x0000, 0x0000, 0xA703, 0x0000]
        # Sending an instance the series holds again replaces it: not a third instance.
        assert [s for _, s in store_files(n.port, [files[0]])] == [0x0000]
        assert _stored_uids(n) == {_uid(files[0]), _uid(files[1]), _uid(other)}
        assert _uid(files[2]) not in _files_on_disk(n)
    finally:
        assert n.stop() == 0, n.log()[-3000:]
    assert "refusing instance: series holds storage.max_series_instances" in n.log()


def test_series_over_the_size_limit(tmp_path: Path) -> None:
    n = start_node(tmp_path / "node", storage={"max_series_mb": 0.3})  # ~2 big instances
    try:
        study, series = generate_uid(), generate_uid()
        files = [make_instance(tmp_path / f"{i}.dcm", study_uid=study, series_uid=series,
                               instance_number=i + 1, rows=BIG_ROWS) for i in range(3)]
        assert [s for _, s in store_files(n.port, files)] == [0x0000, 0x0000, 0xA703]
        assert _uid(files[2]) not in _stored_uids(n) | _files_on_disk(n)
    finally:
        assert n.stop() == 0, n.log()[-3000:]
    assert "series would exceed storage.max_series_mb" in n.log()


def test_association_over_max_associations_is_logged(tmp_path: Path) -> None:
    n = start_node(tmp_path / "node", node={"max_associations": 1})
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(VERIFICATION)
        held = ae.associate("127.0.0.1", n.port, ae_title="DICOMNODE")
        assert held.is_established
        try:
            res = try_associate(n.port, "DICOMNODE", "TESTSCU")
            assert res.rejected and res.result == 2, res  # rejected-transient
        finally:
            held.release()
        assert echo(n.port) == 0x0000
    finally:
        assert n.stop() == 0, n.log()[-3000:]
    line = next(ln for ln in n.log().splitlines() if "node.max_associations reached" in ln)
    assert "TESTSCU" in line and "127.0.0.1:" in line
    trail = [rec for _n, rec, _raw in read(n.workdir / "audit.jsonl") if rec]
    rejected = [r for r in trail if r["event"] == "association-rejected"]
    assert [(r["calling_aet"], r["reason"]) for r in rejected] == \
        [("TESTSCU", "node.max_associations reached")]


@pytest.mark.parametrize("fast_receive", [True, False], ids=["pump", "pynetdicom"])
def test_pdu_over_node_max_pdu_aborts_with_a_log_line(tmp_path: Path,
                                                      fast_receive: bool) -> None:
    n = start_node(tmp_path / "node", node={"max_pdu": 16384, "fast_receive": fast_receive})
    try:
        path = make_instance(tmp_path / "big.dcm", rows=BIG_ROWS)
        uid, data = _uid(path), dataset_bytes(path)
        with RawAssociation(n.port) as a:
            a.associate([(1, CT_IMAGE, [EXPLICIT_LE])])
            try:
                a.send(p_data(pdv(1, True, True, command(C_STORE_RQ, 1, sop_class=CT_IMAGE,
                                                          sop_instance=uid, has_data=True))),
                       p_data(pdv(1, False, True, data)))  # one ~128 KiB PDU
            except (ConnectionResetError, BrokenPipeError):
                pass  # the node dropped the connection before the PDU was all sent
            assert a.closed()
        assert uid not in _stored_uids(n) | _files_on_disk(n)
        assert echo(n.port) == 0x0000
    finally:
        assert n.stop() == 0, n.log()[-3000:]
    line = next(ln for ln in n.log().splitlines() if "exceeds node.max_pdu" in ln)
    assert "127.0.0.1:" in line and "RAWSCU" in line
