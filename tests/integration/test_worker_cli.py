"""The operations CLI and ``dicomnode worker`` as a user runs them (subprocesses), and the
documented errors of invalid configurations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicomnode.domain import DeliveryState, JobState
from dicomnode.store import Store
from dicomnode.worker import Worker
from tests.support.infer_data import cranium_ct_series
from tests.support.peers import free_port, orthanc_running
from tests.support.pipeline_env import (
    destination,
    ingest_series,
    orthanc_by_modality,
    pipeline_settings,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]
CT_RULE = {"name": "ct-tissue", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
           "send": ["pacs"]}


def dicomnode(config: Path | None, *args: str,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    cmd = [sys.executable, "-m", "dicomnode"]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


# --------------------------------------------------------------------------- invalid configs


@pytest.mark.parametrize(("routes", "message"), [
    ([{"name": "bad", "when": {"Modality": "CT"}, "models": ["nope"], "send": ["pacs"]}],
     "routes[0] (bad): models[0]: unknown model 'nope'"),
    ([{"name": "bad", "when": {"Modality": "CT"}, "models": ["ct-tissue"], "send": ["nowhere"]}],
     "routes[0] (bad): send[0]: unknown destination 'nowhere'"),
    ([{"name": "re", "when": {"SeriesDescription": {"regex": "("}}, "forward": ["pacs"]}],
     "routes[0] (re)"),
])
def test_worker_refuses_invalid_routes(tmp_path: Path, routes: list, message: str) -> None:
    cfg = write_config(tmp_path, routes=routes,
                       destinations=[destination("pacs", free_port(), "PACS")])
    res = dicomnode(cfg, "worker", "--once")
    assert res.returncode == 2, res
    assert res.stderr.startswith("dicomnode: error: "), res.stderr
    assert message in res.stderr, res.stderr


def test_serve_refuses_invalid_routes_and_stops(tmp_path: Path) -> None:
    routes = [{"name": "bad", "when": {"Modality": "CT"}, "models": ["nope"]}]
    cfg = write_config(tmp_path, routes=routes,
                       destinations=[destination("pacs", free_port(), "PACS")],
                       node={"port": free_port()})
    res = dicomnode(cfg, "serve")
    assert res.returncode == 2, res
    assert "routes[0] (bad): models[0]: unknown model 'nope'" in res.stderr, res.stderr


@pytest.mark.parametrize(("section", "values", "message"), [
    ("worker", {"max_attempts": 0}, "worker.max_attempts: must be at least 1"),
    ("worker", {"lease_seconds": 0}, "worker.lease_seconds: must be > 0"),
    ("worker", {"procesess": 2}, "worker.procesess: unknown key"),
])
def test_worker_settings_errors(tmp_path: Path, section: str, values: dict,
                                message: str) -> None:
    cfg = write_config(tmp_path, **{section: values})
    res = dicomnode(cfg, "worker", "--once")
    assert res.returncode == 2 and message in res.stderr, res.stderr


# --------------------------------------------------------------------------- jobs / deliveries


@pytest.mark.slow  # about 20 s alone, over 30 s on a loaded 2-core machine
def test_worker_once_and_operations_cli(tmp_path: Path) -> None:
    fx = cranium_ct_series(k_range=(40, 52))
    with orthanc_running(workdir=tmp_path / "orthanc") as pacs:
        dests = [destination("pacs", pacs.dicom_port, pacs.aet)]
        cfg = write_config(tmp_path, routes=[CT_RULE], destinations=dests)
        settings = pipeline_settings(tmp_path, routes=[CT_RULE], destinations=dests)
        with Store.open(settings, migrate=True) as store:
            job_id = store.enqueue(fx.series_uid, ingest_series(store, fx.paths)).id

        res = dicomnode(cfg, "worker", "--once")
        assert res.returncode == 0, res.stderr
        assert "processed 1 job(s), sent 2 delivery(ies)" in res.stdout
        held = orthanc_by_modality(pacs, fx.study_uid)
        assert len(held["SEG"]) == 1 and len(held["SR"]) == 1

        shown = json.loads(dicomnode(cfg, "jobs", "show", str(job_id), "--json").stdout)
        assert shown["state"] == "done"
        assert sorted(o["kind"] for o in shown["outputs"]) == ["seg", "sr"]
        assert {d["state"] for d in shown["deliveries"]} == {"done"}
        assert {d["peer_status"] for d in shown["deliveries"]} == {"0x0000"}
        text = dicomnode(cfg, "jobs", "show", str(job_id)).stdout
        assert f"job {job_id}" in text and "outputs: 2" in text

        # Filters by study and state.
        assert json.loads(dicomnode(cfg, "jobs", "list", "--json", "--study", fx.study_uid,
                                    "--state", "done").stdout)[0]["id"] == job_id
        by_study = json.loads(dicomnode(cfg, "deliveries", "list", "--json", "--study",
                                        fx.study_uid).stdout)
        assert len(by_study) == 2

        # A done job can be re-run by command; deterministic UIDs: the PACS replaces.
        res = dicomnode(cfg, "jobs", "retry", str(job_id))
        assert res.returncode == 0 and "pending" in res.stdout, res
        assert dicomnode(cfg, "worker", "--once").returncode == 0
        held = orthanc_by_modality(pacs, fx.study_uid)
        assert len(held["SEG"]) == 1 and len(held["SEG"][0]["Instances"]) == 1

        # Cancel a pending job; a cancelled job cannot be cancelled twice.
        with Store.open(settings) as store:
            store.retry_job(job_id)
        res = dicomnode(cfg, "jobs", "cancel", str(job_id))
        assert res.returncode == 0 and "cancelled" in res.stdout
        res = dicomnode(cfg, "jobs", "cancel", str(job_id))
        assert res.returncode == 2 and "cannot cancel" in res.stderr


def test_failed_delivery_retry_by_command(tmp_path: Path) -> None:
    fx = cranium_ct_series(k_range=(40, 52))
    port = free_port()
    dests = [destination("pacs", port, "ORTHANC", retry_deadline_seconds=0)]
    settings = pipeline_settings(tmp_path, routes=[CT_RULE], destinations=dests)
    with Store.open(settings, migrate=True) as store:
        job_id = store.enqueue(fx.series_uid, ingest_series(store, fx.paths)).id
        Worker(settings, store).poll_once()
    cfg = write_config(tmp_path, routes=[CT_RULE], destinations=dests)
    # Nothing listens: with a zero deadline the deliveries fail at the first try.
    assert dicomnode(cfg, "worker", "--once").returncode == 0
    failed = json.loads(dicomnode(cfg, "deliveries", "list", "--json", "--state",
                                  "failed").stdout)
    assert len(failed) == 2 and all("cannot connect" in d["error"] for d in failed)
    assert "0 job(s)" in dicomnode(cfg, "worker", "--once").stdout
    # The PACS is fixed (here: configured right); the operator retries every failed delivery.
    with orthanc_running(workdir=tmp_path / "orthanc") as pacs:
        dests = [destination("pacs", pacs.dicom_port, pacs.aet)]
        cfg = write_config(tmp_path, routes=[CT_RULE], destinations=dests)
        res = dicomnode(cfg, "deliveries", "retry", "--all-failed")
        assert res.returncode == 0 and res.stdout.count("queued again") == 2, res
        assert "sent 2 delivery(ies)" in dicomnode(cfg, "worker", "--once").stdout
        with Store.open(settings) as store:
            dels = store.list_deliveries(job_id=job_id)
            assert {d.state for d in dels} == {DeliveryState.DONE}
            assert store.get_job(job_id).state is JobState.DONE
        held = orthanc_by_modality(pacs, fx.study_uid)
        assert len(held["SEG"]) == 1 and len(held["SR"]) == 1
