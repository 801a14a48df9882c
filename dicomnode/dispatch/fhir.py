"""FHIR R4 results: one transaction Bundle per result, POSTed to the server's base URL.

The resources are built with the ``fhir.resources`` R4B models (validated as they are
built), following the HL7 *DICOM SR to FHIR Resource Mapping* guidance where it applies:

* ``Patient``: identifier from the DICOM Patient ID (``patient_identifier_system``),
  name from Patient's Name; created only if none with that identifier exists
  (``ifNoneExist``), so the report lands on the hospital's existing patient.
* ``Device``: the model (TID 4019 algorithm identification -> Device): name, version,
  the SHA-256 of each weights file as an identifier; conditional create too.
* ``Observation`` per measurement (TID 1500 measurement -> Observation): SNOMED CT
  concept of the measurement (Volume, Mean, ...), ``valueQuantity`` with UCUM units, the
  segment's Segmented Property Type (manifest) as ``bodySite``, ``device`` the model,
  ``derivedFrom`` / ``partOf``-free links to the ImagingStudy by Study Instance UID.
* ``Observation`` per classification finding: the manifest's concept, the probability as
  ``valueQuantity`` (unit ``1``), ``interpretation`` POS / NEG against the manifest's
  threshold.
* ``DiagnosticReport``: status ``preliminary`` (``result_status``), category imaging
  (HL7 v2-0074 RAD and observation-category imaging), the procedure's code from the
  header (else the LOINC "<modality> unspecified body region" the SR reports), subject
  the Patient, ``basedOn`` the order's ServiceRequest by accession number (identifier
  type ACSN), ``imagingStudy`` by Study Instance UID (``urn:dicom:uid``), ``result`` the
  Observations, ``identifier`` stable per queued notification (a resend is recognised
  by ``ifNoneExist``, never duplicated).

Deviation from the letter of the issue: R4 allows no Device as ``DiagnosticReport.performer``
(Practitioner, PractitionerRole, Organization, CareTeam only; a validating server
rejects it); the model is therefore each Observation's ``device``, as the mapping
guidance does, and named in the report's ``conclusion``.

HTTP outcomes follow the webhook rules (:func:`dicomnode.dispatch.notify.post_json`):
2xx delivered; 408/425/429/5xx and network errors transient; other 4xx permanent.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from dicomnode.config import NotificationConfig
from dicomnode.dispatch.notify import MEASUREMENT_CODES, ResultSummary, post_json
from dicomnode.domain import CodedConcept

#: DICOM coding scheme designators -> FHIR code system URIs (PS3.16 Table 8-1 / FHIR).
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "SRT": "http://snomed.info/srt",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "RADLEX": "http://radlex.org",
    "RXN": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "FMA": "http://purl.org/sig/ont/fma",
}
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
WEIGHTS_SYSTEM = "urn:dicomnode:model-weights-sha256"
REPORT_SYSTEM = "urn:dicomnode:result"
_NS = uuid.UUID("2f1c7c52-5d0e-4b43-9c4f-6a57d8a4a0b1")  # uuid5 namespace of our fullUrls

#: The procedure the SR reports when the header has no procedure code (same as encode/sr.py).
_PROCEDURE = {
    "CT": CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "PT": CodedConcept("44136-0", "LN", "PET unspecified body region"),
    "NM": CodedConcept("49118-3", "LN", "NM unspecified body region"),
}
_IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")


def system_of(scheme: str) -> str:
    """The FHIR system URI of a DICOM coding scheme designator."""
    return SYSTEMS.get(scheme.upper(), f"urn:dicom:coding-scheme:{scheme}")


def _concept(c: CodedConcept, text: str = "") -> dict[str, Any]:
    return {"coding": [{"system": system_of(c.scheme), "code": c.value,
                        "display": c.meaning}], "text": text or c.meaning}


def _uuid(seed: str, what: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NS, f'{seed}/{what}')}"


def _human_name(pn: str) -> list[dict[str, Any]]:
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    if not (family or given):
        return []
    name: dict[str, Any] = {"use": "official", "text": " ".join(
        p for p in (prefix, given, middle, family, suffix) if p)}
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [p for p in (given, middle) if p]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return [name]


def _query(system: str, value: str) -> str:
    """An ``ifNoneExist`` search: ``identifier=<system>|<value>``, the value escaped as a
    FHIR search token (``\\`` before ``,``, ``$``, ``|``, ``\\``) and both URL-encoded
    (a Patient ID may hold ``&`` or ``#``)."""
    esc = value.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$",
                                                                                    "\\$")
    return f"identifier={quote(system, safe=':/')}|{quote(esc, safe='')}"


def build_bundle(cfg: NotificationConfig, summary: ResultSummary,
                 notification_id: str) -> Bundle:
    """The transaction Bundle for one result (deterministic for one ``notification_id``)."""
    seed = notification_id or f"{summary.series_uid}/{summary.model.name}/{summary.job_id}"
    status = cfg.result_status
    issued = summary.completed_at.isoformat()
    patient_url, device_url = _uuid(seed, "patient"), _uuid(seed, "device")
    report_url = _uuid(seed, "report")
    study_ref = {"type": "ImagingStudy", "display": f"Study {summary.study_uid}",
                 "identifier": {"system": DICOM_UID, "value": f"urn:oid:{summary.study_uid}"}}
    category = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                       "observation-category",
                             "code": "imaging", "display": "Imaging"}]}]
    entries: list[dict[str, Any]] = []
    subject: dict[str, Any] | None = None
    if summary.patient_id:
        patient = Patient.model_validate({
            "resourceType": "Patient",
            "identifier": [{"use": "usual", "system": cfg.patient_identifier_system,
                            "value": summary.patient_id}],
            "name": _human_name(summary.patient_name) or None,
        })
        entries.append({"fullUrl": patient_url, "resource": patient, "request": {
            "method": "POST", "url": "Patient",
            "ifNoneExist": _query(cfg.patient_identifier_system, summary.patient_id)}})
        subject = {"reference": patient_url, "type": "Patient"}

    model = summary.model
    device_ids = [{"system": WEIGHTS_SYSTEM, "value": h} for h in model.weights_sha256]
    device_key = (_query(WEIGHTS_SYSTEM, model.weights_sha256[0]) if model.weights_sha256
                  else f"device-name={quote(model.name, safe='')}"
                       f"&version={quote(model.version, safe='')}")
    device = Device.model_validate({
        "resourceType": "Device",
        "status": "active",
        "identifier": device_ids or None,
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "version": [{"value": model.version}] if model.version else None,
        "type": {"text": "AI model" if model.family == "AI" else "Rule-based algorithm"},
        "note": [{"text": model.intended_use}] if model.intended_use else None,
    })
    entries.append({"fullUrl": device_url, "resource": device, "request": {
        "method": "POST", "url": "Device", "ifNoneExist": device_key}})
    device_ref = {"reference": device_url, "type": "Device",
                  "display": f"{model.name} {model.version}".strip()}

    def observation(what: str, code: dict[str, Any], **fields: Any) -> dict[str, Any]:
        url = _uuid(seed, what)
        obs = Observation.model_validate({
            "resourceType": "Observation", "status": status, "category": category,
            "code": code, "issued": issued, "device": device_ref,
            "derivedFrom": [study_ref], "identifier": [{
                "system": REPORT_SYSTEM, "value": f"{seed}/{what}"}],
            **({"subject": subject} if subject else {}), **fields})
        entries.append({"fullUrl": url, "resource": obs,
                        "request": {"method": "POST", "url": "Observation",
                                    "ifNoneExist": _query(REPORT_SYSTEM, f"{seed}/{what}")}})
        return {"reference": url, "type": "Observation"}

    results = []
    for i, m in enumerate(summary.measurements):
        concept = MEASUREMENT_CODES.get(m.name)
        text = f"{m.label} {m.name}".strip()
        code = (_concept(concept, text) if concept else {"text": text})
        extra: dict[str, Any] = {}
        if m.code is not None:
            extra["bodySite"] = _concept(m.code, m.label or m.code.meaning)
        results.append(observation(f"measurement/{i}", code, valueQuantity={
            "value": m.value, "unit": m.unit, "system": UCUM, "code": m.unit}, **extra))
    positives = []
    for i, f in enumerate(summary.findings):
        code = _concept(f.code, f.name) if f.code else {"text": f.name}
        interp = ({"code": "POS", "display": "Positive"} if f.positive
                  else {"code": "NEG", "display": "Negative"})
        results.append(observation(
            f"finding/{i}", code,
            valueQuantity={"value": f.probability, "unit": "probability", "system": UCUM,
                           "code": "1"},
            interpretation=[{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                **interp}], "text": f"{interp['display']} (threshold {f.threshold:g})"}],
            referenceRange=[{"high": {"value": f.threshold, "unit": "probability",
                                      "system": UCUM, "code": "1"},
                             "text": f"positive at or above {f.threshold:g}"}]))
        if f.positive:
            positives.append(code)

    procedure = summary.procedure or _PROCEDURE.get(summary.modality, _IMAGING_PROCEDURE)
    conclusion = (f"Preliminary result of {model.name} {model.version} ({model.family}); "
                  if status == "preliminary" else f"Result of {model.name} {model.version}; ")
    conclusion += (f"positive: {', '.join(c['text'] for c in positives)}." if positives else
                   (f"{len(summary.findings)} finding(s) negative." if summary.findings
                    else f"{len(summary.measurements)} measurement(s)."))
    if model.intended_use:
        conclusion += f" Intended use: {model.intended_use}"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": REPORT_SYSTEM, "value": seed}],
        "status": status,
        "category": [{"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
             "display": "Radiology"},
            {"system": "http://terminology.hl7.org/CodeSystem/observation-category",
             "code": "imaging", "display": "Imaging"}]}],
        "code": _concept(procedure, summary.study_description or procedure.meaning),
        "issued": issued,
        "imagingStudy": [study_ref],
        "result": results or None,
        "conclusion": conclusion,
        "conclusionCode": positives or None,
        **({"subject": subject} if subject else {}),
    }
    if summary.accession_number:
        accession = {"type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN",
            "display": "Accession ID"}]}, "system": cfg.accession_identifier_system,
            "value": summary.accession_number}
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": accession}]
        report["identifier"].append(accession)
    entries.append({"fullUrl": report_url,
                    "resource": DiagnosticReport.model_validate(report),
                    "request": {"method": "POST", "url": "DiagnosticReport",
                                "ifNoneExist": _query(REPORT_SYSTEM, seed)}})
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction",
                                  "entry": entries})


def send_fhir(cfg: NotificationConfig, summary: ResultSummary, notification_id: str) -> int:
    """POST the transaction Bundle to ``cfg.url``; the HTTP status, or DispatchError."""
    bundle = build_bundle(cfg, summary, notification_id)
    status, _ = post_json(cfg, bundle.model_dump_json(exclude_none=True).encode(),
                          "application/fhir+json", {"Accept": "application/fhir+json"})
    return status
