"""The HTTP side's rules, called as an ASGI application (no socket): loopback only unless
``http.public``, the token check for state-changing routes, readiness JSON, settings."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from dicomnode.config import HttpConfig, Settings, load_settings
from dicomnode.errors import ConfigError
from dicomnode.store import Store
from dicomnode.web import create_app, readiness
from dicomnode.web.app import is_loopback, require_token


class FakeNode:
    """The NodeView of a node whose SCP and services are given (its store is real)."""

    def __init__(self, settings: Settings, store: Store | None, *, listening: bool = True,
                 services: Sequence[tuple[str, bool]] = (("completeness-tracker", True),)):
        self.settings = settings
        self.store = store
        self.listening = listening
        self.services = list(services)

    def scp_listening(self) -> bool:
        return self.listening

    def service_states(self) -> Sequence[tuple[str, bool]]:
        return self.services


def _settings(tmp: Path, **http: Any) -> Settings:
    return load_settings(None, environ={}, overrides={
        "storage": {"path": str(tmp / "storage"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{tmp / 'db.sqlite'}"},
        "http": http,
    })


def _get(app: Any, path: str, client: str = "127.0.0.1",
         headers: Sequence[tuple[bytes, bytes]] = ()) -> tuple[int, dict[str, Any] | bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": list(headers),
             "client": (client, 50000), "server": ("127.0.0.1", 8080)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store.open(_settings(tmp_path), migrate=True) as s:
        yield s


def test_loopback_only_unless_public(tmp_path: Path, store: Store,
                                     caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(FakeNode(_settings(tmp_path), store))
    assert _get(app, "/readyz")[0] == 200
    assert _get(app, "/readyz", client="::1")[0] == 200
    with caplog.at_level(logging.WARNING, logger="dicomnode.web.app"):
        status, body = _get(app, "/metrics", client="10.1.2.3")
    assert status == 403 and "http.public" in body["error"]  # type: ignore[index]
    assert any("not on loopback" in r.getMessage()
               and getattr(r, "fields", {}).get("client") == "10.1.2.3"
               for r in caplog.records), caplog.records
    assert _get(app, "/readyz", client="10.1.2.3")[0] == 403
    # Liveness answers everyone (a load balancer's probe).
    assert _get(app, "/healthz", client="10.1.2.3") == (200, {"status": "alive"})
    public = create_app(FakeNode(_settings(tmp_path, public=True), store))
    assert _get(public, "/readyz", client="10.1.2.3")[0] == 200
    assert _get(app, "/nothing")[0] == 404


def test_readiness_names_each_check(tmp_path: Path, store: Store) -> None:
    node = FakeNode(_settings(tmp_path), store, listening=False,
                    services=[("completeness-tracker", True), ("dispatcher", False)])
    status, body = _get(create_app(node), "/readyz")
    assert status == 503
    checks = body["checks"]  # type: ignore[index]
    assert set(checks) == {"database", "storage", "scp", "services", "models"}
    assert checks["database"]["ok"] and checks["storage"]["ok"]
    assert not checks["scp"]["ok"] and "not listening" in checks["scp"]["detail"]
    assert checks["services"] == {"ok": False, "detail": "not running: dispatcher"}
    # Storage below the watermark; the database file moved away.
    low = dataclasses.replace(node.settings, storage=dataclasses.replace(
        node.settings.storage, min_free_mb=10**9))
    node2 = FakeNode(low, store)
    r = readiness(node2)
    assert not r.ok and "below storage.min_free_mb" in r.as_dict()["checks"]["storage"]["detail"]
    (tmp_path / "db.sqlite").rename(tmp_path / "away.sqlite")
    r = readiness(FakeNode(node.settings, store))
    assert r.as_dict()["checks"]["database"] == {
        "ok": False, "detail": f"database file {tmp_path / 'db.sqlite'} is missing"}
    (tmp_path / "away.sqlite").rename(tmp_path / "db.sqlite")
    assert readiness(FakeNode(node.settings, store)).ok


def test_metrics_served_without_multiprocess_dir(tmp_path: Path, store: Store) -> None:
    status, body = _get(create_app(FakeNode(_settings(tmp_path), store)), "/metrics")
    assert status == 200 and isinstance(body, bytes)
    assert b"dicomnode_database_up 1.0" in body and b"dicomnode_disk_free_bytes" in body


def _request(headers: Sequence[tuple[bytes, bytes]] = ()) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/x", "headers": list(headers),
                    "client": ("127.0.0.1", 1), "query_string": b""})


def test_token_for_state_changing_routes() -> None:
    refused = require_token(_request(), "")
    assert refused is not None and refused.status_code == 403
    refused = require_token(_request(), "s3cret")
    assert refused is not None and refused.status_code == 401
    refused = require_token(_request([(b"authorization", b"Bearer wrong")]), "s3cret")
    assert refused is not None and refused.status_code == 401
    assert require_token(_request([(b"authorization", b"Bearer s3cret")]), "s3cret") is None


def test_http_settings(tmp_path: Path) -> None:
    s = load_settings(None, environ={"DICOMNODE_HTTP__TOKEN": "from-env"})
    assert s.http == HttpConfig(token="from-env")
    assert (s.http.enabled, s.http.host, s.http.port, s.http.public) == (
        True, "127.0.0.1", 8080, False)
    with pytest.raises(ConfigError, match=r"http.port: 0 is not a TCP port"):
        load_settings(None, environ={}, overrides={"http": {"port": 0}})
    with pytest.raises(ConfigError, match=r"http.enabled: expected true/false"):
        load_settings(None, environ={"DICOMNODE_HTTP__ENABLED": "maybe"})


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.1") and is_loopback("::1")
    assert not is_loopback("10.0.0.1") and not is_loopback(None) and not is_loopback("x")

