"""Real peers for tests and benchmarks: free ports, Orthanc, DCMTK, dciodvfy.

Everything listens on / connects to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC_BIN = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class Orthanc:
    """A running Orthanc (Debian package) used as the PACS."""

    workdir: Path
    dicom_port: int
    http_port: int
    aet: str
    process: subprocess.Popen[bytes] | None = None
    modalities: dict[str, list[Any]] = field(default_factory=dict)
    user: tuple[str, str] | None = None  # (name, password) when authentication is on

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.user is not None:
            token = base64.b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
            raw = resp.read()
        ctype = resp.headers.get("Content-Type", "")
        return json.loads(raw) if raw and "json" in ctype else raw

    def get(self, path: str) -> Any:
        return self.rest("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.rest("POST", path, body if body is not None else b"")

    def put(self, path: str, body: Any) -> Any:
        return self.rest("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.rest("DELETE", path)

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        """Declare a DICOM peer Orthanc can send to (REST, no restart needed)."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})
        self.modalities[name] = [aet, host, port]

    def upload(self, path: Path) -> Any:
        return self.post("/instances", Path(path).read_bytes())

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_orthanc(
    workdir: Path | None = None,
    aet: str = "ORTHANC",
    modalities: dict[str, tuple[str, str, int]] | None = None,
    extra: dict[str, Any] | None = None,
    timeout: float = 60.0,
    dicomweb: bool = False,
    user: tuple[str, str] | None = None,
) -> Orthanc:
    """Start Orthanc on free ports with a JSON config in ``workdir``.

    Storage and index live under ``workdir``; only loopback is used; no plugins, unless
    ``dicomweb``: Debian's orthanc-dicomweb plugin (DICOMweb root ``<url>/dicom-web``).
    ``user``: HTTP basic authentication on, with this one (name, password).
    """
    if not Path(ORTHANC_BIN).exists():
        raise RuntimeError(f"{ORTHANC_BIN} not found: apt-get install orthanc")
    wd = Path(workdir or tempfile.mkdtemp(prefix="orthanc-"))
    wd.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    cfg: dict[str, Any] = {
        "Name": "dicomnode-test-pacs",
        "StorageDirectory": str(wd / "storage"),
        "IndexDirectory": str(wd / "index"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": True,
        "DicomModalitiesInDatabase": False,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "StorageCompression": False,
        "HttpThreadsCount": 8,
        "DicomThreadsCount": 8,
        "StableAge": 2,
        "HttpTimeout": 120,
        "DicomScuTimeout": 30,
        "SaveJobs": False,
    }
    if dicomweb:
        if not Path(ORTHANC_DICOMWEB_PLUGIN).exists():
            raise RuntimeError(f"{ORTHANC_DICOMWEB_PLUGIN} not found: "
                               "apt-get install orthanc-dicomweb")
        cfg["Plugins"] = [ORTHANC_DICOMWEB_PLUGIN]
        cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    if user is not None:
        cfg["AuthenticationEnabled"] = True
        cfg["RegisteredUsers"] = {user[0]: user[1]}
    if extra:
        cfg.update(extra)
    (wd / "orthanc.json").write_text(json.dumps(cfg, indent=2))
    log = open(wd / "orthanc.log", "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [ORTHANC_BIN, str(wd / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
        cwd=wd,
    )
    orthanc = Orthanc(wd, dicom_port, http_port, aet, proc,
                      {k: list(v) for k, v in (modalities or {}).items()}, user)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(wd / 'orthanc.log').read_text()[-2000:]}")
        try:
            orthanc.get("/system")
            wait_for_port(dicom_port, timeout=5)
            return orthanc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    orthanc.stop()
    raise TimeoutError("Orthanc did not start")


def self_signed_pem(folder: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 and its key in one PEM file (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    key, crt, pem = folder / "key.pem", folder / "crt.pem", folder / "server.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    pem.write_bytes(crt.read_bytes() + key.read_bytes())
    return pem


@contextlib.contextmanager
def tls_proxy(target_port: int, pem: Path) -> Iterator[int]:
    """HTTPS on a free port of 127.0.0.1, forwarded to plain ``target_port`` (socat's TLS
    with ``pem``): Debian's Orthanc 1.10 crashes on its own HTTPS, so TLS tests put
    this in front of it. Yields the TLS port."""
    if shutil.which("socat") is None:
        raise RuntimeError("socat not found: apt-get install socat")
    port = free_port()
    proc = subprocess.Popen(
        ["socat", f"openssl-listen:{port},bind=127.0.0.1,reuseaddr,fork,cert={pem},verify=0",
         f"tcp:127.0.0.1:{target_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=10)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def orthanc_running(**kwargs: Any) -> Iterator[Orthanc]:
    o = start_orthanc(**kwargs)
    try:
        yield o
    finally:
        o.stop()


@dataclass(frozen=True)
class DciodvfyResult:
    path: Path
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str


def dciodvfy(path: Path | str) -> DciodvfyResult:
    """Run dicom3tools' ``dciodvfy`` and split its output into errors and warnings."""
    exe = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    errors = tuple(line for line in out.splitlines() if line.startswith("Error"))
    warnings = tuple(line for line in out.splitlines() if line.startswith("Warning"))
    return DciodvfyResult(Path(path), errors, warnings, out)


def dcentvfy(*paths: Path | str) -> DciodvfyResult:
    """Run dicom3tools' ``dcentvfy`` (entity consistency across files: same patient,
    study, series attributes wherever they repeat) and split errors / warnings."""
    exe = shutil.which("dcentvfy") or "/usr/bin/dcentvfy"
    proc = subprocess.run([exe, *map(str, paths)], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    errors = tuple(line for line in out.splitlines() if line.lstrip().startswith("Error"))
    warnings = tuple(line for line in out.splitlines() if line.lstrip().startswith("Warning"))
    return DciodvfyResult(Path(paths[0]) if paths else Path("."), errors, warnings, out)


def dcmtk(
    tool: str, *args: str, timeout: float = 300.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool from /usr/bin with TCP_NODELAY=1."""
    return subprocess.run([f"/usr/bin/{tool}", *args], capture_output=True, text=True,
                          timeout=timeout, env=DCMTK_ENV, check=check)
