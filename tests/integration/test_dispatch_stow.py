"""DICOMweb out: STOW-RS to a real Orthanc with Debian's orthanc-dicomweb plugin, through
the real outbox, worker (ct-tissue) and dispatcher; QIDO-RS (dicomweb-client) checks
what arrived. Failures: Orthanc stopped (transient), wrong credentials (permanent), an
unreadable file (permanent), the Failed SOP Sequence of Orthanc's own 409 answer."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from dicomnode.config import DestinationConfig
from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.dispatch.scu import OutcomeState
from dicomnode.dispatch.stow import outcomes_from_response, response_dataset, stow_files
from dicomnode.domain import DeliveryState, JobState
from dicomnode.store import Store
from dicomnode.worker import Worker
from tests.support.infer_data import cranium_ct_series
from tests.support.peers import (
    ORTHANC_DICOMWEB_PLUGIN,
    orthanc_running,
    self_signed_pem,
    tls_proxy,
)
from tests.support.pipeline_env import ingest_series, pipeline_settings

pytestmark = pytest.mark.skipif(not Path(ORTHANC_DICOMWEB_PLUGIN).exists(),
                                reason="apt-get install orthanc-dicomweb")


@pytest.fixture(scope="module")
def ct_small() -> Any:
    return cranium_ct_series(k_range=(40, 52))


def _qido(url: str, study_uid: str, auth: tuple[str, str] | None = None) -> dict[str, str]:
    """SOP Instance UID -> Modality of every instance QIDO-RS lists in the study."""
    session = requests.Session()
    session.auth = auth
    client = DICOMwebClient(url, session=session)
    found = client.search_for_instances(study_instance_uid=study_uid,
                                        fields=["Modality", "SOPClassUID"])
    return {Dataset.from_json(d).SOPInstanceUID: str(Dataset.from_json(d).get("Modality", ""))
            for d in found}


def test_results_and_originals_are_stowed_and_listed_by_qido(tmp_path: Path,
                                                            ct_small: Any) -> None:
    with orthanc_running(workdir=tmp_path / "orthanc", dicomweb=True) as pacs:
        web = f"{pacs.url}/dicom-web"
        rule = {"name": "ct", "when": {"Modality": "CT"}, "models": ["ct-tissue"],
                "send": ["web"], "forward": ["web"]}
        dest = {"name": "web", "kind": "dicomweb", "url": web, "formats": ["seg", "sr", "sc"]}
        settings = pipeline_settings(tmp_path, routes=[rule], destinations=[dest])
        with Store.open(settings, migrate=True) as store:
            version = ingest_series(store, ct_small.paths)
            job_id = store.enqueue(ct_small.series_uid, version).id
            report = Worker(settings, store).poll_once()
            assert report is not None and report.state is JobState.DONE, report
            (rep,) = Dispatcher(settings, store).poll_once()
            rows = store.list_deliveries(job_id=job_id, limit=1000)
            made = store.job_outputs(job_id)
        outputs = {o.kind: o.sop_instance_uid for o in made}
        assert {d.state for d in rows} == {DeliveryState.DONE}, [d.last_error for d in rows]
        assert rep.sent == len(rows) == len(ct_small.paths) + len(made) and rep.failed == 0
        listed = _qido(web, ct_small.study_uid)
        assert {"seg", "sr", "sc"} <= set(outputs)
        assert listed[outputs["seg"]] == "SEG" and listed[outputs["sr"]] == "SR"
        assert {o.sop_instance_uid for o in made} <= set(listed)
        originals = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                     for p in ct_small.paths}
        assert originals <= set(listed)  # the forwarded originals are in the study too
        assert len(listed) == len(rows)


def test_orthanc_stopped_is_transient_and_backs_off(tmp_path: Path, ct_small: Any) -> None:
    with orthanc_running(workdir=tmp_path / "orthanc", dicomweb=True) as pacs:
        dest = DestinationConfig(name="web", kind="dicomweb", url=f"{pacs.url}/dicom-web",
                                 timeout_seconds=5)
        pacs.stop()
        outcomes = stow_files(dest, ct_small.paths[:3])
    assert [o.state for o in outcomes] == [OutcomeState.FAILED] * 3
    assert all(o.transient and "cannot reach" in o.message for o in outcomes)

    # through the outbox: pending with backoff, then delivered once Orthanc is back
    rule = {"name": "ct", "when": {"Modality": "CT"}, "forward": ["web"]}
    with orthanc_running(workdir=tmp_path / "orthanc2", dicomweb=True) as pacs:
        port_url = f"{pacs.url}/dicom-web"
        pacs.stop()
        settings = pipeline_settings(tmp_path, routes=[rule], destinations=[
            {"name": "web", "kind": "dicomweb", "url": port_url, "timeout_seconds": 5}])
        with Store.open(settings, migrate=True) as store:
            version = ingest_series(store, ct_small.paths[:4])
            job_id = store.enqueue(ct_small.series_uid, version).id
            Worker(settings, store).poll_once()
            (rep,) = Dispatcher(settings, store).poll_once()
            assert (rep.sent, rep.retrying, rep.failed) == (0, 4, 0)
            rows = store.list_deliveries(job_id=job_id)
            assert all(d.state is DeliveryState.PENDING and d.not_before is not None
                       and "cannot reach" in (d.last_error or "") for d in rows)


def test_basic_auth_and_wrong_password(tmp_path: Path, ct_small: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with orthanc_running(workdir=tmp_path / "orthanc", dicomweb=True,
                         user=("alice", "right-pw")) as pacs:
        web = f"{pacs.url}/dicom-web"
        dest = DestinationConfig(name="web", kind="dicomweb", url=web, auth="basic",
                                 username="alice", password_env="DN_TEST_STOW_PW")
        monkeypatch.setenv("DN_TEST_STOW_PW", "wrong-pw")
        bad = stow_files(dest, ct_small.paths[:2])
        assert all(o.state is OutcomeState.FAILED and not o.transient for o in bad)
        assert "HTTP 401" in bad[0].message
        monkeypatch.setenv("DN_TEST_STOW_PW", "right-pw")
        good = stow_files(dest, ct_small.paths[:2])
        assert [o.state for o in good] == [OutcomeState.STORED] * 2
        assert set(_qido(web, ct_small.study_uid, ("alice", "right-pw"))) == {
            o.sop_instance_uid for o in good}
        monkeypatch.delenv("DN_TEST_STOW_PW")
        unset = stow_files(dest, ct_small.paths[:1])
        assert not unset[0].transient and "DN_TEST_STOW_PW" in unset[0].message


@pytest.mark.skipif(shutil.which("socat") is None, reason="apt-get install socat")
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_is_verified_by_default(tmp_path: Path, ct_small: Any) -> None:
    pem = self_signed_pem(tmp_path / "tls")
    with (orthanc_running(workdir=tmp_path / "orthanc", dicomweb=True) as pacs,
          tls_proxy(pacs.http_port, pem) as tls_port):
        web = f"https://127.0.0.1:{tls_port}/dicom-web"
        default = DestinationConfig(name="web", kind="dicomweb", url=web)
        (o,) = stow_files(default, ct_small.paths[:1])
        assert o.state is OutcomeState.FAILED and not o.transient  # self-signed: refused
        assert "TLS" in o.message
        (o,) = stow_files(DestinationConfig(name="web", kind="dicomweb", url=web,
                                            ca_bundle=pem), ct_small.paths[:1])
        assert o.state is OutcomeState.STORED, o.message  # the in-house CA trusted
        (o,) = stow_files(DestinationConfig(name="web", kind="dicomweb", url=web,
                                            verify_tls=False), ct_small.paths[1:2])
        assert o.state is OutcomeState.STORED, o.message  # explicitly switched off
        assert len(pacs.get("/instances")) == 2


def test_unreadable_file_fails_alone(tmp_path: Path, ct_small: Any) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a DICOM file at all")
    with orthanc_running(workdir=tmp_path / "orthanc", dicomweb=True) as pacs:
        dest = DestinationConfig(name="web", kind="dicomweb", url=f"{pacs.url}/dicom-web")
        a, b, c = stow_files(dest, [ct_small.paths[0], junk, ct_small.paths[1]])
        assert a.state is c.state is OutcomeState.STORED
        assert b.state is OutcomeState.FAILED and not b.transient
        assert len(_qido(dest.url, ct_small.study_uid)) == 2


def test_orthancs_failed_sop_sequence_is_parsed(tmp_path: Path, ct_small: Any) -> None:
    # Orthanc answers 409 with a Failed SOP Sequence (and no Content-Type) when an
    # instance does not belong to the study in the URL.
    with orthanc_running(workdir=tmp_path / "orthanc", dicomweb=True) as pacs:
        client = DICOMwebClient(f"{pacs.url}/dicom-web")
        client.set_http_retry_params(retry=False)
        ds = pydicom.dcmread(ct_small.paths[0])
        with pytest.raises(requests.HTTPError) as info:
            client.store_instances([ds], study_instance_uid="1.2.826.0.1.999")
    assert info.value.response.status_code == 409
    answer = response_dataset(info.value.response)
    assert answer is not None
    dest = DestinationConfig(name="web", kind="dicomweb", url="http://127.0.0.1:1")
    (o,) = outcomes_from_response(dest, answer, [(ct_small.paths[0], ds.SOPInstanceUID,
                                                  ds.SOPClassUID)])
    assert o.state is OutcomeState.FAILED and o.status == 0x0110  # processing failure
    assert o.transient  # as for C-STORE: a processing failure may pass on a retry


def _response(failed: dict[str, int], stored: dict[str, int | None]) -> Dataset:
    ds = Dataset()
    ds.FailedSOPSequence = []
    for uid, reason in failed.items():
        it = Dataset()
        it.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        it.ReferencedSOPInstanceUID = uid
        it.FailureReason = reason
        ds.FailedSOPSequence.append(it)
    ds.ReferencedSOPSequence = []
    for uid, warning in stored.items():
        it = Dataset()
        it.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        it.ReferencedSOPInstanceUID = uid
        if warning is not None:
            it.WarningReason = warning
        ds.ReferencedSOPSequence.append(it)
    return ds


def test_failure_and_warning_reasons_map_like_c_store() -> None:
    dest = DestinationConfig(name="web", kind="dicomweb", url="http://127.0.0.1:1")
    answer = Dataset.from_json(_response(
        {"1.1": 0xA700, "1.2": 0xA900, "1.3": 0xC000, "1.4": 0x0122, "1.5": 0x0110},
        {"1.6": None, "1.7": 0xB000}).to_json_dict())  # through DICOM JSON, as on the wire
    uids = ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "1.8"]
    tmp = Path(tempfile.gettempdir())
    got = outcomes_from_response(dest, answer, [(tmp / u, u, "1.2.840.10008.5.1.4.1.1.2")
                                                for u in uids])
    by = {o.sop_instance_uid: o for o in got}
    assert by["1.1"].transient and by["1.1"].status == 0xA700  # out of resources
    assert not by["1.2"].transient and not by["1.3"].transient and not by["1.4"].transient
    assert by["1.5"].transient  # processing failure
    assert by["1.6"].state is OutcomeState.STORED
    assert by["1.7"].state is OutcomeState.WARNING and by["1.7"].status == 0xB000
    assert by["1.8"].state is OutcomeState.FAILED and by["1.8"].transient  # not mentioned
    assert "0xA900" in by["1.2"].message


def test_dispatcher_names_unset_secret_variables_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("DN_TEST_UNSET_TOKEN", raising=False)
    monkeypatch.setenv("DN_TEST_SET_SECRET", "x")
    settings = pipeline_settings(
        tmp_path,
        destinations=[{"name": "vna", "kind": "dicomweb", "url": "https://127.0.0.1:1/dw",
                       "auth": "bearer", "token_env": "DN_TEST_UNSET_TOKEN"}],
        notifications=[{"name": "dash", "kind": "webhook",  # type: ignore[arg-type]
                        "url": "http://127.0.0.1:1/h", "signing_secret_env": "DN_TEST_SET_SECRET"}])
    with Store.open(settings, migrate=True) as store, caplog.at_level("WARNING"):
        disp = Dispatcher(settings, store)
    assert disp.unset_secrets() == [("destinations[0].token_env", "DN_TEST_UNSET_TOKEN")]
    assert any("secret environment variable not set" in r.getMessage() for r in caplog.records)
