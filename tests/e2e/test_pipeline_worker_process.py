"""``dicomnode serve`` receiving only (``worker.processes: 0``) plus a separate
``dicomnode worker`` process on the same database: the split deployment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.infer_data import cranium_ct_series
from tests.support.peers import orthanc_running
from tests.support.pipeline_env import orthanc_by_modality
from tests.support.pipeline_node import (
    REPO,
    all_delivered,
    job_for,
    orthanc_send_study,
    start_pipeline_node,
    wait_until,
)

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(),
                                reason="Orthanc not installed")

CT_RULE = {"name": "ct", "when": {"Modality": "CT"}, "models": ["ct-tissue"], "send": ["pacs"]}


def test_separate_worker_process(tmp_path: Path) -> None:
    fx = cranium_ct_series(k_range=(20, 32))
    with orthanc_running(workdir=tmp_path / "pacs") as pacs:
        for p in fx.paths:
            pacs.upload(p)
        node = start_pipeline_node(tmp_path / "node", orthanc=pacs, routes=[CT_RULE],
                                   worker={"processes": 0})
        worker = None
        try:
            assert "services=['completeness-tracker'] " in node.log(), node.log()[-2000:]
            orthanc_send_study(pacs, fx.study_uid)
            job = wait_until(lambda: job_for(node.jobs(), fx.series_uid), 30,
                             "the job, created by the receiving node")
            assert job["state"] == "pending"  # nobody works in the receiving node

            env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
            log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
            worker = subprocess.Popen(
                [sys.executable, "-m", "dicomnode", "--config", str(node.config_path),
                 "worker", "-n", "1"], cwd=REPO, env=env, stdout=log,
                stderr=subprocess.STDOUT)

            def delivered() -> bool:
                j = job_for(node.jobs(), fx.series_uid)
                return bool(j and j["state"] == "done"
                            and all_delivered(node.deliveries(), j["id"]))
            wait_until(delivered, 120, "results delivered by the separate worker",
                       on_timeout=lambda: (tmp_path / "worker.log").read_text()[-3000:])
            held = orthanc_by_modality(pacs, fx.study_uid)
            assert len(held["SEG"]) == 1 and len(held["SR"]) == 1
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0
            log.close()
            assert "worker@" in (tmp_path / "worker.log").read_text()
        finally:
            if worker is not None and worker.poll() is None:
                worker.kill()
            node.stop()
