"""Crash safety: kill -9 the node mid-series; every acknowledged instance survives."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicomnode.store import Store
from dicomnode.store._common import instances
from tests.support.receive_node import make_instance, start_node, store_files

N = 200


def _sop(p: Path) -> str:
    return str(read_file_meta_info(p).MediaStorageSOPInstanceUID)


@pytest.mark.slow
def test_kill9_mid_series_loses_nothing_acknowledged(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    files = [make_instance(tmp_path / "src" / f"{i:03d}.dcm", study_uid=study,
                           series_uid=series, instance_number=i + 1, rows=64)
             for i in range(N)]
    workdir = tmp_path / "node"
    node = start_node(workdir)
    results: list[tuple[Path, int | None]] = []

    def sender() -> None:
        # A short DIMSE timeout: the C-STORE in flight when the node dies gets no answer.
        results.extend(store_files(node.port, files, timeout=5))

    t = threading.Thread(target=sender)
    t.start()
    # Kill once the node has acknowledged some instances (the sender is mid-series).
    deadline = time.monotonic() + 60
    db = workdir / "dicomnode.db"
    while time.monotonic() < deadline:
        if db.exists() and len(list((workdir / "storage").rglob("*.dcm"))) >= 60:
            break
        time.sleep(0.01)
    node.kill9()
    t.join(60)
    acked = [p for p, status in results if status == 0x0000]
    assert 0 < len(acked) < N, f"kill landed outside the series ({len(acked)} acked)"

    node = start_node(workdir, port=node.port)  # restart: migrations + reconciliation
    try:
        with Store.open(node.settings) as store:
            stored = {r.sop_instance_uid: r for r in store.series_instances(series)}
        for p in acked:
            ref = stored.get(_sop(p))
            assert ref is not None, f"acknowledged {p.name} lost"
            assert ref.path.is_file()
        # The sender resends everything not acknowledged (and may resend the rest).
        rest = [p for p in files if p not in acked]
        resent = store_files(node.port, rest + acked[:5])
        assert all(status == 0x0000 for _, status in resent)
        with Store.open(node.settings) as store:
            refs = store.series_instances(series)
            with store.engine.connect() as conn:
                rows = conn.execute(select(func.count()).select_from(instances)).scalar_one()
        assert len(refs) == N and rows == N  # no duplicates
        assert {r.sop_instance_uid for r in refs} == {_sop(p) for p in files}
        assert len(list((workdir / "storage").rglob("*.dcm"))) == N
        assert not list((workdir / "storage").rglob("*.tmp"))
    finally:
        assert node.stop() == 0
    assert "store reconciled with database" in node.log()


def test_receivers_stop_when_the_node_is_killed(tmp_path: Path) -> None:
    import psutil

    node = start_node(tmp_path / "node", node={"receivers": 2})
    kids = psutil.Process(node.process.pid).children(recursive=True)
    receivers = [k for k in kids if "spawn" in " ".join(k.cmdline())]
    assert receivers
    node.kill9()
    gone, alive = psutil.wait_procs(receivers, timeout=15)
    assert not alive, "an orphaned receiver kept the node's port"
