"""``dicomnode demo`` as a new user runs it: nothing but the package, one command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom

from dicomnode.cli.demo_sample import SAMPLE
from tests.support.peers import dciodvfy

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    return subprocess.run([sys.executable, "-m", "dicomnode", "demo", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_sample_is_small_and_a_valid_series(tmp_path: Path) -> None:
    assert SAMPLE.stat().st_size < 5 * 1024 * 1024
    res = _run("--write-only", str(tmp_path / "s"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    files = sorted((tmp_path / "s").glob("*.dcm"))
    assert len(files) == 90 and "wrote 90 MR instances" in res.stdout
    ds = pydicom.dcmread(files[45])
    assert ds.Modality == "MR" and ds.SeriesDescription.startswith("T1")
    assert ds.pixel_array.shape == (108, 90) and ds.pixel_array.max() > 0
    check = dciodvfy(files[45])
    assert not check.errors, check.output


def test_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    # From an unrelated folder: nothing but the installed package is needed.
    res = _run("--workdir", str(tmp_path / "demo"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert re.search(r"job \d+: done in [\d.]+ s", out), out
    assert "produced SEG" in out and "produced SR" in out
    assert out.count("-> demo-pacs: done (status 0x0000)") == 2, out
    m = re.search(r"Volume = ([\d.]+) ml", out)
    assert m and 1000 < float(m.group(1)) < 2500, out  # an adult brain
    held = sorted((tmp_path / "demo" / "pacs").glob("*.dcm"))
    assert [p.name.split("_")[0] for p in held] == ["SEG", "SR"]
    for p in held:
        check = dciodvfy(p)
        assert not check.errors, check.output
