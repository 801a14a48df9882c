"""Ingest: a 300-slice 512x512 16-bit CT on one association, and three 100-slice
studies on three concurrent associations, sent by DCMTK ``storescu``.

Receivers, all measured in the same run, each started fresh (empty storage)
for every repetition:

* ``node-rN``: ``dicomnode serve`` with the full durability contract (temp
  file, fsync, atomic rename, directory fsync, committed row before 0x0000)
  and ``node.receivers = N`` receiving processes (each connection to the
  least busy one);
* ``http-rN`` (``--http``): ``node-rN`` with its HTTP side on and a client
  asking ``/metrics`` and ``/readyz`` every second while instances arrive (the
  ``node-rN`` runs have ``http.enabled: false``);
* ``limits-rN`` (``--limits``): ``node-rN`` with the size limits on
  (``storage.max_instance_mb``, ``max_series_instances``, ``max_series_mb`` set
  above the data, so nothing is refused but every check runs: one series-usage
  query per instance);
* ``storescp``: DCMTK ``storescp --fork`` writing files (no database, no fsync);
* ``orthanc``: Orthanc (Debian package), default SQLite index, no plugins.

DCMTK runs with ``TCP_NODELAY=1`` on both sides (Debian's 3.6.7 otherwise
stalls on Nagle). Prints the median wall time of the repetitions, instances/s,
MB/s, the node's peak RSS (sum of VmHWM over its processes) and ratios
(baseline time / node time: above 1.0 means the node is faster).

Usage::

    python -m benchmarks.ingest [--repeat 5] [--receivers 1,2,3] [--only node,orthanc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.ingest.generate import make_series  # noqa: E402
from tests.support.peers import free_port, start_orthanc, wait_for_port  # noqa: E402

CACHE = ROOT / ".bench" / "ingest"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Dataset:
    single: Path  # folder of 300 slices
    concurrent: list[Path]  # three folders of 100 slices
    single_bytes: int = 0
    concurrent_bytes: int = 0


def prepare(slices: int, size: int) -> Dataset:
    single = CACHE / f"ct{slices}x{size}"
    conc = [CACHE / f"ct{slices // 3}x{size}_s{i}" for i in range(3)]
    if len(list(single.glob("*.dcm"))) != slices:
        shutil.rmtree(single, ignore_errors=True)
        print(f"generating {slices} slices of {size}x{size} ...", flush=True)
        make_series(single, slices, size=size, study=1, seed=1)
    for i, d in enumerate(conc):
        if len(list(d.glob("*.dcm"))) != slices // 3:
            shutil.rmtree(d, ignore_errors=True)
            make_series(d, slices // 3, size=size, study=10 + i, seed=10 + i)
    ds = Dataset(single, conc)
    ds.single_bytes = sum(p.stat().st_size for p in single.glob("*.dcm"))
    ds.concurrent_bytes = sum(p.stat().st_size for d in conc for p in d.glob("*.dcm"))
    return ds


# --------------------------------------------------------------------------- receivers


@dataclass
class Running:
    port: int
    aet: str
    stop: Callable[[], None]
    pids: Callable[[], list[int]] = field(default=lambda: [])


def _peak_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _scrape(http_port: int, proc: subprocess.Popen[bytes]) -> None:
    """A monitoring system and an open status page: /metrics and /readyz every second."""
    while proc.poll() is None:
        for path in ("/metrics", "/readyz"):
            try:
                with urllib.request.urlopen(  # noqa: S310 - loopback only
                        f"http://127.0.0.1:{http_port}{path}", timeout=5) as resp:
                    resp.read()
            except OSError:
                pass
        time.sleep(1.0)


LIMITS = {"max_instance_mb": 64, "max_series_instances": 100000, "max_series_mb": 100000}


def start_node(work: Path, receivers: int, fsync: bool = True,
               src: Path | None = None, http: bool = False,
               limits: bool = False) -> Running:
    port = free_port()
    http_port = free_port()
    cfg = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port,
                 "receivers": receivers, "max_pdu": 0},
        "storage": {"path": str(work / "storage"), "min_free_mb": 0, "fsync": fsync,
                    **(LIMITS if limits else {})},
        "database": {"url": f"sqlite:///{work / 'dicomnode.db'}"},
        "completion": {"series_quiet_seconds": 60},
        "worker": {"processes": 0},
        "logging": {"level": "INFO"},
        "http": {"enabled": http, "port": http_port},
    }
    (work / "node.json").write_text(json.dumps(cfg))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    if src is not None:  # another version's package (before/after comparisons)
        env["PYTHONPATH"] = str(src)
    log = open(work / "node.log", "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "--config",
                             str(work / "node.json"), "serve", "--no-worker"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
    try:
        _wait_echo(port, "DICOMNODE", proc)
    except Exception:
        proc.kill()
        log.close()
        print((work / "node.log").read_text()[-3000:], file=sys.stderr)
        raise
    if receivers > 1:
        # Every receiving process must be serving before the clock starts: the node
        # logs "node ready" only once they all said so.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"node ready" not in \
                (work / "node.log").read_bytes():
            time.sleep(0.1)

    if http:
        threading.Thread(target=_scrape, args=(http_port, proc), daemon=True).start()

    def pids() -> list[int]:
        try:
            return [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(True)]
        except psutil.Error:
            return [proc.pid]

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    return Running(port, "DICOMNODE", stop, pids)


def start_storescp(work: Path) -> Running:
    port = free_port()
    (work / "out").mkdir()
    proc = subprocess.Popen(["/usr/bin/storescp", "--fork", "-od", str(work / "out"),
                             str(port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_port(port)

    def stop() -> None:
        proc.terminate()
        proc.wait(10)

    return Running(port, "STORESCP", stop)


def start_orthanc_(work: Path) -> Running:
    # Orthanc's DICOM layer is DCMTK: it needs TCP_NODELAY=1 in its environment too.
    os.environ["TCP_NODELAY"] = "1"
    o = start_orthanc(work, aet="ORTHANC", extra={"DicomCheckCalledAet": True})
    proc = o.process
    return Running(o.dicom_port, "ORTHANC", o.stop, lambda: [proc.pid] if proc else [])


def _wait_echo(port: int, aet: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        r = subprocess.run(["/usr/bin/echoscu", "-aec", aet, "127.0.0.1", str(port)],
                           env=DCMTK_ENV, capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError("receiver did not answer C-ECHO")


# --------------------------------------------------------------------------- senders


def _storescu(port: int, aet: str, folder: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["/usr/bin/storescu", "-aec", aet, "+sd", "127.0.0.1", str(port),
                             str(folder)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def send(port: int, aet: str, folders: list[Path]) -> float:
    t0 = time.perf_counter()
    procs = [_storescu(port, aet, f) for f in folders]
    errors = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"storescu failed: {errors}")
    return wall


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    data = prepare(args.slices, args.size)
    systems: dict[str, Callable[[Path], Running]] = {}
    for r in args.receivers:
        systems[f"node-r{r}"] = lambda w, r=r: start_node(w, r)  # type: ignore[misc]
    if args.http:
        for r in args.receivers:
            systems[f"http-r{r}"] = lambda w, r=r: start_node(  # type: ignore[misc]
                w, r, True, None, True)
    if args.limits:
        for r in args.receivers:
            systems[f"limits-r{r}"] = lambda w, r=r: start_node(  # type: ignore[misc]
                w, r, limits=True)
    if args.nofsync:
        # Diagnostic only (breaks the durability contract): what durability costs.
        for r in args.receivers:
            systems[f"nofsync-r{r}"] = lambda w, r=r: start_node(w, r, False)  # type: ignore[misc]
    if args.base_src:
        for r in args.receivers:
            systems[f"base-r{r}"] = lambda w, r=r: start_node(  # type: ignore[misc]
                w, r, True, args.base_src)
    systems["storescp"] = start_storescp
    systems["orthanc"] = start_orthanc_
    if args.only:
        systems = {k: v for k, v in systems.items() if any(k.startswith(o) for o in args.only)}
    scenarios = {
        "1 assoc x 300": ([data.single], data.single_bytes, args.slices),
        "3 assoc x 100": (data.concurrent, data.concurrent_bytes, args.slices // 3 * 3),
    }
    times: dict[tuple[str, str], list[float]] = {}
    rss: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeat):
        for name, starter in systems.items():  # interleaved: noise hits every system alike
            for scen, (folders, _, _) in scenarios.items():
                work = Path(tempfile.mkdtemp(prefix=f"ingest-{name}-", dir=args.workdir))
                try:
                    running = starter(work)
                    try:
                        cpu0 = _cpu_seconds(running.pids())
                        wall = send(running.port, running.aet, folders)
                        cpu = _cpu_seconds(running.pids()) - cpu0
                        rss.setdefault((name, scen), []).append(_peak_rss_mb(running.pids()))
                    finally:
                        running.stop()
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                times.setdefault((name, scen), []).append(wall)
                # storescp --fork: its children are gone by now, no CPU figure.
                cpu_s = f", receiver CPU {cpu:.2f} s" if name != "storescp" else ""
                print(f"  run {rep + 1}/{args.repeat} {name:<9} {scen}: {wall:.2f} s{cpu_s}",
                      flush=True)
    print()
    print(f"CT {args.size}x{args.size} 16-bit, medians of {args.repeat} runs; "
          f"ratio = baseline time / this time (>1: faster than the baseline)")
    for scen, (_, nbytes, n) in scenarios.items():
        print(f"\n{scen} ({n} instances, {nbytes / 1e6:.0f} MB)")
        print(f"  {'system':<10} {'wall s':>7} {'inst/s':>7} {'MB/s':>7} {'peak RSS MB':>12} "
              f"{'vs orthanc':>11} {'vs storescp':>12}")
        med = {name: statistics.median(times[(name, scen)]) for name in systems}
        for name in systems:
            t = med[name]
            node = name.startswith(("node", "nofsync", "base", "http", "limits"))
            r = f"{statistics.median(rss[(name, scen)]):.0f}" if node else "-"
            vs_o = f"{med['orthanc'] / t:.2f}" if "orthanc" in med else "-"
            vs_d = f"{med['storescp'] / t:.2f}" if "storescp" in med else "-"
            print(f"  {name:<10} {t:>7.2f} {n / t:>7.0f} {nbytes / 1e6 / t:>7.1f} {r:>12} "
                  f"{vs_o:>11} {vs_d:>12}")
        for name in systems:
            base = "node-" + name[len("http-"):]
            if name.startswith("http-") and base in med:
                print(f"  {name} / {base} (HTTP side on and scraped / off): "
                      f"time {med[name] / med[base]:.3f}")
            base = "node-" + name[len("limits-"):]
            if name.startswith("limits-") and base in med:
                print(f"  {name} / {base} (size limits checked / unlimited): "
                      f"time {med[name] / med[base]:.3f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--receivers", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 2, 3], help="node.receivers variants (default 1,2,3)")
    p.add_argument("--only", type=lambda s: s.split(","), default=None,
                   help="comma-separated system name prefixes (node, storescp, orthanc)")
    p.add_argument("--limits", action="store_true",
                   help="also run the node with the storage size limits on (limits-rN)")
    p.add_argument("--nofsync", action="store_true",
                   help="also run the node with storage.fsync off (diagnostic: what durability "
                        "costs; not a valid configuration for a clinical node)")
    p.add_argument("--http", action="store_true",
                   help="also measure http-rN: the node with its HTTP side on and scraped "
                        "every second")
    p.add_argument("--base-src", type=Path, default=None,
                   help="folder holding another version's dicomnode package (e.g. from "
                        "`git archive <rev> dicomnode | tar -x -C DIR`): also measured, as base-rN")
    p.add_argument("--workdir", default=None, help="where receivers write (default: $TMPDIR)")
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
