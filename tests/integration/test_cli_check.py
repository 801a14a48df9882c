"""``dicomnode check`` against real peers: DCMTK storescp, a real MLLP listener and webhook
server, a real SQLite file; unreachable peers are free ports nothing listens on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support.dispatch_peers import storescp_running
from tests.support.notify_peers import mllp_server, webhook_server
from tests.support.peers import free_port

REPO = Path(__file__).resolve().parents[2]


def _config(tmp: Path, **sections: Any) -> Path:
    cfg: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "port": free_port()},
        "storage": {"path": str(tmp / "storage"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{tmp / 'dicomnode.db'}"},
        "worker": {"processes": 0},
        "http": {"port": free_port()},
    }
    cfg.update(sections)
    path = tmp / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "dicomnode", "check", "--config", str(cfg),
                           "--timeout", "3", *args], capture_output=True, text=True,
                          cwd=cfg.parent, env=env, timeout=120)


def _lines(out: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        if status in ("PASS", "WARN", "FAIL"):
            name, _, detail = rest.strip().partition("  ")
            rows[name.strip()] = (status, detail.strip())
    return rows


def test_one_reachable_one_unreachable_destination(tmp_path: Path) -> None:
    dead_port = free_port()
    with storescp_running(tmp_path / "scp", ae_title="PACS") as scp, \
            mllp_server() as (mllp_port, _), webhook_server() as hook:
        cfg = _config(tmp_path, destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": scp.port},
            {"name": "oldpacs", "ae_title": "OLDPACS", "host": "127.0.0.1", "port": dead_port},
        ], notifications=[
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": mllp_port},
            {"name": "dashboard", "kind": "webhook", "url": hook.url},
            {"name": "gone", "kind": "hl7", "host": "127.0.0.1", "port": free_port()},
        ])
        res = _check(cfg)
        assert res.returncode == 1, res
        rows = _lines(res.stdout)
        assert rows["destination pacs"][0] == "PASS", res.stdout
        assert "answered C-ECHO (0x0000)" in rows["destination pacs"][1]
        status, detail = rows["destination oldpacs"]
        assert status == "FAIL" and f"OLDPACS@127.0.0.1:{dead_port}" in detail, res.stdout
        assert rows["notification ris"][0] == "PASS"
        assert rows["notification dashboard"][0] == "PASS"
        assert rows["notification gone"][0] == "FAIL"
        # Nothing was sent to the notification targets: no fake result reached them.
        assert hook.bodies == []
        for name in ("config", "routes", "storage", "http"):
            assert rows[name][0] == "PASS", (name, res.stdout)
        # The database file did not exist: a warning, not a failure, and not created.
        assert rows["database"][0] == "WARN" and not (tmp_path / "dicomnode.db").exists()
        assert "Traceback" not in res.stderr and "ERROR" not in res.stderr, res.stderr
        assert res.stdout.rstrip().endswith("FAILED")

        # The same as JSON.
        js = json.loads(_check(cfg, "--json").stdout)
        assert js["ok"] is False and js["failed"] == 2
        by_name = {c["check"]: c for c in js["checks"]}
        assert by_name["destination pacs"]["status"] == "PASS"
        assert by_name["destination oldpacs"]["status"] == "FAIL"


def test_all_pass_exit_0_and_migrations_pending_then_current(tmp_path: Path) -> None:
    with storescp_running(tmp_path / "scp", ae_title="PACS") as scp:
        cfg = _config(tmp_path, destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": scp.port}])
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        env["PYTHONPATH"] = str(REPO)
        # An empty SQLite file: every migration is pending (a warning).
        (tmp_path / "dicomnode.db").touch()
        res = _check(cfg)
        assert res.returncode == 0, res
        assert "migrations pending (empty (no schema yet)" in _lines(res.stdout)["database"][1]
        subprocess.run([sys.executable, "-m", "dicomnode", "--config", str(cfg), "db",
                        "upgrade"], check=True, capture_output=True, cwd=tmp_path, env=env)
        res = _check(cfg)
        assert res.returncode == 0, res
        rows = _lines(res.stdout)
        assert all(status == "PASS" for status, _ in rows.values()), res.stdout
        assert ": answers, schema at " in rows["database"][1], res.stdout


def test_bad_config_storage_and_model_hash(tmp_path: Path) -> None:
    # A configuration error names the key; exit 1, no traceback.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"node": {"port": 70000}}))
    res = _check(bad)
    assert res.returncode == 1 and "node.port: 70000 is not a TCP port" in res.stdout, res
    assert "Traceback" not in res.stderr

    # Storage below the watermark; a model whose weights were changed.
    models = tmp_path / "models"
    src = REPO / "models" / "ct-tissue"
    (models / "ct-tissue").mkdir(parents=True)
    for p in src.iterdir():
        (models / "ct-tissue" / p.name).write_bytes(p.read_bytes())
    weights = next(p for p in (models / "ct-tissue").iterdir() if p.suffix == ".onnx")
    weights.write_bytes(weights.read_bytes() + b"\0")
    cfg = _config(tmp_path, storage={"path": str(tmp_path / "storage"),
                                     "min_free_mb": 10**9},
                  models={"path": str(models)})
    res = _check(cfg)
    assert res.returncode == 1, res
    rows = _lines(res.stdout)
    assert rows["storage"][0] == "FAIL" and "below storage.min_free_mb 1000000000" in \
        rows["storage"][1], res.stdout
    assert rows["model ct-tissue"][0] == "FAIL" and "SHA-256" in rows["model ct-tissue"][1]
