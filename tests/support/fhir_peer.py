"""A FHIR server's transaction endpoint on 127.0.0.1 (http.server in a thread) that
validates every posted Bundle, and each entry's resource, with the fhir.resources R4B
models; it answers the status it is set to (201, 400, 503 ...), or 400 with an
OperationOutcome for an invalid Bundle (recorded in ``invalid``)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle


class FhirEndpoint:
    """A FHIR server's transaction endpoint: validates, records, answers ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.bundles: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.invalid: list[str] = []
        self.url = ""


def _validate(raw: bytes) -> dict[str, Any]:
    """Parse and validate a transaction Bundle and each entry's resource (R4B models)."""
    bundle = Bundle.model_validate_json(raw)
    assert bundle.type == "transaction", bundle.type
    data = json.loads(raw)
    for entry in data["entry"]:
        res = entry["resource"]
        get_fhir_model_class(res["resourceType"]).model_validate(res)
        assert entry["request"]["method"] in ("POST", "PUT")
        assert entry["fullUrl"].startswith("urn:uuid:")
    return data


@contextlib.contextmanager
def fhir_endpoint(status: int = 201) -> Iterator[FhirEndpoint]:
    ep = FhirEndpoint(status)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            ep.headers.append(dict(self.headers))
            try:
                if self.path.rstrip("/") != "/fhir":
                    raise ValueError(f"posted to {self.path}, not the base URL")
                if self.headers["Content-Type"] != "application/fhir+json":
                    raise ValueError(f"content type {self.headers['Content-Type']}")
                ep.bundles.append(_validate(raw))
                code = ep.status
            except Exception as exc:  # noqa: BLE001 - any invalid Bundle: 400, recorded
                ep.invalid.append(f"{type(exc).__name__}: {exc}")
                code = 400
            body = json.dumps({"resourceType": "OperationOutcome", "issue": [{
                "severity": "error" if code >= 400 else "information",
                "code": "processing" if code >= 400 else "informational",
                "diagnostics": f"scenario answer {code}"}]}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ep.url = f"http://127.0.0.1:{server.server_address[1]}/fhir"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield ep
    finally:
        server.shutdown()
        server.server_close()


def by_type(bundle: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The Bundle's entries by resource type."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in bundle["entry"]:
        out.setdefault(e["resource"]["resourceType"], []).append(e)
    return out
