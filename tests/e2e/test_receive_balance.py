"""node.receivers > 1: every connection goes to the least busy receiving process."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import psutil
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.support.receive_node import (
    CT_IMAGE,
    VERIFICATION,
    NodeProcess,
    make_instance,
    start_node,
)


def _open(port: int, n: int) -> list[Any]:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(CT_IMAGE)
    assocs = [ae.associate("127.0.0.1", port, ae_title="DICOMNODE") for _ in range(n)]
    assert all(a.is_established for a in assocs)
    return assocs


def _pids_of_last(node: NodeProcess, n: int) -> list[int]:
    """pids that served the last ``n`` accepted associations (from the node's log)."""
    deadline = time.monotonic() + 10
    while True:
        pids = [int(m) for m in re.findall(r"association accepted .*?pid=(\d+)", node.log())]
        if len(pids) >= n or time.monotonic() > deadline:
            return pids[-n:]
        time.sleep(0.05)


def _receivers(node: NodeProcess) -> list[psutil.Process]:
    kids = psutil.Process(node.process.pid).children(recursive=True)
    return [k for k in kids if "spawn_main" in " ".join(k.cmdline())]


def test_concurrent_associations_spread_over_processes(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", node={"receivers": 3})
    try:
        for _round in range(2):  # the second round shows closed connections were counted
            assocs = _open(node.port, 3)
            try:
                pids = _pids_of_last(node, 3)
                assert len(set(pids)) == 3, f"three associations, three processes: {pids}"
                for i, a in enumerate(assocs):
                    f = make_instance(tmp_path / f"r{_round}" / f"{i}.dcm", sop_uid=generate_uid())
                    assert a.send_c_store(dcmread(f)).Status == 0x0000
                    assert a.send_c_echo().Status == 0x0000
            finally:
                for a in assocs:
                    a.release()
            time.sleep(0.5)  # the receivers report their closed connections
        kinds = {p.pid for p in _receivers(node)}
        assert set(_pids_of_last(node, 6)) <= kinds | {node.process.pid}
    finally:
        assert node.stop() == 0, node.log()[-3000:]


def test_a_dead_receiver_is_replaced_and_never_given_connections(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", node={"receivers": 2})
    try:
        [child] = _receivers(node)
        child.kill()
        child.wait(10)
        # Meanwhile every connection is served (by the node process).
        for _ in range(3):
            [a] = _open(node.port, 1)
            assert a.send_c_echo().Status == 0x0000
            a.release()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = [p for p in _receivers(node) if p.pid != child.pid and p.is_running()]
            if now and "receiver process ready" in node.log().split("died; restarting")[-1]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("receiver not restarted:\n" + node.log()[-3000:])
        assocs = _open(node.port, 2)
        try:
            assert len(set(_pids_of_last(node, 2))) == 2
        finally:
            for a in assocs:
                a.release()
        assert "receiver process died; restarting" in node.log()
    finally:
        assert node.stop() == 0, node.log()[-3000:]
