"""``dicomnode routes check|explain`` end to end through the CLI entry point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from dicomnode.cli import main
from dicomnode.config import load_settings
from dicomnode.store import Store
from tests.support.pipeline_env import ingest_series
from tests.support.series import write_series

CONFIG = {
    "destinations": [
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242},
        {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4243},
    ],
    "routes": [
        {"name": "mr-brain-t1",
         "when": {"Modality": "MR", "SeriesDescription": {"regex": "(?i)t1"}},
         "models": ["deepbet-brain"], "send": ["pacs"]},
        {"name": "ct", "when": {"Modality": "CT", "calling_aet": "ORTHANC"},
         "models": ["ct-tissue"], "send": [{"to": "pacs", "formats": ["seg"]}]},
        {"name": "everything", "default": True, "forward": ["archive"]},
    ],
}
MODELS = ["--model", "deepbet-brain", "--model", "ct-tissue"]


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    p = tmp_path / "node.yaml"
    p.write_text(yaml.safe_dump({**CONFIG, "models": {"path": str(tmp_path / "no-models")}}))
    return p


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("series")
    arr = np.zeros((3, 8, 8), np.float32)
    write_series(np.zeros((24, 8, 8), np.float32), d / "mr", modality="MR",
                 series_description="Sag T1 MPRAGE")
    write_series(arr, d / "ct", modality="CT", series_number=2)
    (d / "notes.txt").write_text("not DICOM")
    return d


def test_check_lists_rules(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(config), "routes", "check", *MODELS]) == 0
    out = capsys.readouterr().out
    assert "routes[1] (ct)" in out and "send seg to pacs" in out
    assert "Modality == 'CT' AND calling_aet == 'ORTHANC'" in out


def test_check_reports_unknown_model(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(config), "routes", "check"]) == 2
    err = capsys.readouterr().err
    assert "routes[0] (mr-brain-t1): models[0]: unknown model 'deepbet-brain'" in err


def test_explain_series_folder(config: Path, series_dir: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["-c", str(config), "routes", "explain", str(series_dir), "--calling-aet", "CT1",
               *MODELS])
    assert rc == 0
    out = capsys.readouterr().out
    blocks = out.split(str(series_dir))[1:]
    assert len(blocks) == 2  # one per series, the junk file ignored
    mr = next(b for b in blocks if "modality MR" in b)
    ct = next(b for b in blocks if "modality CT" in b)
    assert "MATCH routes[0] (mr-brain-t1)" in mr and "-> models deepbet-brain" in mr
    assert "no    routes[1] (ct)" in ct
    assert "calling_aet is 'CT1', required calling_aet == 'ORTHANC'" in ct
    assert "MATCH routes[2] (everything)" in ct and "forward originals to archive" in ct


def test_explain_file_with_aets(config: Path, series_dir: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    f = sorted((series_dir / "ct").iterdir())[0]
    assert main(["-c", str(config), "routes", "explain", str(f), "--calling-aet", "ORTHANC",
                 *MODELS]) == 0
    out = capsys.readouterr().out
    assert "MATCH routes[1] (ct)" in out and "called_aet 'DICOMNODE'" in out


def test_explain_bad_path(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["-c", str(config), "routes", "explain", str(tmp_path / "empty"), *MODELS]) == 2
    assert "no readable DICOM file" in capsys.readouterr().err
    assert main(["-c", str(config), "routes", "explain", str(tmp_path / "nope"), *MODELS]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_explain_stored_series_uses_recorded_aets(tmp_path: Path, series_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        **CONFIG, "models": {"path": str(tmp_path / "no-models")},
        "storage": {"path": str(tmp_path / "storage"), "min_free_mb": 0, "fsync": False},
        "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
    }))
    settings = load_settings(cfg, environ={})
    store = Store.open(settings, migrate=True)
    try:
        ct = sorted((series_dir / "ct").iterdir())
        ingest_series(store, ct, calling_aet="ORTHANC", called_aet="AI_NODE")
    finally:
        store.close()
    uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
    capsys.readouterr()
    assert main(["-c", str(cfg), "routes", "explain", uid, *MODELS]) == 0
    out = capsys.readouterr().out
    assert "calling_aet 'ORTHANC' called_aet 'AI_NODE'" in out
    assert "MATCH routes[1] (ct)" in out
    # Flags override what was recorded.
    assert main(["-c", str(cfg), "routes", "explain", uid, "--calling-aet", "CT1", *MODELS]) == 0
    assert "MATCH routes[2] (everything)" in capsys.readouterr().out
    assert main(["-c", str(cfg), "routes", "explain", "1.2.3.999", *MODELS]) == 2
    assert "not in the store" in capsys.readouterr().err


def test_no_rules_names_the_models_that_apply(tmp_path: Path, series_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"destinations": CONFIG["destinations"]}))  # shipped models
    assert main(["-c", str(cfg), "routes", "explain", str(series_dir)]) == 0
    out = capsys.readouterr().out
    mr = next(b for b in out.split(str(series_dir))[1:] if "modality MR" in b)
    ct = next(b for b in out.split(str(series_dir))[1:] if "modality CT" in b)
    assert "no routing rules configured" in mr and "-> deepbet-brain" in mr
    assert "model deepbet-brain: runs (24 frame(s))" in mr
    assert "model ct-tissue: refused by hard constraint applies_to.modalities" in mr
    assert "-> ct-tissue" in ct
    assert "model deepbet-brain: refused by hard constraint applies_to.modalities" in ct
    assert main(["-c", str(cfg), "routes", "check"]) == 0
    assert "ct-tissue, deepbet-brain" in capsys.readouterr().out


def test_explain_names_the_constraint_that_refuses_a_routed_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A route names deepbet-brain: the description hint does not matter, the hard
    # constraints (modality, slices) do.
    d = tmp_path / "s"
    write_series(np.zeros((24, 8, 8), np.float32), d / "geom", modality="MR",
                 series_description="GEOM a_axial_inf2sup")
    write_series(np.zeros((5, 8, 8), np.float32), d / "short", modality="MR",
                 series_description="t1 short")
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"routes": [
        {"name": "brain", "when": {"Modality": "MR"}, "models": ["deepbet-brain"]}]}))
    assert main(["-c", str(cfg), "routes", "explain", str(d)]) == 0
    out = capsys.readouterr().out
    geom = next(b for b in out.split(str(d))[1:] if "GEOM" in b)
    short = next(b for b in out.split(str(d))[1:] if "t1 short" in b)
    assert "model deepbet-brain: runs (24 frame(s))" in geom
    assert ("model deepbet-brain: refused by hard constraint applies_to.min_slices: "
            "5 slice(s), the model needs at least 20") in short
