"""The node's HTTP side on a real ``dicomnode serve``: a study sent by DCMTK storescu runs
through the worker and is delivered to Orthanc; ``/metrics`` (every process's metrics,
prometheus_client multiprocess mode) then counts what the database holds; ``/readyz``
follows the database file and the storage watermark; a taken ``http.port`` is a clear
start-up error. Real HTTP requests over 127.0.0.1 (urllib)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.support.infer_data import cranium_ct_series
from tests.support.notify_peers import mllp_server
from tests.support.peers import dcmtk, free_port, orthanc_running
from tests.support.pipeline_node import job_for, start_pipeline_node, wait_until
from tests.support.receive_node import (
    CT_IMAGE,
    REPO,
    NodeProcess,
    make_instance,
    node_config,
    start_node,
)

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(),
                                reason="Orthanc not installed")

CT_RULE = {"name": "ct-tissue", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
           "send": ["pacs"], "notify": ["ris", "gone"]}


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",  # noqa: S310
                                    timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    status, body = http_get(port, "/readyz")
    return status, json.loads(body)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = http_get(port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def _pids_of_last(node: NodeProcess, n: int) -> list[int]:
    """pids that served the last ``n`` accepted associations (from the node's log)."""
    def found() -> list[int] | None:
        pids = [int(p) for p in re.findall(r"association accepted .*?pid=(\d+)", node.log())]
        return pids[-n:] if len(pids) >= n else None
    return wait_until(found, 10, f"{n} associations accepted", interval=0.05)


def test_metrics_count_what_the_database_holds(tmp_path: Path) -> None:
    fx = cranium_ct_series(tmp_path / "ct", k_range=(30, 42))
    http_port = free_port()
    with orthanc_running(workdir=tmp_path / "pacs") as pacs, \
            mllp_server("AA") as (hl7_port, messages):
        node = start_pipeline_node(
            tmp_path / "node", orthanc=pacs, routes=[CT_RULE],
            http={"enabled": True, "port": http_port},
            notifications=[
                {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": hl7_port},
                # Nothing listens: retried with backoff until its deadline, then failed.
                {"name": "gone", "kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/",
                 "retry_deadline_seconds": 4, "timeout_seconds": 2}])
        try:
            assert http_get(http_port, "/healthz") == (200, b'{"status":"alive"}')
            # Ready once the worker reported its models (it validated their manifests).
            wait_until(lambda: readyz(http_port)[0] == 200, 60, "/readyz 200",
                       on_timeout=lambda: json.dumps(readyz(http_port)[1]))
            _, body = readyz(http_port)
            assert set(body["checks"]) == {"database", "storage", "scp", "services", "models"}
            assert "worker" in body["checks"]["services"]["detail"]
            assert "dispatcher" in body["checks"]["services"]["detail"]

            r = dcmtk("storescu", "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1",
                      str(node.port), *map(str, fx.paths))
            assert r.returncode == 0, r.stderr

            def delivered() -> bool:
                job = job_for(node.jobs(), fx.series_uid)
                if job is None or job["state"] != "done":
                    return False
                mine = [d for d in node.deliveries() if d["job_id"] == job["id"]]
                return len(mine) == 4 and all(
                    d["state"] == ("failed" if d["destination"] == "gone" else "done")
                    for d in mine)
            wait_until(delivered, 180, "the job done, delivered, notified (gone: failed)",
                       on_timeout=lambda: node.log()[-4000:])
            assert len(messages) == 1  # the ORU^R01 reached the MLLP listener

            with sqlite3.connect(tmp_path / "node" / "dicomnode.db") as db:
                n_instances = db.execute("SELECT count(*) FROM instances").fetchone()[0]
                n_jobs_done = db.execute(
                    "SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0]
                n_jobs = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
                n_deliv_done = db.execute(
                    "SELECT count(*) FROM deliveries WHERE state = 'done' "
                    "AND destination = 'pacs'").fetchone()[0]
                gone_attempts = db.execute(
                    "SELECT attempts FROM deliveries WHERE destination = 'gone' "
                    "AND state = 'failed'").fetchone()[0]
            assert n_instances == len(fx.paths) and n_jobs_done == n_jobs == 1
            assert n_deliv_done == 2  # SEG + SR

            m = scrape(http_port)
            assert total(m, "dicomnode_instances_received_total", calling_ae="MODALITY",
                         status="0x0000") == n_instances
            assert total(m, "dicomnode_instances_received_total") == n_instances
            sizes = sum(p.stat().st_size for p in fx.paths)
            got = total(m, "dicomnode_received_bytes_total", calling_ae="MODALITY")
            assert 0.9 * sizes < got <= sizes  # data sets without their file meta
            assert total(m, "dicomnode_series_completed_total") == n_jobs
            assert total(m, "dicomnode_jobs_finished_total", state="done") == n_jobs_done
            assert total(m, "dicomnode_job_duration_seconds_count",
                         model="ct-tissue", state="done") == n_jobs_done
            assert total(m, "dicomnode_stage_duration_seconds_count", model="ct-tissue",
                         stage="model") == n_jobs_done
            assert total(m, "dicomnode_deliveries_total", destination="pacs",
                         outcome="done") == n_deliv_done
            assert total(m, "dicomnode_deliveries_total", outcome="failed") == 0
            assert total(m, "dicomnode_notifications_total", target="ris", kind="hl7",
                         outcome="done") == 1
            # Every failed attempt but the last was scheduled again (a retry).
            assert gone_attempts >= 2
            assert total(m, "dicomnode_notifications_total", target="gone", kind="webhook",
                         outcome="retrying") == gone_attempts - 1
            assert total(m, "dicomnode_notifications_total", target="gone",
                         outcome="failed") == 1
            assert total(m, "dicomnode_retries_total", what="notification") == gone_attempts - 1
            assert total(m, "dicomnode_retries_total", what="delivery") == 0
            assert total(m, "dicomnode_outbox_deliveries", destination="gone",
                         state="failed") == 1
            assert total(m, "dicomnode_queue_jobs", state="done", priority="0") == n_jobs_done
            assert total(m, "dicomnode_outbox_deliveries", destination="pacs",
                         state="done") == n_deliv_done
            assert total(m, "dicomnode_model_loaded", model="ct-tissue") == 1
            assert total(m, "dicomnode_associations_active") == 0
            assert total(m, "dicomnode_database_up") == 1
            assert total(m, "dicomnode_disk_free_bytes") > 0

            # The database file moved away: not ready, naming it; back: ready.
            db_path = tmp_path / "node" / "dicomnode.db"
            db_path.rename(tmp_path / "node" / "moved.db")
            try:
                status, body = readyz(http_port)
                assert status == 503, body
                assert body["checks"]["database"] == {
                    "ok": False, "detail": f"database file {db_path} is missing"}
                assert body["checks"]["storage"]["ok"]
                assert http_get(http_port, "/healthz")[0] == 200  # alive all the same
            finally:
                (tmp_path / "node" / "moved.db").rename(db_path)
            assert readyz(http_port)[0] == 200
        finally:
            node.stop()


def test_readyz_storage_below_watermark_then_back(tmp_path: Path) -> None:
    http_port = free_port()
    node = start_node(tmp_path / "n", storage={"min_free_mb": 10**9},
                      node={"max_associations": 1},
                      http={"enabled": True, "port": http_port})
    try:
        status, body = readyz(http_port)
        assert status == 503
        assert not body["checks"]["storage"]["ok"]
        assert "below storage.min_free_mb 1000000000" in body["checks"]["storage"]["detail"]
        assert body["checks"]["scp"]["ok"] and body["checks"]["database"]["ok"]
        # A C-STORE is refused (0xA700), an association to the wrong AE title rejected:
        # both counted, nothing stored.
        fx = cranium_ct_series(tmp_path / "ct", k_range=(30, 31))
        r = dcmtk("storescu", "-aet", "CT1", "-aec", node.ae_title, "127.0.0.1",
                  str(node.port), str(fx.paths[0]))
        assert r.returncode != 0, r  # storescu: the store failed
        r = dcmtk("echoscu", "-aet", "CT1", "-aec", "NOTTHENODE", "127.0.0.1", str(node.port))
        assert r.returncode != 0
        m = scrape(http_port)
        assert total(m, "dicomnode_disk_min_free_bytes") == 10**9 * 1048576
        assert total(m, "dicomnode_instances_received_total", calling_ae="CT1",
                     status="0xA700") == 1
        assert total(m, "dicomnode_received_bytes_total") == 0
        assert total(m, "dicomnode_associations_refused_total", reason="called_ae_title") == 1
        assert total(m, "dicomnode_associations_active") == 0
        # One association open, a second over node.max_associations: rejected, counted.
        ae = AE(ae_title="CT1")
        ae.add_requested_context(CT_IMAGE)
        first = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert first.is_established
        assert total(scrape(http_port), "dicomnode_associations_active") == 1
        second = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert second.is_rejected
        first.release()
        m = scrape(http_port)
        assert total(m, "dicomnode_associations_refused_total", reason="max_associations") == 1
        assert total(m, "dicomnode_associations_refused_total") == 2
        assert "node.max_associations reached" in node.log()
    finally:
        node.stop()
    node = start_node(tmp_path / "n", port=node.port, storage={"min_free_mb": 0},
                      http={"enabled": True, "port": http_port})
    try:
        status, body = readyz(http_port)
        assert status == 200, body
        assert body["checks"]["models"]["detail"].startswith("no worker processes")
    finally:
        node.stop()


def test_http_port_in_use_is_a_clear_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http_port = taken.getsockname()[1]
        dicom_port = free_port()
        cfg = node_config(tmp_path, dicom_port, http={"enabled": True, "port": http_port})
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(cfg))
        res = subprocess.run([sys.executable, "-m", "dicomnode", "--config", str(path),
                              "serve"], capture_output=True, text=True, cwd=tmp_path,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                             timeout=60)
    assert res.returncode == 2, res
    assert (f"dicomnode: error: http.port: 127.0.0.1:{http_port} is already in use"
            in res.stderr), res.stderr
    assert "Traceback" not in res.stderr
    # Nothing else started: no database written, the DICOM port never opened.
    assert not (tmp_path / "dicomnode.db").exists()


def test_http_disabled_listens_on_nothing(tmp_path: Path) -> None:
    http_port = free_port()
    node = start_node(tmp_path / "n", http={"enabled": False, "port": http_port})
    try:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", http_port), timeout=2).close()
        assert not list((tmp_path / "n").glob(".metrics-*"))
    finally:
        node.stop()


def test_metrics_of_every_receiving_process_and_a_killed_one(tmp_path: Path) -> None:
    """node.receivers: 3 — each process counts its own instances and associations; /metrics
    adds them up; a receiving process killed with an association open leaves no live
    association behind in the gauge once its supervisor saw it die."""
    http_port = free_port()
    node = start_node(tmp_path / "n", node={"receivers": 3},
                      http={"enabled": True, "port": http_port})
    try:
        wait_until(lambda: b"node ready" in node.log_path.read_bytes(), 30, "node ready")
        ae = AE(ae_title="CT1")
        ae.add_requested_context(CT_IMAGE)
        assocs = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(3)]
        assert all(a.is_established for a in assocs)
        pids = _pids_of_last(node, 3)
        assert len(set(pids)) == 3, pids
        for i, a in enumerate(assocs):
            for j in range(i + 1):
                f = make_instance(tmp_path / "in" / f"{i}-{j}.dcm", sop_uid=generate_uid())
                assert a.send_c_store(dcmread(f)).Status == 0x0000
        m = scrape(http_port)
        assert total(m, "dicomnode_instances_received_total", calling_ae="CT1",
                     status="0x0000") == 6
        assert total(m, "dicomnode_associations_active") == 3
        # Kill the receiving process serving the third association (not the node process).
        victim = pids[2] if pids[2] != node.process.pid else pids[1]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: total(scrape(http_port), "dicomnode_associations_active") == 2,
                   30, "the dead process's association gone from the gauge")
        for a in assocs:
            if a.is_established:
                a.release()
        wait_until(lambda: total(scrape(http_port), "dicomnode_associations_active") == 0,
                   30, "every association closed")
        with sqlite3.connect(tmp_path / "n" / "dicomnode.db") as db:
            rows = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        # Counters of the dead process stay (counters never go down): all 6 are stored.
        assert rows == total(scrape(http_port), "dicomnode_instances_received_total") == 6
    finally:
        node.stop()
