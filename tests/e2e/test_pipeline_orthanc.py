"""End to end: Orthanc (the PACS) sends a real study to the node process, the node runs the
routed model and the SEG + SR land in the same study in Orthanc, valid for dciodvfy.

Every scenario uses real processes: ``dicomnode serve`` (receivers, completeness tracker,
worker process, dispatcher process) and Orthanc 1.10 from Debian, both on free
loopback ports. Checks go through Orthanc's REST API and the node's own CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicomnode.cli.demo_sample import SAMPLE, write_sample_series
from dicomnode.store import Store
from tests.support.infer_data import cranium_ct_series, load_colin27
from tests.support.peers import Orthanc, dciodvfy, orthanc_running
from tests.support.pipeline_env import orthanc_by_modality, orthanc_instance_file
from tests.support.pipeline_node import (
    PipelineNode,
    all_delivered,
    job_for,
    orthanc_send_study,
    restart_orthanc,
    start_pipeline_node,
    wait_until,
)
from tests.support.receive_node import echo

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(),
                                reason="Orthanc not installed")

CT_RULE = {"name": "ct-tissue", "when": {"Modality": "CT", "calling_aet": "ORTHANC"},
           "models": ["ct-tissue"], "send": ["pacs"]}
MR_RULE = {"name": "brain-t1", "when": {"Modality": "MR",
                                        "SeriesDescription": {"regex": "(?i)t1|mprage"}},
           "models": ["deepbet-brain"], "send": ["pacs"]}


def _delivered_job(node: PipelineNode, series_uid: str, version: int,
                   timeout: float) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = job_for(node.jobs(), series_uid, version)
        if job is None:
            return None
        assert job["state"] not in ("failed", "cancelled"), job
        if job["state"] == "done" and all_delivered(node.deliveries(), job["id"]):
            return job
        return None
    return wait_until(check, timeout, f"job of {series_uid} v{version} delivered",
                      on_timeout=lambda: node.log()[-4000:])


def _outputs(node: PipelineNode, job_id: int) -> dict[str, dict[str, Any]]:
    import json

    shown = json.loads(node.cli("jobs", "show", str(job_id), "--json").stdout)
    return {o["kind"]: o for o in shown["outputs"]}


def _check_results_in_pacs(pacs: Orthanc, study_uid: str, outputs: dict[str, dict[str, Any]],
                           tmp: Path) -> dict[str, Path]:
    """The job's SEG and SR are in the study in the PACS, once each, and pass dciodvfy."""
    held = orthanc_by_modality(pacs, study_uid)
    tmp.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, modality in (("seg", "SEG"), ("sr", "SR")):
        uid = outputs[kind]["sop_instance_uid"]
        matches = [s for s in held.get(modality, [])
                   for i in s["Instances"]
                   if pacs.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] == uid]
        assert len(matches) == 1, (kind, held.get(modality))
        assert len(matches[0]["Instances"]) == 1
        path = orthanc_instance_file(pacs, matches[0]["Instances"][0], tmp / f"{kind}.dcm")
        res = dciodvfy(path)
        assert not res.errors, res.output
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study_uid
        files[kind] = path
    return files


def test_ct_round_trip_and_late_instance_replaces(tmp_path: Path) -> None:
    fx = cranium_ct_series(k_range=(30, 46))
    with orthanc_running(workdir=tmp_path / "pacs") as pacs:
        for p in fx.paths[:-1]:
            pacs.upload(p)
        node = start_pipeline_node(tmp_path / "node", orthanc=pacs, routes=[CT_RULE])
        try:
            orthanc_send_study(pacs, fx.study_uid)
            j1 = _delivered_job(node, fx.series_uid, 1, 120)
            out1 = _outputs(node, j1["id"])
            files1 = _check_results_in_pacs(pacs, fx.study_uid, out1, tmp_path / "v1")
            held = orthanc_by_modality(pacs, fx.study_uid)
            assert len(held["CT"]) == 1 and len(held["CT"][0]["Instances"]) == len(fx.paths) - 1

            # A late instance after completion: version 2, a new job, new results.
            late = pacs.upload(fx.paths[-1])
            orthanc_send_study(pacs, fx.study_uid, resources=[late["ID"]])
            j2 = _delivered_job(node, fx.series_uid, 2, 120)
            out2 = _outputs(node, j2["id"])
            files2 = _check_results_in_pacs(pacs, fx.study_uid, out2, tmp_path / "v2")
            jobs = {j["version"]: j for j in node.jobs() if j["series_uid"] == fx.series_uid}
            assert jobs[1]["state"] == "superseded" and jobs[2]["state"] == "done"
            # Version 2's objects are distinct (new series) and cover the late slice.
            seg1, seg2 = pydicom.dcmread(files1["seg"]), pydicom.dcmread(files2["seg"])
            assert seg1.SeriesInstanceUID != seg2.SeriesInstanceUID
            # The newest says so in the PACS series list (the old results stay).
            sr1, sr2 = pydicom.dcmread(files1["sr"]), pydicom.dcmread(files2["sr"])
            for old, new in ((seg1, seg2), (sr1, sr2)):
                assert new.SeriesDescription.endswith("(ct-tissue 1.0.0) v2"), new
                assert not old.SeriesDescription.endswith(" v2")
                assert new.SeriesNumber == old.SeriesNumber
            refs1 = {r.ReferencedSOPInstanceUID for s in seg1.ReferencedSeriesSequence
                     for r in s.ReferencedInstanceSequence}
            refs2 = {r.ReferencedSOPInstanceUID for s in seg2.ReferencedSeriesSequence
                     for r in s.ReferencedInstanceSequence}
            late_uid = str(pydicom.dcmread(fx.paths[-1]).SOPInstanceUID)
            assert late_uid in refs2 and late_uid not in refs1
            held = orthanc_by_modality(pacs, fx.study_uid)
            assert len(held["SEG"]) == 2 and len(held["SR"]) == 2  # old kept, newest added
            # Nothing was sent twice: one delivery per (object, destination), all done.
            dels = [d for d in node.deliveries() if d["job_id"] in (j1["id"], j2["id"])]
            assert len(dels) == 4 and {d["attempts"] for d in dels} == {1}
        finally:
            node.stop()


def test_pacs_down_at_delivery_then_back(tmp_path: Path) -> None:
    fx = cranium_ct_series(k_range=(50, 62))
    with orthanc_running(workdir=tmp_path / "pacs") as pacs:
        for p in fx.paths:
            pacs.upload(p)
        # The series completes only when the test says so, after the PACS is down:
        # with the usual 2 s quiet window the results were sometimes ready (and
        # delivered) while Orthanc was still shutting down.
        node = start_pipeline_node(tmp_path / "node", orthanc=pacs, routes=[CT_RULE],
                                   completion={"series_quiet_seconds": 3600})
        try:
            orthanc_send_study(pacs, fx.study_uid)
            pacs.stop()  # the PACS goes down before the results are ready
            with Store.open(node.settings) as store:
                store.enqueue(fx.series_uid)  # as the completeness tracker would

            def retrying() -> list[dict[str, Any]]:
                ds = node.deliveries()
                return [d for d in ds if d["attempts"] >= 1 and d["state"] == "pending"
                        and "cannot connect" in (d["error"] or "")]
            waiting = wait_until(retrying, 60, "deliveries retrying while the PACS is down",
                                 on_timeout=lambda: node.log()[-3000:])
            listed = node.cli("deliveries", "list", "--job", str(waiting[0]["job_id"])).stdout
            assert "cannot connect" in listed, listed
            job_id = waiting[0]["job_id"]
            restart_orthanc(pacs)
            _delivered_job(node, fx.series_uid, 1, 60)
            _check_results_in_pacs(pacs, fx.study_uid, _outputs(node, job_id), tmp_path)
            held = orthanc_by_modality(pacs, fx.study_uid)
            assert len(held["SEG"]) == 1 and len(held["SR"]) == 1
            assert len(held["CT"][0]["Instances"]) == len(fx.paths)
            dels = [d for d in node.deliveries() if d["job_id"] == job_id]
            assert len(dels) == 2 and all(d["attempts"] >= 2 for d in dels)
        finally:
            node.stop()


# --------------------------------------------------------------------------- MR brain, kill -9


def _reference_mask_2mm() -> np.ndarray:
    """ch2bet reference mask on the demo sample's 2 mm grid (same 2x2x2 blocks)."""
    ref = load_colin27().reference_mask.astype(np.float32)
    k, r, c = (s - s % 2 for s in ref.shape)
    blocks = ref[:k, :r, :c].reshape(k // 2, 2, r // 2, 2, c // 2, 2).mean(axis=(1, 3, 5))
    return blocks >= 0.5


def _seg_mask(seg: pydicom.Dataset, sources: list[Path]) -> np.ndarray:
    """The SEG's frames put back on the source grid via the referenced source instances."""
    index = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): k
             for k, p in enumerate(sources)}
    first = pydicom.dcmread(sources[0])
    mask = np.zeros((len(sources), int(first.Rows), int(first.Columns)), bool)
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        mask[index[str(src)]] |= pixels[i].astype(bool)
    return mask


@pytest.fixture(scope="module")
def mr_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One deepbet run shared by the MR checks: the node is killed -9 while the model
    runs, restarted, and the job completes (released at start-up: its worker's process
    is gone; with a long lease this also shows no lease expiry is needed)."""
    if not SAMPLE.is_file():
        pytest.skip("demo sample missing")
    tmp = tmp_path_factory.mktemp("mr")
    paths = write_sample_series(tmp / "mr")
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    with orthanc_running(workdir=tmp / "pacs") as pacs:
        for p in paths:
            pacs.upload(p)
        node = start_pipeline_node(tmp / "node", orthanc=pacs, routes=[MR_RULE],
                                   worker={"lease_seconds": 600})
        try:
            orthanc_send_study(pacs, study_uid)
            wait_until(lambda: "model loaded" in node.log(), 120,
                       "the model running in the worker", interval=0.05,
                       on_timeout=lambda: node.log()[-3000:])
            # Inference runs in a worker process: the node still answers meanwhile.
            echo_while_model_runs = echo(node.port, node.ae_title)
            node.kill9()
            killed_jobs = node.cli("jobs", "list", "--json").stdout
            no_results = orthanc_by_modality(pacs, study_uid)
            node = start_pipeline_node(tmp / "node", orthanc=pacs, routes=[MR_RULE],
                                       worker={"lease_seconds": 600}, port=node.port)
            job = _delivered_job(node, series_uid, 1, 240)
            outputs = _outputs(node, job["id"])
            files = _check_results_in_pacs(pacs, study_uid, outputs, tmp)
            held = orthanc_by_modality(pacs, study_uid)
            log = node.log()
        finally:
            node.stop()
    return {"paths": paths, "job": job, "killed_jobs": killed_jobs, "before": no_results,
            "echo": echo_while_model_runs,
            "held": held, "files": files, "log": log}


@pytest.mark.slow
def test_mr_brain_job_survives_kill9(mr_run: dict[str, Any]) -> None:
    import json

    killed = json.loads(mr_run["killed_jobs"])
    assert [j["state"] for j in killed] == ["running"], killed  # died mid-model
    assert "SEG" not in mr_run["before"]
    assert mr_run["echo"] == 0x0000
    assert mr_run["job"]["state"] == "done" and mr_run["job"]["attempts"] == 2
    # The restarted node saw the dead worker's job and re-queued it at once.
    assert "job released" in mr_run["log"], mr_run["log"][-3000:]
    held = mr_run["held"]
    assert len(held["SEG"]) == 1 and len(held["SR"]) == 1  # exactly one of each
    assert len(held["SEG"][0]["Instances"]) == 1 and len(held["SR"][0]["Instances"]) == 1
    assert len(held["MR"][0]["Instances"]) == len(mr_run["paths"])


@pytest.mark.slow
def test_mr_brain_mask_matches_reference(mr_run: dict[str, Any]) -> None:
    seg = pydicom.dcmread(mr_run["files"]["seg"])
    assert seg.SegmentSequence[0].SegmentLabel == "Brain"
    mask = _seg_mask(seg, mr_run["paths"])
    ref = _reference_mask_2mm()[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    dice = 2 * np.logical_and(mask, ref).sum() / (mask.sum() + ref.sum())
    assert dice > 0.85, dice
