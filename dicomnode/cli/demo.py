"""``dicomnode demo``: the whole loop in a minute, with nothing else installed.

Without ``--to`` the demo starts, in a temporary folder, a node on a free port
(``dicomnode serve`` as a child process, SQLite, one worker) and a tiny
receiving PACS (a pynetdicom Storage SCP) as its destination; it sends the
bundled real sample (Colin27 T1, 2 mm, 91 axial MR slices: see
``dicomnode/demo_data``) to the node, waits for the brain-extraction result
(``deepbet-brain``) to arrive at the PACS and prints what was produced and
where. With ``--to AET@HOST:PORT`` it sends the sample to a node already
running; given that node's configuration (``dicomnode -c node.yaml demo --to
...``) it also follows the job in its database.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE = Path(__file__).resolve().parents[1] / "demo_data" / "colin27_t1_2mm.npz"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
DEMO_MODEL = "deepbet-brain"
_TARGET_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="send a bundled real MR series through a node and show the results",
        description="Start a node and a small PACS on free ports in a temporary folder "
        "(or use a running node with --to), send the bundled Colin27 T1 sample, wait for the "
        "SEG + SR and print what was produced and where.",
    )
    p.add_argument("--to", metavar="AET@HOST:PORT",
                   help="send to this running node instead of starting one")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the results (default 300)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep everything in this folder (default: a temporary one, removed)")
    p.add_argument("--write-only", type=Path, metavar="DIR", default=None,
                   help="only write the sample series as DICOM files into DIR and exit")
    p.set_defaults(func=_run)


# --------------------------------------------------------------------------- sample


def write_sample_series(out_dir: Path | str, *, study_uid: str | None = None,
                        series_uid: str | None = None, every: int = 1) -> list[Path]:
    """Write the bundled Colin27 T1 sample as an MR Image Storage series.

    Parameters
    ----------
    out_dir
        Folder for the files (created).
    study_uid, series_uid
        Fixed UIDs (default: new ones, so each demo is a new study).
    every
        Keep every n-th slice (spacing grows accordingly); 1 keeps all 91.

    Returns
    -------
    list of Path
        The files in slice order (Explicit VR Little Endian).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    with np.load(SAMPLE) as z:
        array = z["array"][::every]
        spacing = z["spacing"].astype(float) * np.array([every, 1.0, 1.0])
        origin = z["origin"].astype(float)
        orientation = [float(v) for v in z["orientation"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()
    now = dt.datetime.now()
    paths: list[Path] = []
    for k in range(array.shape[0]):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MR_IMAGE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "DEMO0001"
        ds.Modality = "MR"
        ds.Manufacturer = "dicomnode demo (Colin27, MNI)"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "dicomnode demo: brain MR"
        ds.SeriesDescription = "T1 MPRAGE (Colin27 sample)"
        ds.PatientName = "Demo^Colin27"
        ds.PatientID = "DICOMNODE-DEMO"
        ds.PatientBirthDate = ""
        ds.PatientSex = "M"
        ds.BodyPartExamined = "HEAD"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        pos = origin + normal * spacing[0] * k
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.SpacingBetweenSlices = float(spacing[0])
        ds.SliceLocation = round(float(np.dot(pos, normal)), 4)
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 18.0
        ds.EchoTime = 10.0
        ds.EchoTrainLength = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(array[k], dtype="<i2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(MR_IMAGE)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        p = out / f"MR{k + 1:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def send_files(paths: list[Path], host: str, port: int, called_aet: str,
               calling_aet: str = "DEMO") -> list[int | None]:
    """C-STORE ``paths`` on one association; the status of each (``None``: no answer)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(MR_IMAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        from dicomnode.errors import DispatchError

        raise DispatchError(f"cannot associate with {called_aet}@{host}:{port}")
    with contextlib.suppress(AttributeError, OSError):
        assoc.dul.socket.socket.setsockopt(  # type: ignore[union-attr]
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out: list[int | None] = []
    try:
        for p in paths:
            st = assoc.send_c_store(p)
            out.append(int(st.Status) if "Status" in st else None)
    finally:
        assoc.release()
    return out


# --------------------------------------------------------------------------- little PACS


@dataclass
class _Pacs:
    port: int
    aet: str
    folder: Path
    received: list[tuple[str, Path]]
    server: Any

    def stop(self) -> None:
        self.server.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_pacs(folder: Path, aet: str = "DEMOPACS") -> _Pacs:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    folder.mkdir(parents=True, exist_ok=True)
    received: list[tuple[str, Path]] = []
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        p = folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        with lock:
            received.append((str(ds.Modality), p))
        return 0x0000

    ae = AE(ae_title=aet)
    ae.supported_contexts = AllStoragePresentationContexts
    port = _free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return _Pacs(port, aet, folder, received, server)


# --------------------------------------------------------------------------- node


@contextlib.contextmanager
def _node(workdir: Path, pacs: _Pacs, log_level: str) -> Iterator[tuple[Any, int, Path]]:
    import yaml

    from dicomnode.config import load_settings
    from dicomnode.infer.registry import resolve_models_dir

    port = _free_port()
    cfg = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
        "storage": {"path": str(workdir / "storage"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{workdir / 'dicomnode.db'}"},
        "completion": {"series_quiet_seconds": 2, "check_interval_seconds": 0.2},
        "models": {"path": str(resolve_models_dir("models"))},
        "worker": {"processes": 1, "poll_seconds": 0.2, "lease_seconds": 120},
        "logging": {"level": log_level},
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
    from pynetdicom import AE

    from dicomnode.errors import DicomNodeError

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
    import pydicom

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
    from dicomnode.domain import DeliveryState, JobState
    from dicomnode.errors import DicomNodeError
    from dicomnode.store import Store

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


def _run(args: argparse.Namespace) -> int:
    from dicomnode.config import load_settings
    from dicomnode.errors import ConfigError

    if args.write_only is not None:
        paths = write_sample_series(args.write_only)
        print(f"wrote {len(paths)} MR instances to {args.write_only}")
        return 0
    if not SAMPLE.is_file():
        raise ConfigError(f"demo sample {SAMPLE} is missing from this installation")
    keep = args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dicomnode-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        paths = write_sample_series(workdir / "sample")
        import pydicom

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
        pacs = _start_pacs(workdir / "pacs")
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


def _print_result(job: Any, outputs: list[Any], dels: list[Any], pacs: _Pacs | None,
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
