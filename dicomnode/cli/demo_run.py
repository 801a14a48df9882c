"""What ``dicomnode demo`` runs: a node and a little PACS, the sample sent, the job
followed to its results (see :mod:`dicomnode.cli.demo` for the command)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pynetdicom import AE

from dicomnode.cli.demo_pacs import DemoPacs, free_port, start_pacs
from dicomnode.cli.demo_sample import write_sample_series
from dicomnode.config import DestinationConfig, load_settings
from dicomnode.dispatch.scu import AssociationFailed, store_files
from dicomnode.domain import DeliveryState, JobState
from dicomnode.errors import ConfigError, DicomNodeError, DispatchError
from dicomnode.infer.registry import resolve_models_dir
from dicomnode.store import Store

DEMO_MODEL = "deepbet-brain"
_TARGET_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


def send_files(paths: list[Path], host: str, port: int, called_aet: str,
               calling_aet: str = "DEMO") -> list[int | None]:
    """C-STORE ``paths`` with the node's SCU (:func:`dicomnode.dispatch.scu.store_files`);
    the status of each (``None``: no answer)."""
    dest = DestinationConfig(name="demo", ae_title=called_aet, host=host, port=port)
    try:
        result = store_files(dest, paths, calling_ae_title=calling_aet)
    except AssociationFailed as exc:
        raise DispatchError(f"cannot associate with {called_aet}@{host}:{port}: {exc}") from None
    return [o.status for o in result.outcomes]


# --------------------------------------------------------------------------- node


@contextlib.contextmanager
def _node(workdir: Path, pacs: DemoPacs, log_level: str) -> Iterator[tuple[Any, int, Path]]:
    port = free_port()
    cfg = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
        "storage": {"path": str(workdir / "storage"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{workdir / 'dicomnode.db'}"},
        "completion": {"series_quiet_seconds": 2, "check_interval_seconds": 0.2},
        "models": {"path": str(resolve_models_dir("models"))},
        "worker": {"processes": 1, "poll_seconds": 0.2, "lease_seconds": 120},
        "logging": {"level": log_level},
        "http": {"port": free_port()},  # not 8080: a real node may be running beside it
        "destinations": [{"name": "demo-pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                          "port": pacs.port, "formats": ["seg", "sr"]}],
        "routes": [{"name": "brain-t1", "when": {"Modality": "MR",
                                                 "SeriesDescription": {"regex": "(?i)t1"}},
                    "models": [DEMO_MODEL], "send": ["demo-pacs"]}],
    }
    cfg_path = workdir / "node.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    settings = load_settings(cfg_path, environ={})
    log_path = workdir / "node.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "--config", str(cfg_path),
                                 "serve"], stdout=logf, stderr=subprocess.STDOUT, cwd=workdir,
                                env=env, start_new_session=True)
    try:
        _wait_echo(proc, port, log_path)
        yield settings, port, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _wait_echo(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DicomNodeError(f"the demo node exited with {proc.returncode}; its log:\n"
                                 + log_path.read_text(errors="replace")[-3000:])
        ae = AE(ae_title="DEMO")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.3)
    raise DicomNodeError("the demo node did not answer C-ECHO within 120 s")


# --------------------------------------------------------------------------- reporting


def sr_numbers(path: Path) -> list[str]:
    """``name = value unit`` for every numeric item of an SR (recursively)."""
    out: list[str] = []

    def walk(items: Any) -> None:
        for it in items or []:
            if str(it.get("ValueType", "")) == "NUM" and "MeasuredValueSequence" in it:
                mv = it.MeasuredValueSequence[0]
                name = it.ConceptNameCodeSequence[0].CodeMeaning
                unit = mv.MeasurementUnitsCodeSequence[0].CodeValue
                out.append(f"{name} = {float(mv.NumericValue):.1f} {unit}")
            walk(it.get("ContentSequence"))

    walk(pydicom.dcmread(path).get("ContentSequence"))
    return out


def _wait_job(settings: Any, series_uid: str, timeout: float,
              expect_deliveries: bool) -> tuple[Any, list[Any], list[Any]]:
    deadline = time.monotonic() + timeout
    last = ""
    with Store.open(settings) as store:
        while time.monotonic() < deadline:
            jobs = store.list_jobs(series_uid=series_uid, limit=5)
            job = jobs[0] if jobs else None
            state = f"job {job.id} {job.state.value}" if job else "waiting for the series"
            if state != last:
                print(f"  ... {state}", flush=True)
                last = state
            if job is not None and job.state in (JobState.FAILED, JobState.CANCELLED):
                raise DicomNodeError(f"job {job.id} {job.state.value}: {job.last_error}")
            if job is not None and job.state is JobState.DONE:
                dels = store.list_deliveries(job_id=job.id, limit=1000)
                pending = [d for d in dels if d.state is not DeliveryState.DONE]
                if not expect_deliveries or (dels and not pending):
                    return job, store.job_outputs(job.id), dels
                failed = [d for d in dels if d.state is DeliveryState.FAILED]
                if failed:
                    raise DicomNodeError(f"delivery failed: {failed[0].last_error}")
            time.sleep(0.5)
    raise DicomNodeError(f"no result within {timeout:.0f} s ({last})")


def run(args: argparse.Namespace) -> int:
    """``dicomnode demo`` (without ``--write-only``): see :mod:`dicomnode.cli.demo`."""
    keep = args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dicomnode-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        paths = write_sample_series(workdir / "sample")
        series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        print(f"sample: Colin27 T1, {len(paths)} MR slices (2 mm), study {study_uid}")
        if args.to:
            m = _TARGET_RE.match(args.to)
            if not m:
                raise ConfigError(f"--to: {args.to!r} is not AET@HOST:PORT")
            t0 = time.monotonic()
            st = send_files(paths, m["host"], int(m["port"]), m["aet"])
            bad = [s for s in st if s != 0]
            print(f"sent {len(paths)} instances to {args.to} in {time.monotonic() - t0:.1f} s"
                  + (f" ({len(bad)} not accepted: {sorted({hex(s or 0) for s in bad})})"
                     if bad else ""))
            if not getattr(args, "config", None):
                print("give that node's configuration (dicomnode -c node.yaml demo --to ...) "
                      "to follow the job; results go where its routes send them")
                return 0 if not bad else 1
            settings = load_settings(args.config)
            job, outputs, dels = _wait_job(settings, series_uid, args.timeout, False)
            _print_result(job, outputs, dels, None, time.monotonic() - t0)
            return 0
        pacs = start_pacs(workdir / "pacs")
        try:
            level = getattr(args, "log_level", None) or "WARNING"
            with _node(workdir, pacs, level) as (settings, port, log_path):
                print(f"node:   DICOMNODE@127.0.0.1:{port}  (storage {settings.storage.path}, "
                      f"log {log_path})")
                print(f"pacs:   {pacs.aet}@127.0.0.1:{pacs.port}  (files in {pacs.folder})")
                t0 = time.monotonic()
                st = send_files(paths, "127.0.0.1", port, "DICOMNODE")
                if any(s != 0 for s in st):
                    raise ConfigError(f"the node refused the sample: statuses {set(st)}")
                print(f"sent {len(paths)} instances; waiting for {DEMO_MODEL} "
                      "(the series completes after 2 s of quiet)")
                job, outputs, dels = _wait_job(settings, series_uid, args.timeout, True)
                _print_result(job, outputs, dels, pacs, time.monotonic() - t0)
        finally:
            pacs.stop()
        return 0
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept: {workdir}")


def _print_result(job: Any, outputs: list[Any], dels: list[Any], pacs: DemoPacs | None,
                  seconds: float) -> None:
    print(f"\njob {job.id}: {job.state.value} in {seconds:.1f} s after the last instance was "
          f"sent (attempt {job.attempts})")
    for o in outputs:
        print(f"  produced {o.kind.upper():<3} {o.sop_instance_uid}\n           {o.path}")
        if o.kind == "sr":
            for line in sr_numbers(o.path):
                print(f"           {line}")
    for d in sorted(dels, key=lambda x: x.id):
        status = "" if d.peer_status is None else f" (status 0x{d.peer_status:04X})"
        print(f"  delivered {d.sop_instance_uid} -> {d.destination}: {d.state.value}{status}")
    if pacs is not None:
        for modality, p in pacs.received:
            print(f"  the PACS holds {modality}: {p}")
