"""Build and run the dicomnode image with podman (settings that work on this kind of machine).

``podman --runtime runc --cgroup-manager=cgroupfs`` with ``CONTAINERS_CONF``
pointing at a containers.conf holding ``default_ulimits = []``; containers run
with ``--network host`` and listen on 127.0.0.1 ports picked by the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.peers import free_port

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "docker" / "build.sh"
CACHE = Path(os.environ.get("DICOMNODE_PODMAN_CACHE", "/var/cache/dicomnode-podman"))
IMAGE = os.environ.get("DICOMNODE_TEST_IMAGE", "localhost/dicomnode:test")
IMAGE_UID = 10001  # the Dockerfile's non-root user


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env:
        conf = CACHE / "containers.conf"
        CACHE.mkdir(parents=True, exist_ok=True)
        if not conf.exists():
            conf.write_text("[containers]\ndefault_ulimits = []\n")
        env["CONTAINERS_CONF"] = str(conf)
    return env


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs", *args],
        capture_output=True, text=True, timeout=timeout, env=podman_env(), check=check,
    )


def podman_available() -> str | None:
    """``None`` when podman can be used, else the reason it cannot."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc)"
    if shutil.which("runc") is None:
        return "runc is not installed (apt-get install runc)"
    if os.geteuid() != 0:
        # The test hands the data folder to the image's uid and caches the base
        # under /var/cache: both need root (rootless podman is not set up here).
        return "the container test runs as root"
    return None


def build_image(image: str = IMAGE, timeout: float = 1800) -> float:
    """Run docker/build.sh; returns the seconds it took. Raises with its log on failure."""
    t0 = time.monotonic()
    proc = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout,
                          env={**podman_env(), "IMAGE": image}, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"docker/build.sh failed ({proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return time.monotonic() - t0


def c_echo(port: int, called_aet: str = "DICOMNODE", calling_aet: str = "TESTSCU") -> int | None:
    """C-ECHO status (0 = success) or ``None`` when no association was made."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


@dataclass
class ContainerNode:
    """A running containerised node (``--network host``)."""

    name: str
    port: int
    ae_title: str
    data_dir: Path  # the /data volume, on the host

    def logs(self) -> str:
        p = podman("logs", self.name, check=False)
        return p.stdout + p.stderr

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *cmd, timeout=timeout, check=False)


@contextlib.contextmanager
def node_container(
    data_dir: Path,
    image: str = IMAGE,
    env: dict[str, str] | None = None,
    config: Path | None = None,
    start_timeout: float = 120,
    echo_aet: str = "TESTSCU",
) -> Iterator[ContainerNode]:
    """Run the image with ``/data`` on ``data_dir``; yield once it answers C-ECHO.

    ``env`` adds ``DICOMNODE_...`` overrides; ``config`` mounts a node.yaml;
    ``echo_aet`` is the calling AE title of the readiness C-ECHO (it must pass
    the configuration's allow list).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chown(data_dir, IMAGE_UID, IMAGE_UID)
    port = free_port()
    name = f"dicomnode-test-{uuid.uuid4().hex[:8]}"
    args = ["run", "-d", "--name", name, "--network", "host",
            # No systemd here to drive the periodic health timer; the check is
            # still defined and `podman healthcheck run` executes it on demand.
            "--health-interval", "disable",
            "-v", f"{data_dir}:/data", "-e", f"DICOMNODE_NODE__PORT={port}",
            "-e", "DICOMNODE_NODE__HOST=127.0.0.1",
            # --network host: containers run in parallel must not all take 8080.
            "-e", f"DICOMNODE_HTTP__PORT={free_port()}"]
    for k, v in (env or {}).items():
        args += ["-e", f"{k}={v}"]
    if config is not None:
        args += ["-v", f"{config}:/etc/dicomnode/node.yaml:ro"]
    podman(*args, image)
    node = ContainerNode(name, port, "DICOMNODE", data_dir)
    try:
        deadline = time.monotonic() + start_timeout
        while c_echo(port, calling_aet=echo_aet) != 0:
            state = podman("inspect", "-f", "{{.State.Status}}", name, check=False).stdout.strip()
            if state not in ("running", "created", "configured"):
                raise RuntimeError(f"container {name} is {state}:\n{node.logs()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"container {name} did not answer C-ECHO:\n{node.logs()[-4000:]}")
            time.sleep(0.5)
        yield node
    finally:
        podman("stop", "-t", "20", name, check=False, timeout=60)
        podman("rm", "-f", name, check=False, timeout=60)
