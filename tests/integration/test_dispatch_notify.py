"""Result notifications against real receivers: an HTTP server and python-hl7's MLLP server."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from datetime import UTC, datetime
from pathlib import Path

import hl7
import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import NotificationConfig
from dicomnode.dispatch.notify import (
    SIGNATURE_HEADER,
    ResultSummary,
    build_oru,
    notify,
    send_hl7,
    send_webhook,
    verify_signature,
)
from dicomnode.domain import (
    ClassificationOutput,
    ClassSpec,
    CodedConcept,
    FrameRef,
    InferenceResult,
    LabelSpec,
    Measurement,
    ModelInfo,
    OutputObject,
    SegmentationOutput,
    Volume,
)
from dicomnode.errors import DispatchError
from tests.support.notify_peers import http_server, mllp_server, webhook_server
from tests.support.peers import free_port

WHEN = datetime(2026, 11, 21, 9, 30, 5, tzinfo=UTC)


@pytest.fixture()
def summary() -> ResultSummary:
    code = CodedConcept("T-A0100", "SRT", "Brain")
    label = LabelSpec(1, "brain", category=code, type=code)
    vol = Volume(np.zeros((2, 2, 2), np.float32), np.eye(4),
                 (FrameRef("1.2.3.1", "1.2.840.10008.5.1.4.1.1.4"),) * 2,
                 study_uid="1.2.826.0.1.1", series_uid="1.2.826.0.1.2",
                 frame_of_reference_uid="1.2.826.0.1.3", modality="MR")
    result = InferenceResult(
        model=ModelInfo("deepbet-brain", "1.0.2", intended_use="research | not diagnostic"),
        volume=vol,
        segmentation=SegmentationOutput((label,), np.zeros((1, 2, 2, 2), bool)),
        classifications=(ClassificationOutput(ClassSpec(0, "bleed", code, 0.5), 0.82),),
        measurements=(Measurement("volume", 1234.5, "ml", label_value=1),),
    )
    src = Dataset()
    src.PatientID = "PID&1"
    src.PatientName = "Doe^Jane^Q^Dr"
    src.AccessionNumber = "ACC|42"
    src.Modality = "MR"
    objects = (OutputObject("1.2.826.0.1.9", "1.2.840.10008.5.1.4.1.1.66.4", Path("x"), "seg"),)
    return ResultSummary.from_result(result, src, objects, job_id=7, completed_at=WHEN)


# --------------------------------------------------------------------------- webhook


def test_webhook_posts_the_summary(summary: ResultSummary) -> None:
    with http_server(202) as (url, bodies):
        cfg = NotificationConfig(name="dash", kind="webhook", url=url, auth_token="s3cret")
        assert send_webhook(cfg, summary) == 202
    (headers, body), = bodies
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["Content-Type"] == "application/json"
    assert body["study_instance_uid"] == "1.2.826.0.1.1" and body["job_id"] == 7
    assert body["model"]["name"] == "deepbet-brain"
    brain = {"value": "T-A0100", "scheme": "SRT", "meaning": "Brain"}
    assert body["measurements"] == [{"label": "brain", "name": "volume", "value": 1234.5,
                                     "unit": "ml", "code": brain}]
    assert body["findings"] == [{"name": "bleed", "probability": 0.82, "positive": True,
                                 "code": brain, "threshold": 0.5}]
    assert SIGNATURE_HEADER not in headers  # no secret configured: unsigned
    assert body["objects"][0]["kind"] == "seg"


@pytest.mark.parametrize(("status", "transient"), [(503, True), (429, True), (400, False),
                                                   (401, False)])
def test_webhook_failures_are_classified(summary: ResultSummary, status: int,
                                         transient: bool) -> None:
    with http_server(status) as (url, _):
        with pytest.raises(DispatchError) as info:
            notify(NotificationConfig(name="dash", kind="webhook", url=url), summary)
    assert info.value.transient is transient and info.value.status == status
    assert f"HTTP {status}" in str(info.value)


def test_webhook_down_is_transient(summary: ResultSummary) -> None:
    cfg = NotificationConfig(name="dash", kind="webhook",
                             url=f"http://127.0.0.1:{free_port()}/hook", timeout_seconds=3)
    with pytest.raises(DispatchError, match="cannot reach") as info:
        send_webhook(cfg, summary)
    assert info.value.transient


# --------------------------------------------------------------------------- HL7 / MLLP


def test_hl7_oru_is_acknowledged_and_parses(summary: ResultSummary) -> None:
    with mllp_server("AA") as (port, received):
        cfg = NotificationConfig(name="ris", kind="hl7", host="127.0.0.1", port=port,
                                 receiving_application="RIS", receiving_facility="HOSP")
        control = send_hl7(cfg, summary, control_id="CTRL0001")
    assert control == "CTRL0001"
    (msg,) = received
    msh = msg.segment("MSH")
    assert str(msh[9]) == "ORU^R01^ORU_R01" and str(msh[10]) == "CTRL0001"
    assert str(msh[12]) == "2.5.1" and str(msh[5]) == "RIS"
    pid = msg.segment("PID")
    assert msg.unescape(str(pid[3])) == "PID&1"  # escaped on the wire, intact once parsed
    assert str(pid[5][0][0]) == "Doe" and str(pid[5][0][1]) == "Jane"
    obr = msg.segment("OBR")
    assert msg.unescape(str(obr[2])) == "ACC|42" and str(obr[3]) == "1.2.826.0.1.1"
    assert str(obr[25]) == "P"  # preliminary: an AI result nobody has verified yet
    assert str(msg.segment("TQ1")[9][0][0]) == "S"  # a positive finding: stat priority

    obx = {str(s[3][0][0]): s for s in msg.segments("OBX")}
    vol = obx["brain.volume"]
    assert str(vol[5]) == "1234.5" and str(vol[2]) == "NM" and str(vol[6][0][0]) == "ml"
    assert [str(c) for c in vol[3][0][:6]] == ["brain.volume", "brain volume", "L",
                                               "118565006", "Volume", "SCT"]
    prob, res = obx["bleed.probability"], obx["bleed.result"]
    assert str(prob[5]) == "0.82" and str(res[5]) == "POSITIVE"
    assert [str(c) for c in res[3][0][3:6]] == ["T-A0100", "Brain", "SRT"]  # the manifest's
    assert str(vol[4]) == "1" and str(prob[4]) == str(res[4]) == "2"  # OBX-4 groups
    assert str(obx["DICOM.SEG"][3][0][2]) == "L"  # no code: the local identifier alone
    assert str(prob[8]) == "A" and str(res[8]) == "A"  # OBX-8 abnormal flag
    assert msg.unescape(str(prob[7])) == "<0.5"
    assert {str(s[11]) for s in msg.segments("OBX")} == {"P"}
    assert str(obx["DICOM.SEG"][5]) == "1.2.826.0.1.9"
    assert "research" in msg.unescape(str(msg.segment("NTE")[3]))


@pytest.mark.parametrize(("code", "transient"), [("AE", True), ("AR", False)])
def test_hl7_negative_ack(summary: ResultSummary, code: str, transient: bool) -> None:
    with mllp_server(code) as (port, _):
        cfg = NotificationConfig(name="ris", kind="hl7", host="127.0.0.1", port=port)
        with pytest.raises(DispatchError, match=code) as info:
            notify(cfg, summary)
    assert info.value.transient is transient


def test_hl7_receiver_down_is_transient(summary: ResultSummary) -> None:
    cfg = NotificationConfig(name="ris", kind="hl7", host="127.0.0.1", port=free_port(),
                             timeout_seconds=3)
    with pytest.raises(DispatchError, match="no ACK") as info:
        send_hl7(cfg, summary)
    assert info.value.transient


def test_oru_escapes_delimiters(summary: ResultSummary) -> None:
    text = build_oru(NotificationConfig(name="ris", kind="hl7", host="h", port=1), summary, "X")
    pid = next(s for s in text.split("\r") if s.startswith("PID"))
    assert "PID\\T\\1" in pid and "|Doe^Jane^Q^^Dr" in pid
    assert "ACC\\F\\42" in text


def test_negative_finding_is_routine_and_normal(summary: ResultSummary) -> None:
    (f,) = summary.findings
    neg = dataclasses.replace(summary, findings=(dataclasses.replace(
        f, probability=0.2, positive=False),))
    cfg = NotificationConfig(name="ris", kind="hl7", host="h", port=1, result_status="final")
    msg = hl7.parse(build_oru(cfg, neg, "X"))
    assert str(msg.segment("TQ1")[9][0][0]) == "R" and str(msg.segment("OBR")[25]) == "F"
    flags = {str(s[5]): str(s[8]) for s in msg.segments("OBX") if str(s[2]) in ("NM", "ST")}
    assert flags["0.2"] == "N" and flags["NEGATIVE"] == "N"


# --------------------------------------------------------------------------- signed webhooks


def test_webhook_body_is_signed_and_verifies(summary: ResultSummary,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DN_TEST_HOOK_SECRET", "wh-secret-1")
    with webhook_server(200) as hook:
        cfg = NotificationConfig(name="dash", kind="webhook", url=hook.url,
                                 signing_secret="ignored-when-env-is-named",
                                 signing_secret_env="DN_TEST_HOOK_SECRET")
        send_webhook(cfg, summary)
    (headers, _), = hook.bodies
    (raw,) = hook.raw
    header = headers[SIGNATURE_HEADER]
    parts = dict(p.split("=", 1) for p in header.split(","))
    # the receiver's own check, written out: HMAC-SHA256 of "<t>.<raw body>"
    expected = hmac.new(b"wh-secret-1", parts["t"].encode() + b"." + raw,
                        hashlib.sha256).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)
    assert verify_signature("wh-secret-1", raw, header)
    assert not verify_signature("other-secret", raw, header)
    assert not verify_signature("wh-secret-1", raw + b" ", header)  # body tampered
    assert not verify_signature("wh-secret-1", raw, header,
                                now=int(parts["t"]) + 3600)  # replayed an hour later


def test_webhook_secret_env_missing_is_a_permanent_error(summary: ResultSummary) -> None:
    cfg = NotificationConfig(name="dash", kind="webhook", url="http://127.0.0.1:9/x",
                             signing_secret_env="DN_TEST_UNSET_SECRET_VARIABLE")
    with pytest.raises(DispatchError, match="DN_TEST_UNSET_SECRET_VARIABLE") as info:
        send_webhook(cfg, summary)
    assert not info.value.transient


def test_webhook_token_from_environment(summary: ResultSummary,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DN_TEST_HOOK_TOKEN", "tok-from-env")
    with http_server(200) as (url, bodies):
        send_webhook(NotificationConfig(name="dash", kind="webhook", url=url,
                                        auth_token_env="DN_TEST_HOOK_TOKEN"), summary)
    (headers, _), = bodies
    assert headers["Authorization"] == "Bearer tok-from-env"

