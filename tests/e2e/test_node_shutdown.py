"""Stopping a real `dicomnode serve` the way systemd, `timeout` and Ctrl-C do: SIGTERM to
the node and to its whole process group at once, then a burst more. The node must stop within a
bounded time with exit code 0, restart none of its children meanwhile, and leave no
process behind. (A signal handler taking a threading.Event's lock used to deadlock the
node when two signals came together.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from tests.support.peers import free_port
from tests.support.receive_node import echo


def _start(tmp: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
    port = free_port()
    cfg = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
        "storage": {"path": str(tmp / "storage"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{tmp / 'dicomnode.db'}"},
        "worker": {"processes": 1},
        "http": {"enabled": False},
    }
    (tmp / "node.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp / "node.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config",
                             str(tmp / "node.yaml")], stdout=open(log, "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, cwd=tmp, env=env,
                            start_new_session=True)  # its own process group, as under systemd
    deadline = time.monotonic() + 90
    while echo(port, "DICOMNODE", timeout=2) != 0x0000:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "node did not answer C-ECHO"
        time.sleep(0.2)
    return proc, log, port


def test_sigterm_to_the_process_group_and_a_burst_stops_cleanly(tmp_path: Path) -> None:
    proc, log, _port = _start(tmp_path)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the worker and dispatcher processes"
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # the group: node, worker, dispatcher at once
    for _ in range(50):  # and the node again and again, as impatient supervisors do
        os.kill(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the node hung on SIGTERM:\n" + log.read_text()[-3000:]) from None
    took = time.monotonic() - t0
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "node stopped" in text
    assert "restarting" not in text, text[-3000:]
    assert took < 30, f"stopping took {took:.1f} s"
    time.sleep(0.5)
    left = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"child processes left behind: {left}"
