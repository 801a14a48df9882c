"""Result notifications against real receivers: an HTTP server and python-hl7's MLLP server."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import NotificationConfig
from dicomnode.dispatch.notify import ResultSummary, build_oru, notify, send_hl7, send_webhook
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
from tests.support.notify_peers import http_server, mllp_server
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
    assert body["measurements"] == [{"label": "brain", "name": "volume", "value": 1234.5,
                                     "unit": "ml"}]
    assert body["findings"] == [{"name": "bleed", "probability": 0.82, "positive": True}]
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
    assert str(obr[25]) == "F"
    obx = {str(s[3][0][0]): s for s in msg.segments("OBX")}
    assert str(obx["brain.volume"][5]) == "1234.5" and str(obx["brain.volume"][2]) == "NM"
    assert str(obx["brain.volume"][6][0][0]) == "ml"
    assert str(obx["bleed.probability"][5]) == "0.82"
    assert str(obx["bleed.result"][5]) == "POSITIVE"
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
