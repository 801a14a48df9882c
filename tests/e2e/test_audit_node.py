"""The audit trail of a real node: start, configuration, associations, instances
received per study (sent by DCMTK storescu), a rejected peer, an operator's action, stop."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pydicom.uid import generate_uid

from dicomnode.audit import read, verify
from tests.support.peers import dcmtk
from tests.support.receive_node import make_instance, node_running, try_associate


def _trail(workdir: Path) -> list[dict]:
    return [rec for _n, rec, _raw in read(workdir / "audit.jsonl") if rec is not None]


def test_node_audit_trail(tmp_path: Path) -> None:
    study = generate_uid()
    series = generate_uid()
    files = [make_instance(tmp_path / "in" / f"{i}.dcm", study_uid=study, series_uid=series,
                           instance_number=i) for i in range(1, 6)]
    work = tmp_path / "node"
    with node_running(work, completion={"series_quiet_seconds": 0.5,
                                        "check_interval_seconds": 0.2},
                      node={"allowed_calling_aets": ["STORESCU", "TESTSCU"]}) as node:
        r = dcmtk("storescu", "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1",
                  str(node.port), *map(str, files))
        assert r.returncode == 0, r.stderr
        rejected = try_associate(node.port, node.ae_title, "LAPTOP")
        assert rejected.rejected
        # the series completes (quiet window) into a pending job; an operator cancels it
        deadline = time.monotonic() + 30
        job_id = None
        while job_id is None and time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-m", "dicomnode", "jobs", "list", "--json",
                                  "--config", str(node.config_path)],
                                 capture_output=True, text=True, timeout=60)
            jobs = json.loads(out.stdout or "[]")
            job_id = jobs[0]["id"] if jobs else None
            time.sleep(0.3)
        assert job_id is not None
        r2 = subprocess.run([sys.executable, "-m", "dicomnode", "jobs", "cancel", str(job_id),
                             "--config", str(node.config_path)],
                            capture_output=True, text=True, timeout=60)
        assert r2.returncode == 0, r2.stderr
    trail = _trail(work)
    events = [r["event"] for r in trail]
    assert events[0] == "configuration-loaded"
    assert trail[0]["config"] == str(node.config_path.resolve())
    assert len(trail[0]["config_sha256"]) == 64
    assert events[1] == "application-start" and events[-1] == "application-stop"
    accepted = [r for r in trail if r["event"] == "association-accepted"]
    # the start-up check's C-ECHO (TESTSCU) is an association too
    assert [r["calling_aet"] for r in accepted if r["calling_aet"] != "TESTSCU"] == ["STORESCU"]
    assert all(r["peer"].startswith("127.0.0.1:") for r in accepted)
    received = [r for r in trail if r["event"] == "instances-received"]
    assert len(received) == 1
    assert received[0]["study_uid"] == study and received[0]["instances"] == 5
    assert received[0]["calling_aet"] == "STORESCU"
    # the data sets as received: the files less their preamble and file meta
    assert 0 < received[0]["bytes"] < sum(f.stat().st_size for f in files)
    rej = [r for r in trail if r["event"] == "association-rejected"]
    assert len(rej) == 1 and rej[0]["calling_aet"] == "LAPTOP"
    assert rej[0]["reason"] == "calling AE title not allowed" and rej[0]["outcome"] != "success"
    action = [r for r in trail if r["event"] == "user-action"]
    assert len(action) == 1 and action[0]["action"] == "job-cancel"
    assert action[0]["job_id"] == job_id and action[0]["study_uid"] == study
    assert action[0]["source"]["role"] == "cli" and action[0]["user"]
    count, problems = verify(read(work / "audit.jsonl"))
    assert problems == [] and count == len(trail)


def test_serve_applies_retention_but_never_to_what_is_owed(tmp_path: Path) -> None:
    """The node's periodic purge: a study whose job is still pending stays, however old;
    once the job is cancelled (terminal) the next round purges it, audited."""
    study, series = generate_uid(), generate_uid()
    files = [make_instance(tmp_path / "in" / f"{i}.dcm", study_uid=study, series_uid=series,
                           instance_number=i) for i in range(1, 4)]
    work = tmp_path / "node"
    with node_running(work, completion={"series_quiet_seconds": 0.5,
                                        "check_interval_seconds": 0.2},
                      retention={"instances_days": 1e-5, "interval_seconds": 0.5}) as node:
        r = dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                  *map(str, files))
        assert r.returncode == 0, r.stderr
        storage = work / "storage" / study

        def jobs() -> list[dict]:
            out = subprocess.run([sys.executable, "-m", "dicomnode", "jobs", "list", "--json",
                                  "--config", str(node.config_path)],
                                 capture_output=True, text=True, timeout=60)
            return json.loads(out.stdout or "[]")

        deadline = time.monotonic() + 30
        while not jobs() and time.monotonic() < deadline:
            time.sleep(0.3)
        (job,) = jobs()
        time.sleep(3)  # several purge rounds: the pending job holds the study
        assert len(list(storage.rglob("*.dcm"))) == 3
        subprocess.run([sys.executable, "-m", "dicomnode", "jobs", "cancel", str(job["id"]),
                        "--config", str(node.config_path)], check=True, capture_output=True,
                       timeout=60)
        deadline = time.monotonic() + 30
        while storage.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not storage.exists()
    purged = [r for r in _trail(work) if r["event"] == "instances-purged"]
    assert [(r["study_uid"], r["instances"], r["source"]["role"]) for r in purged] == \
        [(study, 3, "node")]
