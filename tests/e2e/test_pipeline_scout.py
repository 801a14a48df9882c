"""End to end: Orthanc sends a CT series with a scout in it to ``dicomnode serve``, then
a late scout; the good result is made once, stays current, and the PACS holds it once.

Real processes: the node (receivers, tracker, worker process, dispatcher) and Orthanc
from Debian on loopback ports; checks through Orthanc's REST API and the node's CLI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.support.infer_data import cranium_ct_series
from tests.support.peers import orthanc_running
from tests.support.pipeline_env import orthanc_by_modality
from tests.support.pipeline_node import (
    all_delivered,
    job_for,
    orthanc_send_study,
    start_pipeline_node,
    wait_until,
)
from tests.support.series import CORONAL, write_series

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(),
                                reason="Orthanc not installed")

CT_RULE = {"name": "ct-tissue", "when": {"Modality": "CT", "ImageType": {"not": "LOCALIZER"}},
           "models": ["ct-tissue"], "send": ["pacs"]}


def _scout(tmp: Path, like: Path, name: str, number: int) -> Path:
    first = pydicom.dcmread(like)
    [p] = write_series(np.full((1, 64, 64), -400.0), tmp / name, modality="CT",
                       orientation=CORONAL, study_uid=first.StudyInstanceUID,
                       series_uid=first.SeriesInstanceUID,
                       frame_of_reference_uid=first.FrameOfReferenceUID,
                       patient_name=str(first.PatientName), patient_id=first.PatientID,
                       accession_number=first.AccessionNumber)
    ds = pydicom.dcmread(p)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = number
    ds.save_as(p)
    return p


def test_scout_in_series_and_late_scout(tmp_path: Path) -> None:
    fx = cranium_ct_series(tmp_path / "ct", k_range=(20, 36))
    with orthanc_running(workdir=tmp_path / "pacs") as pacs:
        # The scout comes first in the series, as scanners send it.
        for p in [_scout(tmp_path, fx.paths[0], "scout1", 1), *fx.paths]:
            pacs.upload(p)
        node = start_pipeline_node(tmp_path / "node", orthanc=pacs, routes=[CT_RULE])
        try:
            orthanc_send_study(pacs, fx.study_uid)

            def delivered(version: int) -> dict | None:
                job = job_for(node.jobs(), fx.series_uid, version)
                if job is None:
                    return None
                assert job["state"] not in ("failed", "cancelled"), job
                ok = job["state"] == "done" and all_delivered(node.deliveries(), job["id"])
                return job if ok else None

            j1 = wait_until(lambda: delivered(1), 120, "v1 delivered",
                            on_timeout=lambda: node.log()[-4000:])
            shown = node.cli("jobs", "show", str(j1["id"])).stdout
            assert "left out of the volume:\n    1 image: LOCALIZER (scout) image" in shown
            assert "error:" not in shown

            # A late scout after completion: version 2, which brings nothing usable.
            late = pacs.upload(_scout(tmp_path, fx.paths[0], "scout2", 999))
            orthanc_send_study(pacs, fx.study_uid, resources=[late["ID"]])

            def skipped() -> dict | None:
                job = job_for(node.jobs(), fx.series_uid, 2)
                return job if job is not None and job["state"] not in (
                    "pending", "running") else None

            j2 = wait_until(skipped, 120, "v2 finished", on_timeout=lambda: node.log()[-4000:])
            assert j2["state"] == "skipped", j2
            jobs = {j["version"]: j for j in node.jobs() if j["series_uid"] == fx.series_uid}
            assert jobs[1]["state"] == "done"
            listed = node.cli("jobs", "list").stdout
            assert "skipped: version 2 added only images left out of the volume (1 image: " \
                   f"LOCALIZER (scout) image); the result of job {j1['id']} (version 1) " \
                   "stays current" in listed
            held = orthanc_by_modality(pacs, fx.study_uid)
            assert len(held["SEG"]) == 1 and len(held["SR"]) == 1
            assert not [d for d in node.deliveries() if d["job_id"] == j2["id"]]
        finally:
            node.stop()
