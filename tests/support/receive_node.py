"""Start the node as a real process on a free port, and small DICOM helpers for tests.

``start_node(tmp_path, ...)`` writes a YAML config into a temp folder, runs
``python -m dicomnode --config node.yaml serve --no-worker`` and waits until
the node answers C-ECHO. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicomnode.compat.pynetdicom import guard_reactor_race, set_store_send_chunked
from dicomnode.config import Settings, load_settings
from tests.support.peers import free_port

REPO = Path(__file__).resolve().parents[2]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"


@dataclass
class NodeProcess:
    workdir: Path
    config_path: Path
    port: int
    ae_title: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def settings(self) -> Settings:
        return load_settings(self.config_path, environ={})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return int(self.process.returncode)

    def kill9(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def node_config(workdir: Path, port: int, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
        "storage": {"path": str(workdir / "storage"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{workdir / 'dicomnode.db'}"},
        "completion": {"series_quiet_seconds": 30, "check_interval_seconds": 0.2},
        "worker": {"processes": 0},
        "logging": {"level": "INFO"},
        # Off unless a test is about it (then it gives http={"enabled": True, "port": ...}):
        # nodes started in parallel would otherwise all ask for port 8080.
        "http": {"enabled": False, "port": free_port()},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def start_node(workdir: Path, *, port: int | None = None, timeout: float = 60.0,
               extra_env: dict[str, str] | None = None, **sections: dict[str, Any]) -> NodeProcess:
    """Start ``dicomnode serve`` with a config in ``workdir``; wait for C-ECHO."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cfg = node_config(workdir, port, **sections)
    cfg_path = workdir / "node.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log_path = workdir / "node.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    env.update(extra_env or {})
    logf = open(log_path, "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "--config", str(cfg_path), "serve", "--no-worker"],
        stdout=logf, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    node = NodeProcess(workdir, cfg_path, port, cfg["node"]["ae_title"], proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}:\n{node.log()[-3000:]}")
        if echo(port, node.ae_title, timeout=2) == 0x0000:
            return node
        time.sleep(0.1)
    node.kill9()
    raise TimeoutError(f"node did not answer C-ECHO in {timeout}s:\n{node.log()[-3000:]}")


@contextlib.contextmanager
def node_running(workdir: Path, **kwargs: Any) -> Iterator[NodeProcess]:
    node = start_node(workdir, **kwargs)
    try:
        yield node
    finally:
        node.stop()


def _tcp_nodelay(assoc: Any) -> None:
    with contextlib.suppress(AttributeError, OSError):
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def echo(port: int, called_aet: str = "DICOMNODE", calling_aet: str = "TESTSCU",
         timeout: float = 10.0) -> int | None:
    """C-ECHO status, or ``None`` if no association could be made."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return None
    try:
        st = assoc.send_c_echo()
        return int(st.Status) if "Status" in st else None
    finally:
        assoc.release()


@dataclass
class AssocResult:
    established: bool
    rejected: bool
    result: int | None = None  # A-ASSOCIATE-RJ result (1 permanent, 2 transient)
    source: int | None = None
    reason: int | None = None


def try_associate(port: int, called_aet: str, calling_aet: str) -> AssocResult:
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    res = AssocResult(assoc.is_established, assoc.is_rejected)
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        p = assoc.acceptor.primitive
        res.result, res.source, res.reason = p.result, p.result_source, p.diagnostic
    if assoc.is_established:
        assoc.release()
    return res


def store_files(port: int, paths: Sequence[Path], *, called_aet: str = "DICOMNODE",
                calling_aet: str = "TESTSCU", stop_after: int | None = None,
                timeout: float = 30.0) -> list[tuple[Path, int | None]]:
    """C-STORE files as they are (no transcoding), one association; ``(path, status)``.

    The status is ``None`` when no response came (association lost).
    """
    from pydicom.filereader import read_file_meta_info

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    pairs: set[tuple[str, str]] = set()
    for p in paths:
        m = read_file_meta_info(p)
        pairs.add((str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)))
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return [(p, None) for p in paths]
    _tcp_nodelay(assoc)
    # pynetdicom's reactor can take a fast peer's C-STORE-RSP (see its docstring).
    guard_reactor_race(assoc)
    out: list[tuple[Path, int | None]] = []
    # Send the encoded dataset exactly as in the file (no decode/re-encode).
    chunked = set_store_send_chunked(True)
    try:
        for i, p in enumerate(paths):
            if stop_after is not None and i >= stop_after:
                break
            if not assoc.is_established:
                out.append((p, None))
                continue
            try:
                st = assoc.send_c_store(p)
                out.append((p, int(st.Status) if "Status" in st else None))
            except Exception:  # noqa: BLE001 - a lost association mid-send
                out.append((p, None))
    finally:
        set_store_send_chunked(chunked)
        if assoc.is_established:
            assoc.release()
    return out


def make_instance(path: Path, *, study_uid: str | None = None, series_uid: str | None = None,
                  sop_uid: str | None = None, sop_class: str = CT_IMAGE, instance_number: int = 1,
                  rows: int = 16, images_in_acquisition: int | None = None,
                  meta_sop_class: str | None = None, meta_sop_uid: str | None = None,
                  drop: Sequence[str] = (), raw_dataset: bytes | None = None) -> Path:
    """Write a small image instance (Explicit VR LE), optionally malformed on purpose.

    ``drop`` removes attributes after building; ``raw_dataset`` replaces the
    encoded dataset by arbitrary bytes; ``meta_*`` make the file meta (and so
    the C-STORE request) disagree with the dataset.
    """
    import numpy as np

    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "TEST1", "Test^Patient", "CT"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20260101", 1, instance_number
    if images_in_acquisition is not None:
        ds.ImagesInAcquisition = images_in_acquisition
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * rows, dtype=np.uint16) + instance_number).tobytes()
    for kw in drop:
        if kw in ds:
            delattr(ds, kw)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = meta_sop_class or sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = meta_sop_uid or str(ds.get("SOPInstanceUID",
                                                                          generate_uid()))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    with pydicom_config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    if raw_dataset is not None or meta_sop_class or meta_sop_uid:
        # pydicom's writer makes the file meta agree with the dataset; rebuild it
        # so that the C-STORE request disagrees on purpose.
        from dicomnode.codec.part10 import part10_header

        head = part10_header(meta_sop_class or sop_class,
                             meta_sop_uid or str(ds.get("SOPInstanceUID", "")),
                             ExplicitVRLittleEndian)
        path.write_bytes(head + (raw_dataset if raw_dataset is not None
                                 else dataset_bytes(path)))
    return path


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file (everything after the file meta group)."""
    data = Path(path).read_bytes()
    assert data[128:132] == b"DICM", f"{path}: no DICM prefix"
    pos = 132
    while pos < len(data):
        group = int.from_bytes(data[pos:pos + 2], "little")
        if group != 0x0002:
            return data[pos:]
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            length = int.from_bytes(data[pos + 8:pos + 12], "little")
            pos += 12 + length
        else:
            length = int.from_bytes(data[pos + 6:pos + 8], "little")
            pos += 8 + length
    return b""
