"""``dicomnode models list|verify`` as a user runs them (subprocess, from another folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_list_from_anywhere_finds_shipped_models(tmp_path: Path) -> None:
    proc = _cli("models", "list", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert Path(data["models_dir"]) == REPO / "models"
    by_name = {m["name"]: m for m in data["models"]}
    assert by_name["deepbet-brain"]["family"] == "AI"
    assert by_name["ct-tissue"]["family"] == "rule-based"
    assert by_name["ct-tissue"]["labels"] == ["Body", "Bone", "Air inside body"]
    table = _cli("models", "list", cwd=tmp_path)
    assert "ct-tissue" in table.stdout and "rule-based" in table.stdout


def test_verify_passes_then_fails_on_tampered_weights(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "ct-tissue", models / "ct-tissue")
    ok = _cli("models", "verify", "--models-dir", str(models), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ct-tissue: weights sha256 ok" in ok.stdout
    assert "ct-tissue: sample run ok" in ok.stdout
    onnx_file = models / "ct-tissue" / "ct_tissue.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes().replace(b"ct_tissue", b"ct_tampr"))
    bad = _cli("models", "verify", "--models-dir", str(models), cwd=tmp_path)
    assert bad.returncode == 1
    assert "ct-tissue: FAILED" in bad.stdout and "refusing" in bad.stdout


def test_run_reports_a_bad_series_clearly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = _cli("models", "run", "ct-tissue", str(tmp_path / "empty"), "--out",
                str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "folder holds no files" in proc.stderr
    proc = _cli("models", "run", "no-such-model", str(tmp_path / "empty"), "--out",
                str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2 and "not found" in proc.stderr
