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
import hmac
import json
import os
import socket
import ssl
import time
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
from dicomnode.domain import CodedConcept, InferenceResult, Measurement, ModelInfo, OutputObject
from dicomnode.errors import DispatchError

MLLP_START, MLLP_END = b"\x0b", b"\x1c\x0d"


@dataclass(frozen=True)
class MeasurementLine:
    label: str  # label name, or "" for a whole-series value
    name: str  # volume, mean, ...
    value: float
    unit: str  # UCUM
    code: CodedConcept | None = None  # the segment's Segmented Property Type (manifest)


@dataclass(frozen=True)
class FindingLine:
    name: str
    probability: float
    positive: bool
    code: CodedConcept | None = None  # the class's concept (manifest)
    threshold: float = 0.5  # the manifest's threshold: positive at or above it


def _code_json(c: CodedConcept | None) -> dict[str, str] | None:
    return None if c is None else {"value": c.value, "scheme": c.scheme, "meaning": c.meaning}


def _code_from(d: Any) -> CodedConcept | None:
    if not isinstance(d, dict) or not d.get("value"):
        return None
    return CodedConcept(str(d["value"]), str(d.get("scheme", "")), str(d.get("meaning", "")))


def _procedure_code(source: Dataset) -> CodedConcept | None:
    """The procedure's code from the header (Procedure Code, else Requested Procedure Code)."""
    for keyword in ("ProcedureCodeSequence", "RequestedProcedureCodeSequence"):
        seq = source.get(keyword)
        if seq:
            item = seq[0]
            value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "")
            if value:
                return CodedConcept(value, str(item.get("CodingSchemeDesignator", "") or ""),
                                    str(item.get("CodeMeaning", "") or ""))
    return None


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
    study_description: str = ""
    procedure: CodedConcept | None = None  # from the header's (Requested) Procedure Code
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
            labels = {lab.value: lab for lab in result.segmentation.labels}

        def line(m: Measurement) -> MeasurementLine:
            spec = labels.get(m.label_value) if m.label_value else None
            label = (spec.name if spec else str(m.label_value)) if m.label_value else ""
            return MeasurementLine(label, m.name, float(m.value), m.unit,
                                   spec.type if spec else None)

        return cls(
            study_uid=result.volume.study_uid,
            series_uid=result.volume.series_uid,
            model=result.model,
            patient_id=str(source.get("PatientID", "") or ""),
            patient_name=str(source.get("PatientName", "") or ""),
            accession_number=str(source.get("AccessionNumber", "") or ""),
            modality=str(source.get("Modality", "") or result.volume.modality),
            series_description=str(source.get("SeriesDescription", "") or ""),
            study_description=str(source.get("StudyDescription", "") or ""),
            procedure=_procedure_code(source),
            measurements=tuple(line(m) for m in result.measurements),
            findings=tuple(FindingLine(c.spec.name, float(c.probability), c.positive,
                                       c.spec.code, float(c.spec.threshold))
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
                            intended_use=str(model.get("intended_use", "") or ""),
                            weights_sha256=tuple(str(h) for h in model.get("weights_sha256", ()))),
            patient_id=str(patient.get("id", "")),
            patient_name=str(patient.get("name", "")),
            accession_number=str(data.get("accession_number", "")),
            modality=str(data.get("modality", "")),
            series_description=str(data.get("series_description", "")),
            study_description=str(data.get("study_description", "") or ""),
            procedure=_code_from(data.get("procedure")),
            measurements=tuple(MeasurementLine(str(m["label"]), str(m["name"]), float(m["value"]),
                                               str(m["unit"]), _code_from(m.get("code")))
                               for m in data.get("measurements", [])),
            findings=tuple(FindingLine(str(f["name"]), float(f["probability"]),
                                       bool(f["positive"]), _code_from(f.get("code")),
                                       float(f.get("threshold", 0.5)))
                           for f in data.get("findings", [])),
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
            "study_description": self.study_description,
            "procedure": _code_json(self.procedure),
            "model": {"name": self.model.name, "version": self.model.version,
                      "family": self.model.family, "intended_use": self.model.intended_use,
                      "weights_sha256": list(self.model.weights_sha256)},
            "measurements": [{**vars(m), "code": _code_json(m.code)} for m in self.measurements],
            "findings": [{**vars(f), "code": _code_json(f.code)} for f in self.findings],
            "objects": [{"sop_instance_uid": o.sop_instance_uid,
                         "sop_class_uid": o.sop_class_uid, "kind": o.kind}
                        for o in self.objects],
        }


# --------------------------------------------------------------------------- webhook


SIGNATURE_HEADER = "X-Dicomnode-Signature"


def secret_from(cfg: NotificationConfig, env_name: str, literal: str, what: str) -> str:
    """A secret named by an environment variable (read now, so a rotated secret is used at
    the next send), else the literal from the configuration; "" when neither is set.

    An environment variable named but not set is a permanent error naming it (resending
    the same will not help until the operator sets it and retries).
    """
    if env_name:
        value = os.environ.get(env_name, "")
        if not value:
            raise DispatchError(f"{cfg.kind} {cfg.name}: environment variable {env_name} "
                                f"({what}) is not set", transient=False)
        return value
    return literal


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value ``t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``.

    The receiver recomputes the HMAC over the timestamp and the raw body with the shared
    secret, compares in constant time, and rejects stale timestamps (replays).
    """
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(secret: str, body: bytes, header: str, *, tolerance_seconds: float = 300,
                     now: float | None = None) -> bool:
    """Check a ``X-Dicomnode-Signature`` header (for receivers written in Python)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_seconds:
        return False
    expected = sign(secret, body, t).split(",", 1)[1][3:]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def post_json(cfg: NotificationConfig, body: bytes, content_type: str,
              extra_headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST ``body`` to ``cfg.url``; (status, response body) for 2xx, else DispatchError:
    408, 425, 429 and 5xx, timeouts and refused connections are transient, other 4xx
    permanent. Used by the webhook and the FHIR sender."""
    token = secret_from(cfg, cfg.auth_token_env, cfg.auth_token, "bearer token")
    req = urllib.request.Request(cfg.url, data=body, method="POST", headers={
        "Content-Type": content_type,
        "User-Agent": "dicomnode",
        **({"Authorization": f"Bearer {token}"} if token else {}),
        **(extra_headers or {}),
    })
    context = None
    if cfg.url.startswith("https://") and not cfg.verify_tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout_seconds,  # noqa: S310
                                    context=context) as resp:
            return int(resp.status), resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        transient = exc.code in (408, 425, 429) or exc.code >= 500
        detail = ""
        try:
            detail = exc.read(2000).decode("utf-8", "replace").strip()
        except OSError:
            pass
        raise DispatchError(f"{cfg.kind} {cfg.name}: {cfg.url} answered HTTP {exc.code} "
                            f"{exc.reason}" + (f": {detail[:500]}" if detail else ""),
                            transient=transient, status=exc.code) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):
            # a certificate that does not verify will not verify on a retry either
            raise DispatchError(f"{cfg.kind} {cfg.name}: TLS error talking to {cfg.url}: "
                                f"{reason.verify_message or reason}", transient=False) from None
        raise DispatchError(f"{cfg.kind} {cfg.name}: cannot reach {cfg.url}: {reason}",
                            transient=True) from None


def send_webhook(cfg: NotificationConfig, summary: ResultSummary) -> int:
    """POST the JSON summary (signed when a secret is configured); returns the HTTP status
    (2xx) or raises DispatchError."""
    body = json.dumps(summary.to_json()).encode()
    secret = secret_from(cfg, cfg.signing_secret_env, cfg.signing_secret, "signing secret")
    headers = {SIGNATURE_HEADER: sign(secret, body)} if secret else {}
    status, _ = post_json(cfg, body, "application/json", headers)
    return status


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


#: SNOMED CT concepts of the measurement kinds (as in the SR, TID 1419).
MEASUREMENT_CODES = {
    "volume": CodedConcept("118565006", "SCT", "Volume"),
    "mean": CodedConcept("373098007", "SCT", "Mean"),
    "min": CodedConcept("255605001", "SCT", "Minimum"),
    "max": CodedConcept("56851009", "SCT", "Maximum"),
    "std": CodedConcept("386136009", "SCT", "Standard Deviation"),
}


def has_priority_finding(summary: ResultSummary) -> bool:
    """A positive finding: its probability reached the manifest's threshold."""
    return any(f.positive for f in summary.findings)


def build_oru(cfg: NotificationConfig, summary: ResultSummary, control_id: str) -> str:
    """An HL7 v2.5.1 ORU^R01 message (segments separated by CR).

    * OBR-25 and every OBX-11 carry the result status (``P`` preliminary by default, ``F``
      with ``result_status: final``).
    * TQ1-9 is the result priority: ``S`` (stat) when a finding is positive (its
      probability reached the manifest's threshold), else ``R`` (routine).
    * OBX-8 (abnormal flags) is ``A`` on a positive finding's OBX, ``N`` on a negative one.
    * OBX-3 is the node's identifier (``<label>.<name>``, coding system ``L``: unique
      in the message, what receivers already key on), with the standard code as its
      alternate identifier (CWE components 4-6) where there is one: a finding's concept
      from the manifest, a measurement's SNOMED CT concept (Volume, Mean, ...).
    * OBX-4 (sub-ID) groups the OBX of one segment, or of one finding, so the coded
      alternates (the same Volume concept for every segment) stay distinguishable.
    """
    e = hl7_escape
    when = _ts(summary.completed_at)
    status = "F" if cfg.result_status == "final" else "P"
    model = f"{e(summary.model.name)}^{e(summary.model.name)} {e(summary.model.version)}^L"
    priority = ("S^Stat^HL70485" if has_priority_finding(summary) else "R^Routine^HL70485")
    segments = [
        "|".join(["MSH", "^~\\&", e(cfg.sending_application), e(cfg.sending_facility),
                  e(cfg.receiving_application), e(cfg.receiving_facility), when, "",
                  "ORU^R01^ORU_R01", e(control_id), "P", "2.5.1", "", "", "AL", "NE"]),
        "|".join(["PID", "1", "", f"{e(summary.patient_id)}", "",
                  _hl7_name(summary.patient_name)]),
        "|".join(["OBR", "1", e(summary.accession_number), e(summary.study_uid), model,
                  "", "", when] + [""] * 17 + [status]),
        "|".join(["TQ1", "1", "", "", "", "", "", "", "", priority]),
    ]
    n = 0

    def ident(local: str, text: str, code: CodedConcept | None) -> str:
        own = f"{e(local)}^{e(text)}^L"
        if code is None:
            return own
        return f"{own}^{e(code.value)}^{e(code.meaning)}^{e(code.scheme)}"

    def obx(kind: str, identifier: str, value: str, unit: str = "", ref: str = "",
            flag: str = "", sub_id: str = "") -> None:
        nonlocal n
        n += 1
        segments.append("|".join(["OBX", str(n), kind, identifier, sub_id, value,
                                  f"{e(unit)}^^UCUM" if unit else "", e(ref), flag, "",
                                  "", status, "", "", when]))

    groups: dict[str, int] = {}
    for m in summary.measurements:
        local = f"{m.label}.{m.name}" if m.label else m.name
        group = groups.setdefault(m.label, len(groups) + 1)
        obx("NM", ident(local, f"{m.label} {m.name}".strip(), MEASUREMENT_CODES.get(m.name)),
            _num(m.value), m.unit, sub_id=str(group))
    for f in summary.findings:
        flag = "A" if f.positive else "N"
        group = len(groups) + 1
        groups[f"finding:{f.name}"] = group
        obx("NM", ident(f"{f.name}.probability", f"{f.name} probability", f.code),
            _num(f.probability), "1", ref=f"<{_num(f.threshold)}", flag=flag,
            sub_id=str(group))
        obx("ST", ident(f"{f.name}.result", f"{f.name} result", f.code),
            "POSITIVE" if f.positive else "NEGATIVE", flag=flag, sub_id=str(group))
    for o in summary.objects:
        kind = (o.kind or "dicom").upper()
        obx("ST", ident(f"DICOM.{kind}", f"DICOM {kind} object", None), e(o.sop_instance_uid))
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

    Returns the HTTP status of a webhook or FHIR server (None for HL7).
    ``notification_id`` (the outbox row's id) makes the HL7 control ID and the FHIR
    Bundle's identifiers stable across retries.
    """
    if cfg.kind == "webhook":
        return send_webhook(cfg, summary)
    # fhir: dicomnode.dispatch.fhir.send_fhir (it builds on this module; the dispatcher
    # picks it by kind).
    if cfg.kind == "hl7":
        send_hl7(cfg, summary, control_id_for(notification_id) if notification_id else None)
        return None
    raise DispatchError(f"notification {cfg.name}: unknown kind {cfg.kind!r}",  # pragma: no cover
                        transient=False)
