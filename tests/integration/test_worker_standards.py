"""One study, every standard form, through the real worker (ct-tissue), outbox and
dispatcher: SEG + SR STOW-ed to Orthanc (orthanc-dicomweb, listed by QIDO-RS), an HL7
ORU^R01 (python-hl7's MLLP listener), a FHIR Bundle (a validating FHIR endpoint) and a
signed webhook (a receiver that checks the signature); all with the same accession
number and the same measurements as the SR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.domain import DeliveryState, JobState
from dicomnode.store import Store
from dicomnode.worker import Worker
from tests.support.fhir_peer import by_type, fhir_endpoint
from tests.support.infer_data import cranium_ct_series
from tests.support.notify_peers import mllp_server, webhook_server
from tests.support.peers import ORTHANC_DICOMWEB_PLUGIN, orthanc_running
from tests.support.pipeline_env import ingest_series, pipeline_settings

pytestmark = pytest.mark.skipif(not Path(ORTHANC_DICOMWEB_PLUGIN).exists(),
                                reason="apt-get install orthanc-dicomweb")


def _sr_numbers(path: Path) -> list[float]:
    out: list[float] = []

    def walk(items: Any) -> None:
        for it in items:
            if it.get("ValueType") == "NUM" and "MeasuredValueSequence" in it:
                out.append(float(it.MeasuredValueSequence[0].NumericValue))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(pydicom.dcmread(path).ContentSequence)
    return sorted(out)


def test_one_study_in_every_standard_form(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fx = cranium_ct_series(k_range=(40, 52))
    accession = str(pydicom.dcmread(fx.paths[0], stop_before_pixels=True).AccessionNumber)
    monkeypatch.setenv("DN_TEST_HOOK_SECRET", "s3cret-hook")
    with (orthanc_running(workdir=tmp_path / "orthanc", dicomweb=True) as pacs,
          mllp_server("AA") as (mllp_port, messages),
          fhir_endpoint(201) as fhir,
          webhook_server(200, secret="s3cret-hook") as hook,
          webhook_server(200, secret="another-secret") as strict):
        web = f"{pacs.url}/dicom-web"
        notify = ["ris", "ehr", "dash", "strict"]
        settings = pipeline_settings(
            tmp_path,
            routes=[{"name": "ct", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
                     "send": ["pacs"], "notify": notify}],
            destinations=[{"name": "pacs", "kind": "dicomweb", "url": web,
                           "formats": ["seg", "sr"]}],
            notifications=[  # type: ignore[arg-type]
                {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": mllp_port},
                {"name": "ehr", "kind": "fhir", "url": fhir.url},
                {"name": "dash", "kind": "webhook", "url": hook.url,
                 "signing_secret_env": "DN_TEST_HOOK_SECRET"},
                {"name": "strict", "kind": "webhook", "url": strict.url,
                 "signing_secret_env": "DN_TEST_HOOK_SECRET"}])
        with Store.open(settings, migrate=True) as store:
            version = ingest_series(store, fx.paths)
            job_id = store.enqueue(fx.series_uid, version).id
            report = Worker(settings, store).poll_once()
            assert report is not None and report.state is JobState.DONE, report
            Dispatcher(settings, store).poll_once()
            rows = {d.destination + "/" + d.sop_instance_uid: d
                    for d in store.list_deliveries(job_id=job_id)}
            outputs = {o.kind: o for o in store.job_outputs(job_id)}
        by_dest: dict[str, set[DeliveryState]] = {}
        for d in rows.values():
            by_dest.setdefault(d.destination, set()).add(d.state)
        assert by_dest == {"pacs": {DeliveryState.DONE}, "ris": {DeliveryState.DONE},
                           "ehr": {DeliveryState.DONE}, "dash": {DeliveryState.DONE},
                           "strict": {DeliveryState.FAILED}}  # wrong secret: 401, permanent
        assert len(strict.rejected) == 1 and not strict.bodies

        # SEG + SR in the archive's study
        client = DICOMwebClient(web, session=requests.Session())
        listed = {Dataset.from_json(d).SOPInstanceUID
                  for d in client.search_for_instances(study_instance_uid=fx.study_uid)}
        assert {outputs["seg"].sop_instance_uid, outputs["sr"].sop_instance_uid} <= listed

    in_sr = _sr_numbers(outputs["sr"].path)
    assert in_sr
    # the webhook (its signature checked by the receiver before it kept the body)
    (_, body), = hook.bodies
    assert body["accession_number"] == accession
    assert sorted(m["value"] for m in body["measurements"]) == pytest.approx(in_sr, rel=1e-9)
    # the ORU
    (msg,) = messages
    assert msg.unescape(str(msg.segment("OBR")[2])) == accession
    oru = sorted(float(str(s[5])) for s in msg.segments("OBX") if str(s[2]) == "NM")
    assert oru == pytest.approx(in_sr, rel=1e-5)  # OBX-5: 6 significant digits
    assert {str(s[11]) for s in msg.segments("OBX")} == {"P"}
    # the FHIR Bundle
    assert not fhir.invalid, fhir.invalid
    (bundle,) = fhir.bundles
    types = by_type(bundle)
    (rep,) = types["DiagnosticReport"]
    assert rep["resource"]["basedOn"][0]["identifier"]["value"] == accession
    fhir_values = sorted(o["resource"]["valueQuantity"]["value"] for o in types["Observation"])
    assert fhir_values == pytest.approx(in_sr, rel=1e-9)
