"""``dicomnode models run`` writes the DICOM result objects next to NIfTI and JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom

from tests.support.encode_data import phantom
from tests.support.peers import dciodvfy
from tests.support.series import write_series

ROOT = Path(__file__).resolve().parents[2]


def test_models_run_writes_seg_sr_and_sc(tmp_path: Path) -> None:
    series = tmp_path / "ct"
    paths = write_series(phantom((8, 48, 56), "CT"), series, spacing=(2.0, 0.9, 0.9),
                         body_part="HEAD")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dicomnode", "models", "run", "ct-tissue", str(series),
         "--out", str(out), "--formats", "seg,sr,sc"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "seg.dcm").is_file() and (out / "sr.dcm").is_file()
    scs = sorted(out.glob("sc-*.dcm"))
    assert scs, proc.stdout
    for p in [out / "seg.dcm", out / "sr.dcm", *scs]:
        assert str(p) in proc.stdout
        assert dciodvfy(p).errors == (), p
    seg = hd.seg.segread(out / "seg.dcm")
    src = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.SeriesDescription.startswith("Rule-based ")
    assert "(ct-tissue " in seg.SeriesDescription
    # --formats none: NIfTI and JSON only.
    out2 = tmp_path / "out2"
    proc = subprocess.run(
        [sys.executable, "-m", "dicomnode", "models", "run", "ct-tissue", str(series),
         "--out", str(out2), "--formats", "none"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not list(out2.glob("*.dcm")) and (out2 / "measurements.json").is_file()


def test_models_run_rejects_unknown_format(tmp_path: Path) -> None:
    series = tmp_path / "ct"
    write_series(phantom((6, 32, 32), "CT"), series)
    proc = subprocess.run(
        [sys.executable, "-m", "dicomnode", "models", "run", "ct-tissue", str(series),
         "--out", str(tmp_path / "o"), "--formats", "seg,pdf"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "unknown result format(s) ['pdf']" in proc.stderr + proc.stdout
