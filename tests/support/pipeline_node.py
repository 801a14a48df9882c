"""The whole node (receivers + workers + dispatcher) as a real process, and PACS helpers.

``start_pipeline_node(workdir, orthanc=..., routes=...)`` writes a config in
``workdir``, runs ``python -m dicomnode --config node.yaml serve`` in its own
process group (so :meth:`PipelineNode.kill9` kills the node and its children
like a crashed container) and waits for C-ECHO. Orthanc is declared both as
a destination ``pacs`` and, on the Orthanc side, as modality ``dicomnode`` so
that a test can make the PACS send a study to the node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dicomnode.domain import DeliveryState, JobState
from tests.support.peers import ORTHANC_BIN, Orthanc, free_port, wait_for_port
from tests.support.receive_node import NodeProcess, echo, node_config

REPO = Path(__file__).resolve().parents[2]


@dataclass
class PipelineNode(NodeProcess):
    def kill9(self) -> None:
        """SIGKILL the node's whole process group (node, workers, dispatcher)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``dicomnode --config node.yaml ARGS`` against this node's database."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        res = subprocess.run([sys.executable, "-m", "dicomnode", "--config",
                              str(self.config_path), *args], capture_output=True, text=True,
                             cwd=self.workdir, env=env, timeout=120)
        if check and res.returncode != 0:
            raise AssertionError(f"dicomnode {' '.join(args)} -> {res.returncode}:\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def jobs(self) -> list[dict[str, Any]]:
        """Jobs as ``dicomnode jobs list --json`` prints them (read in-process: faster)."""
        from dicomnode.cli.jobs import job_dict
        from dicomnode.store import Store

        with Store.open(self.settings) as store:
            return [job_dict(j) for j in store.list_jobs(limit=1000)]

    def deliveries(self) -> list[dict[str, Any]]:
        """Deliveries as ``dicomnode deliveries list --json`` prints them."""
        from dicomnode.cli.jobs import delivery_dict
        from dicomnode.store import Store

        with Store.open(self.settings) as store:
            return [delivery_dict(d) for d in store.list_deliveries(limit=1000)]

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)


def pipeline_config(workdir: Path, port: int, *, orthanc: Orthanc | None = None,
                    routes: list[dict[str, Any]] | None = None,
                    **sections: dict[str, Any]) -> dict[str, Any]:
    cfg = node_config(workdir, port)
    cfg["completion"] = {"series_quiet_seconds": 2, "check_interval_seconds": 0.2}
    cfg["worker"] = {"processes": 1, "lease_seconds": 60, "poll_seconds": 0.2,
                     "backoff_base_seconds": 1, "backoff_max_seconds": 2}
    cfg["storage"]["fsync"] = False
    if orthanc is not None:
        cfg["destinations"] = [{"name": "pacs", "ae_title": orthanc.aet,
                                "host": "127.0.0.1", "port": orthanc.dicom_port}]
    cfg["routes"] = routes or []
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(name), dict):
            cfg[name].update(values)
        else:
            cfg[name] = values
    return cfg


def start_pipeline_node(workdir: Path, *, port: int | None = None, timeout: float = 90.0,
                        orthanc: Orthanc | None = None,
                        routes: list[dict[str, Any]] | None = None,
                        **sections: Any) -> PipelineNode:
    """Start ``dicomnode serve`` (with workers) on ``workdir``; wait for C-ECHO.

    Calling it again on the same ``workdir`` and ``port`` restarts the same
    node (same database and storage).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cfg = pipeline_config(workdir, port, orthanc=orthanc, routes=routes, **sections)
    cfg_path = workdir / "node.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log_path = workdir / "node.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    env["PYTHONPATH"] = str(REPO)
    logf = open(log_path, "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "--config", str(cfg_path), "serve"],
        stdout=logf, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True)
    node = PipelineNode(workdir, cfg_path, port, cfg["node"]["ae_title"], proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}:\n{node.log()[-3000:]}")
        if echo(port, node.ae_title, timeout=2) == 0x0000:
            if orthanc is not None:
                orthanc.add_modality("dicomnode", node.ae_title, port)
            return node
        time.sleep(0.1)
    node.kill9()
    raise TimeoutError(f"node did not answer C-ECHO in {timeout}s:\n{node.log()[-3000:]}")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.5, on_timeout: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{extra}")
        time.sleep(interval)


def orthanc_send_study(orthanc: Orthanc, study_uid: str, modality: str = "dicomnode",
                       resources: list[str] | None = None) -> None:
    """Make the PACS C-STORE a study (or given resources) to ``modality`` (synchronous)."""
    if resources is None:
        found = orthanc.post("/tools/lookup", study_uid.encode())
        resources = [f["ID"] for f in found if f["Type"] == "Study"]
        assert resources, f"study {study_uid} not in Orthanc"
    orthanc.post(f"/modalities/{modality}/store",
                 {"Resources": resources, "Synchronous": True})


def restart_orthanc(orthanc: Orthanc, timeout: float = 60.0) -> None:
    """Start Orthanc again with the same config, ports and storage."""
    wd = orthanc.workdir
    log = open(wd / "orthanc.log", "ab")  # noqa: SIM115 - owned by the process
    orthanc.process = subprocess.Popen([ORTHANC_BIN, str(wd / "orthanc.json")], stdout=log,
                                       stderr=subprocess.STDOUT, cwd=wd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            orthanc.get("/system")
            wait_for_port(orthanc.dicom_port, timeout=5)
            for name, (aet, host, port) in orthanc.modalities.items():
                orthanc.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("Orthanc did not restart")


def job_for(jobs: list[dict[str, Any]], series_uid: str, version: int = 1) -> dict[str, Any] | None:
    for j in jobs:
        if j["series_uid"] == series_uid and j["version"] == version:
            return j
    return None


def finished(job: dict[str, Any] | None) -> bool:
    return job is not None and job["state"] in (JobState.DONE.value, JobState.FAILED.value,
                                                JobState.SUPERSEDED.value)


def all_delivered(deliveries: list[dict[str, Any]], job_id: int) -> bool:
    mine = [d for d in deliveries if d["job_id"] == job_id]
    return bool(mine) and all(d["state"] == DeliveryState.DONE.value for d in mine)


__all__ = ["PipelineNode", "all_delivered", "finished", "job_for", "orthanc_send_study",
           "pipeline_config", "restart_orthanc", "start_pipeline_node", "wait_until"]
