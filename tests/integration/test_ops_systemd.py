"""docker/systemd/dicomnode.service: the unit's own command lines, run for real.

The unit is parsed (configparser, as systemd's INI dialect allows), its
``ExecStartPre`` and ``ExecStart`` are taken verbatim with only the install
paths replaced (``/opt/dicomnode/bin`` -> this venv, ``/etc/dicomnode/node.yaml``
-> a temporary config, ``WorkingDirectory`` -> a temporary folder), and run as
subprocesses: the node must answer C-ECHO and ``/healthz``, then stop with exit
code 0 on SIGTERM (what systemd sends, ``KillMode=mixed``: to the main process)
within the unit's ``TimeoutStopSec``. ``systemd-analyze verify`` checks the unit
when the binary is installed (Debian package ``systemd``).
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.peers import free_port
from tests.support.receive_node import REPO, echo, node_config

UNIT = REPO / "docker" / "systemd" / "dicomnode.service"
INSTALLED_BIN = "/opt/dicomnode/bin"
INSTALLED_CONFIG = "/etc/dicomnode/node.yaml"
VENV_BIN = str(Path(sys.executable).parent)


def read_unit(path: Path = UNIT) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None,
                                     empty_lines_in_values=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


def seconds(value: str) -> float:
    """A systemd time span as this unit writes them: ``90s``, ``5s``, ``2min``."""
    value = value.strip()
    for suffix, factor in (("min", 60), ("ms", 0.001), ("s", 1)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def command(line: str, config: Path) -> list[str]:
    assert line[:1] not in "-@+!:", "the unit's commands carry no prefixes"
    argv = shlex.split(line.replace(INSTALLED_CONFIG, str(config)))
    assert argv[0].startswith(INSTALLED_BIN + "/"), argv[0]
    return [argv[0].replace(INSTALLED_BIN, VENV_BIN, 1), *argv[1:]]


def healthz(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",  # noqa: S310
                                    timeout=5) as resp:
            return int(resp.status)
    except (urllib.error.URLError, OSError):
        return None


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    env["PYTHONUNBUFFERED"] = "1"  # as the unit's Environment=
    return env


def test_unit_declares_user_restart_and_hardening() -> None:
    svc = read_unit()["Service"]
    assert svc["User"] == svc["Group"] == "dicomnode"
    assert svc["Restart"] == "on-failure" and seconds(svc["RestartSec"]) >= 1
    assert svc["KillSignal"] == "SIGTERM" and svc["KillMode"] == "mixed"
    # The node gives each service 10 s to stop (Node.stop): room for several.
    assert seconds(svc["TimeoutStopSec"]) >= 30
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert svc["ProtectHome"] == "yes" and svc["PrivateTmp"] == "yes"
    assert svc["CapabilityBoundingSet"] == "" and svc["AmbientCapabilities"] == ""
    # The one writable folder is the working directory (data, database, audit).
    assert svc["ReadWritePaths"] == svc["WorkingDirectory"] == "/var/lib/dicomnode"
    assert INSTALLED_CONFIG in svc["ExecStart"] and " serve " in f" {svc['ExecStart']} "
    assert read_unit()["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (Debian package systemd)")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this venv's.
    unit = tmp_path / "dicomnode.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BIN, VENV_BIN))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # Nothing at all to say about the unit (warnings included).
    assert "dicomnode.service" not in res.stderr, res.stderr
    # systemd's own exposure score (0 best, 10 worst): "OK" is below 4.
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for dicomnode\.service: ([0-9.]+)", sec.stdout)
    if m is None and "--offline" in sec.stderr:
        return  # systemd older than 250: no offline analysis
    assert m is not None, sec.stdout + sec.stderr
    assert float(m.group(1)) <= 2.0, sec.stdout


def test_exec_start_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    svc = read_unit()["Service"]
    workdir = tmp_path / "var-lib-dicomnode"  # stands for WorkingDirectory
    workdir.mkdir()
    port, http_port = free_port(), free_port()
    cfg = node_config(workdir, port, http={"enabled": True, "port": http_port},
                      worker={"processes": 1}, models={"path": str(REPO / "models")})
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(cfg))

    pre = subprocess.run(command(svc["ExecStartPre"], config), cwd=workdir, env=clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert pre.returncode == 0, pre.stdout + pre.stderr
    assert (workdir / "dicomnode.db").exists()  # the migrations ran before the node

    log_path = tmp_path / "journal.log"
    with open(log_path, "wb") as journal:
        proc = subprocess.Popen(command(svc["ExecStart"], config), cwd=workdir,
                                env=clean_env(), stdout=journal, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + seconds(svc["TimeoutStartSec"])
        while not (echo(port, "DICOMNODE", timeout=2) == 0x0000 and healthz(http_port) == 200):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "node not up:\n" + log_path.read_text()[-3000:]
            time.sleep(0.2)

        proc.send_signal(signal.SIGTERM)  # KillMode=mixed: the main process only
        try:
            rc = proc.wait(seconds(svc["TimeoutStopSec"]))
        except subprocess.TimeoutExpired:
            pytest.fail("node still running after TimeoutStopSec:\n"
                        + log_path.read_text()[-3000:])
        assert rc == 0, log_path.read_text()[-3000:]
        assert "node stopped" in log_path.read_text()
        # No child left running for systemd's final SIGKILL (exited children whose
        # parent is gone are zombies until PID 1 reaps them: not counted).
        ps = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(proc.pid)],
                            capture_output=True, text=True, timeout=30).stdout
        running = [line for line in ps.splitlines() if not line.split()[1].startswith("Z")]
        assert not running, ps
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_exec_start_pre_refuses_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    svc = read_unit()["Service"]
    cfg = node_config(tmp_path, free_port())
    cfg["node"]["port"] = "eleven"
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(command(svc["ExecStartPre"], config), cwd=tmp_path, env=clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "node.port" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "dicomnode.db").exists()
