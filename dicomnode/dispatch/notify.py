"""Result notifications besides PACS: a JSON webhook, or HL7 v2.5.1 ORU^R01 over MLLP.

A worklist, RIS or dashboard learns that results exist (and the key numbers)
without querying PACS. Both senders raise :class:`~dicomnode.errors.DispatchError`
with ``transient`` set so the same retry policy as C-STORE deliveries applies:

* webhook: 2xx is success; 408, 425, 429 and 5xx, timeouts and refused
  connections are transient; other 4xx are permanent (the payload or the
  credentials are wrong, resending the same will not help).
* HL7: the receiver's ACK must carry MSA-1 ``AA``/``CA`` and echo our
  message control ID; ``AE``/``CE`` (application error) is transient,
  ``AR``/``CR`` (reject) is permanent; no ACK or a broken connection is
  transient.
"""

from __future__ import annotations

import hashlib
import json
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.config import NotificationConfig
from dicomnode.domain import InferenceResult, Measurement, ModelInfo, OutputObject
from dicomnode.errors import DispatchError

MLLP_START, MLLP_END = b"\x0b", b"\x1c\x0d"


@dataclass(frozen=True)
class MeasurementLine:
    label: str  # label name, or "" for a whole-series value
    name: str  # volume, mean, ...
    value: float
    unit: str  # UCUM


@dataclass(frozen=True)
class FindingLine:
    name: str
    probability: float
    positive: bool


@dataclass(frozen=True)
class ResultSummary:
    """What a notification says about one model run on one series."""

    study_uid: str
    series_uid: str
    model: ModelInfo
    patient_id: str = ""
    patient_name: str = ""  # DICOM PN: family^given^middle^prefix^suffix
    accession_number: str = ""
    modality: str = ""
    series_description: str = ""
    measurements: tuple[MeasurementLine, ...] = ()
    findings: tuple[FindingLine, ...] = ()
    objects: tuple[OutputObject, ...] = ()
    job_id: int | None = None
    completed_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def from_result(
        cls,
        result: InferenceResult,
        source: Dataset,
        objects: Sequence[OutputObject] = (),
        job_id: int | None = None,
        completed_at: datetime | None = None,
    ) -> ResultSummary:
        """Summary of ``result``; patient and order identity come from ``source``
        (a header of the processed series)."""
        labels = {}
        if result.segmentation is not None:
            labels = {lab.value: lab.name for lab in result.segmentation.labels}

        def line(m: Measurement) -> MeasurementLine:
            label = labels.get(m.label_value, str(m.label_value)) if m.label_value else ""
            return MeasurementLine(label, m.name, float(m.value), m.unit)

        return cls(
            study_uid=result.volume.study_uid,
            series_uid=result.volume.series_uid,
            model=result.model,
            patient_id=str(source.get("PatientID", "") or ""),
            patient_name=str(source.get("PatientName", "") or ""),
            accession_number=str(source.get("AccessionNumber", "") or ""),
            modality=str(source.get("Modality", "") or result.volume.modality),
            series_description=str(source.get("SeriesDescription", "") or ""),
            measurements=tuple(line(m) for m in result.measurements),
            findings=tuple(FindingLine(c.spec.name, float(c.probability), c.positive)
                           for c in result.classifications),
            objects=tuple(objects),
            job_id=job_id,
            completed_at=completed_at or datetime.now(UTC),
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultSummary:
        """The summary :meth:`to_json` wrote (how the outbox keeps it until sent)."""
        patient = data.get("patient") or {}
        model = data.get("model") or {}
        family = model.get("family", "AI")
        return cls(
            study_uid=str(data.get("study_instance_uid", "")),
            series_uid=str(data.get("series_instance_uid", "")),
            model=ModelInfo(name=str(model.get("name", "")), version=str(model.get("version", "")),
                            family="rule-based" if family == "rule-based" else "AI",
                            intended_use=str(model.get("intended_use", "") or "")),
            patient_id=str(patient.get("id", "")),
            patient_name=str(patient.get("name", "")),
            accession_number=str(data.get("accession_number", "")),
            modality=str(data.get("modality", "")),
            series_description=str(data.get("series_description", "")),
            measurements=tuple(MeasurementLine(str(m["label"]), str(m["name"]), float(m["value"]),
                                               str(m["unit"]))
                               for m in data.get("measurements", [])),
            findings=tuple(FindingLine(str(f["name"]), float(f["probability"]),
                                       bool(f["positive"])) for f in data.get("findings", [])),
            objects=tuple(OutputObject(str(o["sop_instance_uid"]), str(o["sop_class_uid"]),
                                       Path(), str(o.get("kind", "")))
                          for o in data.get("objects", [])),
            job_id=data.get("job_id"),
            completed_at=datetime.fromisoformat(data["completed_at"]) if data.get(
                "completed_at") else datetime.now(UTC),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "dicomnode.result",
            "job_id": self.job_id,
            "completed_at": self.completed_at.isoformat(),
            "patient": {"id": self.patient_id, "name": self.patient_name},
            "accession_number": self.accession_number,
            "study_instance_uid": self.study_uid,
            "series_instance_uid": self.series_uid,
            "modality": self.modality,
            "series_description": self.series_description,
            "model": {"name": self.model.name, "version": self.model.version,
                      "family": self.model.family, "intended_use": self.model.intended_use},
            "measurements": [vars(m) for m in self.measurements],
            "findings": [vars(f) for f in self.findings],
            "objects": [{"sop_instance_uid": o.sop_instance_uid,
                         "sop_class_uid": o.sop_class_uid, "kind": o.kind}
                        for o in self.objects],
        }


# --------------------------------------------------------------------------- webhook


def send_webhook(cfg: NotificationConfig, summary: ResultSummary) -> int:
    """POST the JSON summary; returns the HTTP status (2xx) or raises DispatchError."""
    body = json.dumps(summary.to_json()).encode()
    req = urllib.request.Request(cfg.url, data=body, method="POST", headers={
        "Content-Type": "application/json",
        "User-Agent": "dicomnode",
        **({"Authorization": f"Bearer {cfg.auth_token}"} if cfg.auth_token else {}),
    })
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout_seconds) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        transient = exc.code in (408, 425, 429) or exc.code >= 500
        raise DispatchError(f"webhook {cfg.name}: {cfg.url} answered HTTP {exc.code} "
                            f"{exc.reason}", transient=transient, status=exc.code) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DispatchError(f"webhook {cfg.name}: cannot reach {cfg.url}: {reason}",
                            transient=True) from None


# --------------------------------------------------------------------------- HL7 v2


def hl7_escape(value: str) -> str:
    """Escape HL7 delimiters (``|^~\\&``) and drop segment/field breaks."""
    out = (str(value).replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
           .replace("~", "\\R\\").replace("&", "\\T\\"))
    return out.replace("\r", " ").replace("\n", " ")


def _hl7_name(pn: str) -> str:
    # DICOM PN family^given^middle^prefix^suffix -> HL7 XPN family^given^middle^suffix^prefix
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (hl7_escape(p) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y%m%d%H%M%S") + "+0000"


def _num(v: float) -> str:
    return f"{v:.6g}"


def build_oru(cfg: NotificationConfig, summary: ResultSummary, control_id: str) -> str:
    """An HL7 v2.5.1 ORU^R01 message (segments separated by CR)."""
    e = hl7_escape
    when = _ts(summary.completed_at)
    model = f"{e(summary.model.name)}^{e(summary.model.name)} {e(summary.model.version)}^L"
    segments = [
        "|".join(["MSH", "^~\\&", e(cfg.sending_application), e(cfg.sending_facility),
                  e(cfg.receiving_application), e(cfg.receiving_facility), when, "",
                  "ORU^R01^ORU_R01", e(control_id), "P", "2.5.1", "", "", "AL", "NE"]),
        "|".join(["PID", "1", "", f"{e(summary.patient_id)}", "",
                  _hl7_name(summary.patient_name)]),
        "|".join(["OBR", "1", e(summary.accession_number), e(summary.study_uid), model,
                  "", "", when] + [""] * 17 + ["F"]),
    ]
    n = 0

    def obx(kind: str, ident: str, text: str, value: str, unit: str = "") -> None:
        nonlocal n
        n += 1
        segments.append("|".join(["OBX", str(n), kind, f"{e(ident)}^{e(text)}^L", "",
                                  value, f"{e(unit)}^^UCUM" if unit else "", "", "", "",
                                  "", "F", "", "", when]))

    for m in summary.measurements:
        ident = f"{m.label}.{m.name}" if m.label else m.name
        obx("NM", ident, f"{m.label} {m.name}".strip(), _num(m.value), m.unit)
    for f in summary.findings:
        obx("NM", f"{f.name}.probability", f"{f.name} probability", _num(f.probability), "1")
        obx("ST", f"{f.name}.result", f"{f.name} result",
            "POSITIVE" if f.positive else "NEGATIVE")
    for o in summary.objects:
        kind = (o.kind or "dicom").upper()
        obx("ST", f"DICOM.{kind}", f"DICOM {kind} object", e(o.sop_instance_uid))
    note = f"{summary.model.name} {summary.model.version} ({summary.model.family})"
    if summary.model.intended_use:
        note += f": {summary.model.intended_use}"
    segments.append("|".join(["NTE", "1", "L", e(note)]))
    return "\r".join(segments) + "\r"


def _read_mllp(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    buf = b""
    while MLLP_END not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before a complete MLLP frame")
        buf += chunk
        if len(buf) > limit:
            raise ConnectionError("MLLP answer larger than 1 MiB")
    start = buf.find(MLLP_START)
    return buf[start + 1 if start >= 0 else 0: buf.index(MLLP_END)]


def _ack_fields(ack: str) -> tuple[str, str, str]:
    """(MSA-1 code, MSA-2 control id, MSA-3 / ERR text) of an ACK."""
    for seg in ack.replace("\n", "\r").split("\r"):
        if seg.startswith("MSA"):
            sep = seg[3] if len(seg) > 3 else "|"
            f = seg.split(sep) + ["", "", ""]
            return f[1].strip(), f[2].strip(), f[3].strip()
    return "", "", ""


def send_hl7(cfg: NotificationConfig, summary: ResultSummary,
             control_id: str | None = None) -> str:
    """Send the ORU^R01 over MLLP and check the ACK; returns the control ID used."""
    control_id = control_id or uuid.uuid4().hex[:20]
    message = build_oru(cfg, summary, control_id).encode("utf-8")
    peer = f"{cfg.host}:{cfg.port}"
    try:
        with socket.create_connection((cfg.host, cfg.port), timeout=cfg.timeout_seconds) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(MLLP_START + message + MLLP_END)
            ack = _read_mllp(s).decode("utf-8", "replace")
    except (OSError, ConnectionError) as exc:
        raise DispatchError(f"hl7 {cfg.name}: no ACK from {peer}: {exc}", transient=True) from None
    code, acked_id, text = _ack_fields(ack)
    if code in ("AA", "CA"):
        if acked_id != control_id:
            raise DispatchError(f"hl7 {cfg.name}: {peer} acknowledged control ID {acked_id!r}, "
                                f"expected {control_id!r}", transient=True)
        return control_id
    if code in ("AE", "CE"):
        raise DispatchError(f"hl7 {cfg.name}: {peer} answered {code} (application error)"
                            + (f": {text}" if text else ""), transient=True)
    if code in ("AR", "CR"):
        raise DispatchError(f"hl7 {cfg.name}: {peer} rejected the message ({code})"
                            + (f": {text}" if text else ""), transient=False)
    raise DispatchError(f"hl7 {cfg.name}: {peer} sent no valid ACK (MSA-1 {code!r})",
                        transient=True)


def control_id_for(notification_id: str) -> str:
    """A stable HL7 message control ID (20 characters) for one queued notification:
    a resend after a lost ACK carries the same ID, so the receiver can spot it."""
    return hashlib.sha256(notification_id.encode()).hexdigest()[:20]


def notify(cfg: NotificationConfig, summary: ResultSummary,
           notification_id: str | None = None) -> int | None:
    """Send ``summary`` to one notification target (raises DispatchError on failure).

    Returns the webhook's HTTP status (None for HL7). ``notification_id`` (the
    outbox row's id) makes the HL7 control ID stable across retries.
    """
    if cfg.kind == "webhook":
        return send_webhook(cfg, summary)
    if cfg.kind == "hl7":
        send_hl7(cfg, summary, control_id_for(notification_id) if notification_id else None)
        return None
    raise DispatchError(f"notification {cfg.name}: unknown kind {cfg.kind!r}",  # pragma: no cover
                        transient=False)
