"""FHIR R4 results against a local FHIR endpoint (http.server in a thread on 127.0.0.1)
that validates every posted Bundle with the fhir.resources R4B models, and answers
201 / 400 / 503 by scenario; through the real outbox, worker (ct-tissue) and dispatcher."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomnode.config import NotificationConfig
from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.dispatch.fhir import send_fhir
from dicomnode.dispatch.notify import ResultSummary
from dicomnode.domain import DeliveryState, JobState
from dicomnode.errors import DispatchError
from dicomnode.store import Store
from dicomnode.worker import Worker
from tests.integration.test_dispatch_notify import summary  # noqa: F401 - the fixture
from tests.support.fhir_peer import by_type as _by_type
from tests.support.fhir_peer import fhir_endpoint
from tests.support.infer_data import cranium_ct_series
from tests.support.peers import self_signed_pem, tls_proxy
from tests.support.pipeline_env import ingest_series, pipeline_settings

# --------------------------------------------------------------------------- the Bundle


def test_bundle_is_valid_and_carries_the_result(summary: ResultSummary,  # noqa: F811
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DN_TEST_FHIR_TOKEN", "fhir-tok")
    with fhir_endpoint(201) as ep:
        cfg = NotificationConfig(name="ehr", kind="fhir", url=ep.url,
                                 auth_token_env="DN_TEST_FHIR_TOKEN",
                                 patient_identifier_system="urn:oid:1.2.3.4.mrn")
        assert send_fhir(cfg, summary, "row-1") == 201
    assert not ep.invalid, ep.invalid
    (bundle,) = ep.bundles
    assert ep.headers[0]["Authorization"] == "Bearer fhir-tok"
    types = _by_type(bundle)
    (pat,), (dev,), (rep,) = types["Patient"], types["Device"], types["DiagnosticReport"]
    assert pat["resource"]["identifier"][0] == {"use": "usual", "system": "urn:oid:1.2.3.4.mrn",
                                                "value": "PID&1"}
    assert pat["resource"]["name"][0]["family"] == "Doe"
    assert pat["request"]["ifNoneExist"] == "identifier=urn:oid:1.2.3.4.mrn|PID%261"  # '&'
    dev_key = dev["request"]["ifNoneExist"]
    assert dev_key == "device-name=deepbet-brain&version=1.0.2"  # no weights hash here
    report = rep["resource"]
    assert report["status"] == "preliminary"
    assert {c["code"] for c in report["category"][0]["coding"]} == {"RAD", "imaging"}
    assert report["code"]["coding"][0]["code"] == "25056-3"  # MR: as the SR reports it
    assert report["subject"]["reference"] == pat["fullUrl"]
    based = report["basedOn"][0]
    assert based["type"] == "ServiceRequest" and based["identifier"]["value"] == "ACC|42"
    assert based["identifier"]["type"]["coding"][0]["code"] == "ACSN"
    assert report["imagingStudy"][0]["identifier"] == {"system": "urn:dicom:uid",
                                                       "value": "urn:oid:1.2.826.0.1.1"}
    device = dev["resource"]
    assert device["deviceName"] == [{"name": "deepbet-brain", "type": "model-name"}]
    assert device["version"] == [{"value": "1.0.2"}]
    observations = {e["fullUrl"]: e["resource"] for e in types["Observation"]}
    assert sorted(r["reference"] for r in report["result"]) == sorted(observations)
    vol, finding = observations.values()
    assert vol["valueQuantity"] == {"value": 1234.5, "unit": "ml",
                                    "system": "http://unitsofmeasure.org", "code": "ml"}
    assert vol["code"]["coding"][0] == {"system": "http://snomed.info/sct",
                                        "code": "118565006", "display": "Volume"}
    assert vol["bodySite"]["coding"][0]["code"] == "T-A0100"  # the segment's code
    assert vol["device"]["reference"] == dev["fullUrl"] and vol["status"] == "preliminary"
    assert finding["valueQuantity"]["value"] == 0.82
    assert finding["interpretation"][0]["coding"][0]["code"] == "POS"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "T-A0100"


def test_bundle_is_the_same_on_a_resend(summary: ResultSummary) -> None:  # noqa: F811
    with fhir_endpoint(201) as ep:
        cfg = NotificationConfig(name="ehr", kind="fhir", url=ep.url)
        send_fhir(cfg, summary, "row-7")
        send_fhir(cfg, summary, "row-7")
    first, second = ep.bundles
    assert first == second  # same fullUrls and identifiers: ifNoneExist stops a duplicate
    (rep,) = _by_type(first)["DiagnosticReport"]
    assert rep["request"]["ifNoneExist"] == "identifier=urn:dicomnode:result|row-7"


def test_weights_hash_identifies_the_device(summary: ResultSummary) -> None:  # noqa: F811
    model = dataclasses.replace(summary.model, weights_sha256=("ab" * 32,))
    with fhir_endpoint(201) as ep:
        send_fhir(NotificationConfig(name="ehr", kind="fhir", url=ep.url),
                  dataclasses.replace(summary, model=model), "row-2")
    (dev,) = _by_type(ep.bundles[0])["Device"]
    assert dev["resource"]["identifier"] == [{"system": "urn:dicomnode:model-weights-sha256",
                                              "value": "ab" * 32}]


@pytest.mark.parametrize(("status", "transient"), [(400, False), (422, False), (503, True),
                                                   (429, True)])
def test_server_answers_are_classified(summary: ResultSummary, status: int,  # noqa: F811
                                       transient: bool) -> None:
    with fhir_endpoint(status) as ep:
        with pytest.raises(DispatchError, match=f"HTTP {status}") as info:
            send_fhir(NotificationConfig(name="ehr", kind="fhir", url=ep.url), summary, "r")
    assert info.value.transient is transient and info.value.status == status
    assert "scenario answer" in str(info.value)  # the server's OperationOutcome is kept


@pytest.mark.skipif(shutil.which("socat") is None, reason="apt-get install socat")
def test_https_certificate_is_verified(summary: ResultSummary, tmp_path: Path) -> None:  # noqa: F811
    pem = self_signed_pem(tmp_path / "tls")
    with fhir_endpoint(201) as ep:
        port = int(ep.url.split(":")[2].split("/")[0])
        with tls_proxy(port, pem) as tls_port:
            url = f"https://127.0.0.1:{tls_port}/fhir"
            with pytest.raises(DispatchError, match="TLS error") as info:
                send_fhir(NotificationConfig(name="ehr", kind="fhir", url=url), summary, "r")
            assert not info.value.transient  # self-signed: refused, permanently
            cfg = NotificationConfig(name="ehr", kind="fhir", url=url, verify_tls=False)
            assert send_fhir(cfg, summary, "r") == 201
    assert len(ep.bundles) == 1 and not ep.invalid


def test_missing_token_variable_is_named(summary: ResultSummary) -> None:  # noqa: F811
    cfg = NotificationConfig(name="ehr", kind="fhir", url="http://127.0.0.1:9/fhir",
                             auth_token_env="DN_TEST_FHIR_TOKEN_NOT_SET")
    with pytest.raises(DispatchError, match="DN_TEST_FHIR_TOKEN_NOT_SET") as info:
        send_fhir(cfg, summary, "r")
    assert not info.value.transient


# --------------------------------------------------------------------------- through the outbox


def _sr_numbers(path: Path) -> list[tuple[float, str]]:
    """(value, UCUM unit) of every NUM content item of the SR."""
    out: list[tuple[float, str]] = []

    def walk(items: Any) -> None:
        for it in items:
            if it.get("ValueType") == "NUM" and "MeasuredValueSequence" in it:
                mv = it.MeasuredValueSequence[0]
                out.append((float(mv.NumericValue),
                            str(mv.MeasurementUnitsCodeSequence[0].CodeValue)))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(pydicom.dcmread(path).ContentSequence)
    return out


def test_outbox_delivers_retries_and_fails_by_answer(tmp_path: Path) -> None:
    fx = cranium_ct_series(k_range=(40, 52))
    with fhir_endpoint(201) as ok, fhir_endpoint(503) as busy, fhir_endpoint(400) as bad:
        targets = [{"name": "ehr", "kind": "fhir", "url": ok.url},
                   {"name": "ehr-busy", "kind": "fhir", "url": busy.url},
                   {"name": "ehr-bad", "kind": "fhir", "url": bad.url}]
        rule = {"name": "ct", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
                "notify": ["ehr", "ehr-busy", "ehr-bad"]}
        settings = pipeline_settings(tmp_path, routes=[rule],
                                     notifications=targets)  # type: ignore[arg-type]
        with Store.open(settings, migrate=True) as store:
            version = ingest_series(store, fx.paths)
            job_id = store.enqueue(fx.series_uid, version).id
            report = Worker(settings, store).poll_once()
            assert report is not None and report.state is JobState.DONE, report
            reports = Dispatcher(settings, store).poll_once()
            assert sorted((r.destination, r.sent, r.retrying, r.failed) for r in reports) == [
                ("ehr", 1, 0, 0), ("ehr-bad", 0, 0, 1), ("ehr-busy", 0, 1, 0)]
            rows = {d.destination: d for d in store.list_deliveries(job_id=job_id)}
            assert rows["ehr"].state is DeliveryState.DONE and rows["ehr"].peer_status == 201
            assert rows["ehr-bad"].state is DeliveryState.FAILED
            assert rows["ehr-bad"].peer_status == 400
            assert "HTTP 400" in (rows["ehr-bad"].last_error or "")
            busy_row = rows["ehr-busy"]
            assert busy_row.state is DeliveryState.PENDING and busy_row.peer_status == 503
            assert busy_row.not_before is not None and busy_row.attempts == 1  # backoff

            # the server recovers: the retry (after the backoff) is delivered
            busy.status = 201
            deadline = time.monotonic() + 30
            while (store.list_deliveries(job_id=job_id, destination="ehr-busy")[0].state
                   is not DeliveryState.DONE and time.monotonic() < deadline):
                Dispatcher(settings, store).poll_once()
                time.sleep(0.1)
            (after,) = store.list_deliveries(job_id=job_id, destination="ehr-busy")
            assert after.state is DeliveryState.DONE
            sr_path = next(o.path for o in store.job_outputs(job_id) if o.kind == "sr")
            sr_uid = next(o.sop_instance_uid for o in store.job_outputs(job_id)
                          if o.kind == "sr")
    assert not ok.invalid and not busy.invalid and not bad.invalid
    assert len(busy.bundles) == 2 and busy.bundles[0] == busy.bundles[1]  # same on retry
    (bundle,) = ok.bundles
    types = _by_type(bundle)
    (rep,) = types["DiagnosticReport"]
    assert rep["resource"]["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{fx.study_uid}"
    assert rep["resource"]["code"]["coding"][0]["code"] == "25045-6"  # CT, as in the SR
    observed = sorted((o["resource"]["valueQuantity"]["value"],
                       o["resource"]["valueQuantity"]["code"]) for o in types["Observation"])
    in_sr = sorted(_sr_numbers(sr_path))
    assert len(observed) == len(in_sr) > 0
    for (v, unit), (sv, sunit) in zip(observed, in_sr, strict=True):
        assert unit == sunit
        assert v == pytest.approx(sv, rel=1e-9, abs=1e-12)  # SR: DS text of the same number
    assert sr_uid  # the SR exists alongside
