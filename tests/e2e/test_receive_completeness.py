"""Completeness and the CLI against a real node process: quiet timer, expected count,
late instance, ``dicomnode send`` and ``dicomnode studies``."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.domain import JobState
from dicomnode.store import Store
from tests.support.receive_node import NodeProcess, make_instance, start_node, store_files

QUIET = 1.5


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    n = start_node(tmp_path_factory.mktemp("node"),
                   completion={"series_quiet_seconds": QUIET, "check_interval_seconds": 0.1})
    yield n
    assert n.stop() == 0


def _jobs(node: NodeProcess, series: str):  # type: ignore[no-untyped-def]
    with Store.open(node.settings) as store:
        return sorted(store.list_jobs(series_uid=series), key=lambda j: j.series_version)


def _wait_jobs(node: NodeProcess, series: str, count: int, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _jobs(node, series)
        if len(jobs) >= count:
            return jobs
        time.sleep(0.1)
    raise AssertionError(f"no job {count} for {series} after {timeout}s:\n{node.log()[-2000:]}")


def _series(tmp: Path, n: int, *, series: str | None = None, start: int = 1,
            expected: int | None = None) -> tuple[str, list[Path]]:
    series = series or generate_uid()
    files = [make_instance(tmp / f"{series}_{i}.dcm", series_uid=series, study_uid="1.2.3.4",
                           instance_number=i, images_in_acquisition=expected)
             for i in range(start, start + n)]
    return series, files


def test_quiet_timer_then_late_instance(node: NodeProcess, tmp_path: Path) -> None:
    series, files = _series(tmp_path, 3)
    t0 = time.monotonic()
    assert [s for _, s in store_files(node.port, files)] == [0] * 3
    assert _jobs(node, series) == []  # not complete while it may still receive
    (v1,) = _wait_jobs(node, series, 1)
    assert time.monotonic() - t0 >= QUIET
    assert v1.series_version == 1 and v1.state is JobState.PENDING
    _, late = _series(tmp_path, 1, series=series, start=4)
    assert store_files(node.port, late)[0][1] == 0
    v1_again, v2 = _wait_jobs(node, series, 2)
    assert v2.series_version == 2 and v1_again.state is JobState.SUPERSEDED
    with Store.open(node.settings) as store:
        assert len(store.series_instances(series, 2)) == 4
        assert store.job_superseded_by(v1.id) == v2.id


def test_expected_count_completes_without_waiting(node: NodeProcess, tmp_path: Path) -> None:
    series, files = _series(tmp_path, 4, expected=4)
    assert [s for _, s in store_files(node.port, files)] == [0] * 4
    # The job was committed with the last instance, before its success status.
    (job,) = _jobs(node, series)
    assert job.series_version == 1


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    return subprocess.run([sys.executable, "-m", "dicomnode", "--config",
                           str(node.config_path), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_send_and_studies_cli(node: NodeProcess, tmp_path: Path) -> None:
    series, files = _series(tmp_path / "in", 5)
    (tmp_path / "in" / "README.txt").write_text("not dicom")
    r = _cli(node, "send", str(tmp_path / "in"), "--to", f"127.0.0.1:{node.port}",
             "--called-aet", "DICOMNODE")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sent 5/5" in r.stdout and "1 non-DICOM file(s) skipped" in r.stdout
    bad = make_instance(tmp_path / "bad" / "bad.dcm", study_uid="1.2.3.x")
    r = _cli(node, "send", str(bad), files[0].as_posix(), "--to", f"127.0.0.1:{node.port}",
             "--called-aet", "DICOMNODE")
    assert r.returncode == 1
    assert "1 failed" in r.stdout and "0xC221" in r.stdout and "bad.dcm" in r.stdout
    r = _cli(node, "send", str(files[0]), "--to", f"127.0.0.1:{node.port}",
             "--called-aet", "WRONG")
    assert r.returncode == 2 and "association rejected" in r.stdout
    r = _cli(node, "studies", "--study", "1.2.3.4", "--json")
    assert r.returncode == 0, r.stderr
    (study,) = json.loads(r.stdout)
    mine = [s for s in study["series"] if s["series_uid"] == series]
    assert mine and mine[0]["instances"] == 5 and mine[0]["modality"] == "CT"
    r = _cli(node, "studies")
    assert series in r.stdout and "5 instances" in r.stdout


def test_several_receiving_processes_share_the_port(tmp_path: Path) -> None:
    import threading

    n = start_node(tmp_path / "multi", node={"receivers": 2})
    try:
        import psutil

        kids = psutil.Process(n.process.pid).children(recursive=True)
        assert len([k for k in kids if "spawn" in " ".join(k.cmdline())]) >= 1
        batches = [_series(tmp_path / f"b{i}", 10)[1] for i in range(3)]
        results: list[int | None] = []
        threads = [threading.Thread(target=lambda b=b: results.extend(
            s for _, s in store_files(n.port, b))) for b in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [0] * 30
        with Store.open(n.settings) as store:
            assert sum(se.instance_count for st in store.studies() for se in st.series) == 30
    finally:
        assert n.stop() == 0
    # Children exit with the node; multiprocessing's helper (resource tracker)
    # notices its parent is gone a moment later, so wait for them, then check.
    _, alive = psutil.wait_procs(kids, timeout=10)
    left = []
    for k in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            if k.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(k.cmdline()))
    assert not left


def test_node_on_postgresql(tmp_path: Path) -> None:
    from tests.support.receive_db import pg_schema_url, postgres_available

    if not postgres_available():
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
    with pg_schema_url() as url:
        n = start_node(tmp_path / "pg", database={"url": url},
                       completion={"series_quiet_seconds": 30})
        try:
            series, files = _series(tmp_path, 3, expected=3)
            assert [s for _, s in store_files(n.port, files)] == [0, 0, 0]
            (job,) = _jobs(n, series)  # completed by count, in the same transaction
            assert job.state is JobState.PENDING
        finally:
            assert n.stop() == 0
        assert "database migrated" in n.log()


def test_serve_rejects_bad_config_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("node:\n  port: 99999\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    r = subprocess.run([sys.executable, "-m", "dicomnode", "--config", str(cfg), "serve"],
                       capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert "node.port: 99999 is not a TCP port" in r.stderr
