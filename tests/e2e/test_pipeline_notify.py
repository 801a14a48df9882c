"""End to end: a real study goes Orthanc -> node process -> Orthanc, and the node's
notifications reach a real HTTP server and a real HL7 MLLP listener on 127.0.0.1,
through the outbox (queued with the job, sent by the dispatcher process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.infer_data import cranium_ct_series
from tests.support.notify_peers import mllp_server, webhook_server
from tests.support.peers import orthanc_running
from tests.support.pipeline_env import orthanc_by_modality
from tests.support.pipeline_node import (
    all_delivered,
    job_for,
    orthanc_send_study,
    start_pipeline_node,
    wait_until,
)

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(),
                                reason="Orthanc not installed")

RULE = {"name": "ct-tissue", "when": {"Modality": "CT", "calling_aet": "ORTHANC"},
        "models": ["ct-tissue"], "send": ["pacs"], "notify": ["dashboard", "ris"]}


def test_study_through_the_node_notifies_webhook_and_hl7(tmp_path: Path) -> None:
    fx = cranium_ct_series(k_range=(60, 72))
    with orthanc_running(workdir=tmp_path / "pacs") as pacs, webhook_server(200) as hook, \
            mllp_server("AA") as (hl7_port, messages):
        for p in fx.paths:
            pacs.upload(p)
        node = start_pipeline_node(
            tmp_path / "node", orthanc=pacs, routes=[RULE],
            notifications=[
                {"name": "dashboard", "kind": "webhook", "url": hook.url, "auth_token": "s3"},
                {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": hl7_port,
                 "receiving_application": "RIS", "receiving_facility": "HOSP"}])
        try:
            orthanc_send_study(pacs, fx.study_uid)

            def delivered() -> dict[str, Any] | None:
                job = job_for(node.jobs(), fx.series_uid, 1)
                if job is None:
                    return None
                assert job["state"] not in ("failed", "cancelled"), job
                if job["state"] == "done" and all_delivered(node.deliveries(), job["id"]):
                    return job
                return None

            job = wait_until(delivered, 120, "job delivered and notified",
                             on_timeout=lambda: node.log()[-4000:])
            rows = [d for d in node.deliveries() if d["job_id"] == job["id"]]
            assert sorted((d["destination"], d["kind"], d["state"]) for d in rows) == [
                ("dashboard", "webhook", "done"), ("pacs", "dicom", "done"),
                ("pacs", "dicom", "done"), ("ris", "hl7", "done")]
            held = orthanc_by_modality(pacs, fx.study_uid)
            seg_sr = {m: held[m][0]["Instances"] for m in ("SEG", "SR")}
            assert all(len(v) == 1 for v in seg_sr.values())

            (headers, body), = hook.bodies
            assert headers["Authorization"] == "Bearer s3"
            assert body["study_instance_uid"] == fx.study_uid and body["job_id"] == job["id"]
            objects = {o["kind"]: o["sop_instance_uid"] for o in body["objects"]}
            for kind, modality in (("seg", "SEG"), ("sr", "SR")):
                tags = pacs.get(f"/instances/{seg_sr[modality][0]}/simplified-tags")
                assert tags["SOPInstanceUID"] == objects[kind]  # what PACS holds is announced
            (msg,) = messages
            assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01"
            assert str(msg.segment("OBR")[3]) == fx.study_uid
            obx = {str(s[3][0][0]): str(s[5]) for s in msg.segments("OBX")}
            assert obx["DICOM.SEG"] == objects["seg"] and "Body.volume" in obx
            listed = node.cli("deliveries", "list", "--job", str(job["id"])).stdout
            assert "webhook notification" in listed and "hl7 notification" in listed
        finally:
            node.stop()
