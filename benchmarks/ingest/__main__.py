"""Ingest: a 300-slice 512x512 16-bit CT on one association, and three 100-slice
studies on three concurrent associations, sent by DCMTK ``storescu``.

Scenarios (``--scenarios``, comma-separated; default all three):

``receive``
    The node receiving only (``serve --no-worker``), ``node-rN``: the full
    durability contract (temp file, fsync, atomic rename, directory fsync,
    committed row before 0x0000) and ``node.receivers = N`` receiving processes.
    With ``--http`` also ``http-rN``: the same with its HTTP side on and a client
    asking ``/metrics`` and ``/readyz`` every second (``node-rN`` runs have
    ``http.enabled: false``). With ``--limits`` also ``limits-rN``: the same with
    the size limits on (``storage.max_instance_mb``, ``max_series_instances``,
    ``max_series_mb`` set above the data: nothing is refused, every check runs).
``serve``
    ``dicomnode serve`` as a user runs it: the default configuration (workers on,
    ``worker.processes`` 1, the embedded default routes), measured ``fresh``
    (sent as soon as it answers C-ECHO, while its workers warm up) and ``warm``
    (sent ``--warm-seconds``, default 20, after that).
``busy``
    The default ``serve`` with deepbet-brain running on an MR study (Colin27 T1,
    181 slices) while the 300-slice CT arrives: the CT's ingest time against the
    same idle node's (before and after, in the same repetition), and the
    model's own time (``model_s`` of the job) against the same model on the same
    node with nothing arriving.

Baselines, measured in the same run and interleaved with the node (``receive``
and ``serve``), each started fresh (empty storage) for every repetition:

* ``storescp``: DCMTK ``storescp --fork`` writing files (no database, no fsync);
* ``orthanc``: Orthanc (Debian package), default SQLite index, no plugins.

DCMTK runs with ``TCP_NODELAY=1`` on both sides (Debian's 3.6.7 otherwise
stalls on Nagle). Prints the median wall time of the repetitions, instances/s,
MB/s, the node's peak RSS (sum of VmHWM over its processes) and ratios
(baseline time / node time: above 1.0 means the node is faster).

Usage::

    python -m benchmarks.ingest [--scenarios receive,serve,busy] [--repeat 5]
        [--receivers 1,2,3] [--only node,orthanc] [--warm-seconds 20]
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
from typing import Any

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
    log: Path | None = None


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


LIMITS = {"max_instance_mb": 64, "max_series_instances": 100000, "max_series_mb": 100000}


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


def start_node(work: Path, receivers: int, fsync: bool = True,
               src: Path | None = None, *, serve: bool = False, http: bool = False,
               limits: bool = False, extra: dict[str, Any] | None = None) -> Running:
    """``dicomnode serve``: receive only (``--no-worker``), or with ``serve=True`` as a
    user runs it (workers on, default worker / completion / routing settings; its HTTP
    side on, as by default, on a free port). ``http``: the HTTP side on and scraped
    every second (otherwise off for receive-only runs)."""
    port = free_port()
    http_port = free_port()
    cfg: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port,
                 "receivers": receivers, "max_pdu": 0},
        "storage": {"path": str(work / "storage"), "min_free_mb": 0, "fsync": fsync,
                    **(LIMITS if limits else {})},
        "database": {"url": f"sqlite:///{work / 'dicomnode.db'}"},
        "logging": {"level": "INFO"},
    }
    if src is None:  # the tree before the HTTP side has no http: section
        cfg["http"] = {"enabled": http or serve, "port": http_port}
    if not serve:
        cfg["completion"] = {"series_quiet_seconds": 60}
        cfg["worker"] = {"processes": 0}
    for k, v in (extra or {}).items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    (work / "node.json").write_text(json.dumps(cfg))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    if src is not None:  # another version's package (before/after comparisons)
        env["PYTHONPATH"] = str(src)
    log = open(work / "node.log", "wb")  # noqa: SIM115 - owned by the process
    cmd = [sys.executable, "-m", "dicomnode", "--config", str(work / "node.json"), "serve"]
    proc = subprocess.Popen(cmd + ([] if serve else ["--no-worker"]),
                            stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
    try:
        _wait_echo(port, "DICOMNODE", proc)
    except Exception:
        proc.kill()
        log.close()
        print((work / "node.log").read_text()[-3000:], file=sys.stderr)
        raise
    if http:
        threading.Thread(target=_scrape, args=(http_port, proc), daemon=True).start()
    if receivers > 1 and not serve:
        # Every receiving process must be serving before the clock starts: the node
        # logs "node ready" only once they all said so. (``serve``: a user's scanner
        # sends as soon as the node answers; that is what "fresh" measures.)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"node ready" not in \
                (work / "node.log").read_bytes():
            time.sleep(0.1)

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

    return Running(port, "DICOMNODE", stop, pids, work / "node.log")


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


# --------------------------------------------------------------------------- measuring

Starter = Callable[[Path], Running]
Sends = dict[str, tuple[list[Path], int, int]]  # name -> (folders, bytes, instances)


def _sends(args: argparse.Namespace, data: Dataset) -> Sends:
    return {
        "1 assoc x 300": ([data.single], data.single_bytes, args.slices),
        "3 assoc x 100": (data.concurrent, data.concurrent_bytes, args.slices // 3 * 3),
    }


def _measure(args: argparse.Namespace, systems: dict[str, Starter], sends: Sends,
             states: dict[str, float]) -> tuple[dict[tuple[str, str], list[float]],
                                                dict[tuple[str, str], list[float]]]:
    """Every system x send x state (``state`` -> seconds to wait after the receiver
    answers), ``args.repeat`` times, interleaved so that machine noise hits all alike;
    returns wall times and peak RSS keyed by (system, "send[, state]")."""
    times: dict[tuple[str, str], list[float]] = {}
    rss: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeat):
        for name, starter in systems.items():
            for scen, (folders, _, _) in sends.items():
                for state, settle in states.items():
                    key = (name, f"{scen}, {state}" if state else scen)
                    work = Path(tempfile.mkdtemp(prefix=f"ingest-{name}-", dir=args.workdir))
                    try:
                        running = starter(work)
                        try:
                            if settle:
                                time.sleep(settle)
                            cpu0 = _cpu_seconds(running.pids())
                            wall = send(running.port, running.aet, folders)
                            cpu = _cpu_seconds(running.pids()) - cpu0
                            rss.setdefault(key, []).append(_peak_rss_mb(running.pids()))
                        finally:
                            running.stop()
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                    times.setdefault(key, []).append(wall)
                    # storescp --fork: its children are gone by now, no CPU figure.
                    cpu_s = f", receiver CPU {cpu:.2f} s" if name != "storescp" else ""
                    print(f"  run {rep + 1}/{args.repeat} {name:<9} {key[1]}: {wall:.2f} s"
                          f"{cpu_s}", flush=True)
    return times, rss


def _table(args: argparse.Namespace, title: str, systems: list[str], sends: Sends,
           states: list[str], times: dict[tuple[str, str], list[float]],
           rss: dict[tuple[str, str], list[float]]) -> None:
    print(f"\n== {title}: CT {args.size}x{args.size} 16-bit, medians of {args.repeat} runs; "
          f"ratio = baseline time / this time (>1: faster than the baseline)")
    for scen, (_, nbytes, n) in sends.items():
        for state in states:
            label = f"{scen}, {state}" if state else scen
            print(f"\n{label} ({n} instances, {nbytes / 1e6:.0f} MB)")
            print(f"  {'system':<10} {'wall s':>7} {'inst/s':>7} {'MB/s':>7} "
                  f"{'peak RSS MB':>12} {'vs orthanc':>11} {'vs storescp':>12}")
            med = {name: statistics.median(times[(name, label)]) for name in systems}
            for name in systems:
                t = med[name]
                node = name.startswith(("node", "nofsync", "base", "serve", "http", "limits"))
                r = f"{statistics.median(rss[(name, label)]):.0f}" if node else "-"
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


def _baselines(args: argparse.Namespace, systems: dict[str, Starter]) -> dict[str, Starter]:
    systems["storescp"] = start_storescp
    systems["orthanc"] = start_orthanc_
    if args.only:
        systems = {k: v for k, v in systems.items() if any(k.startswith(o) for o in args.only)}
    return systems


# --------------------------------------------------------------------------- scenarios


def run_receive(args: argparse.Namespace, data: Dataset) -> None:
    """The node receiving only (``--no-worker``), node.receivers variants."""
    systems: dict[str, Starter] = {}
    for r in args.receivers:
        systems[f"node-r{r}"] = lambda w, r=r: start_node(w, r)  # type: ignore[misc]
    if args.nofsync:
        # Diagnostic only (breaks the durability contract): what durability costs.
        for r in args.receivers:
            systems[f"nofsync-r{r}"] = lambda w, r=r: start_node(w, r, False)  # type: ignore[misc]
    if args.http:
        for r in args.receivers:
            systems[f"http-r{r}"] = lambda w, r=r: start_node(  # type: ignore[misc]
                w, r, http=True)
    if args.limits:
        for r in args.receivers:
            systems[f"limits-r{r}"] = lambda w, r=r: start_node(  # type: ignore[misc]
                w, r, limits=True)
    if args.base_src:
        for r in args.receivers:
            systems[f"base-r{r}"] = lambda w, r=r: start_node(  # type: ignore[misc]
                w, r, True, args.base_src)
    systems = _baselines(args, systems)
    sends = _sends(args, data)
    times, rss = _measure(args, systems, sends, {"": 0.0})
    _table(args, "receive (serve --no-worker)", list(systems), sends, [""], times, rss)


def _worker_extra(args: argparse.Namespace) -> dict[str, Any]:
    """``--worker-nice``: the node's ``worker.nice`` (default: the setting's default)."""
    return {} if args.worker_nice is None else {"worker": {"nice": args.worker_nice}}


def run_serve(args: argparse.Namespace, data: Dataset) -> None:
    """The default ``serve`` (workers on), just started and warm, against the baselines
    in the same states (sent as soon as each answers, and ``--warm-seconds`` later)."""
    extra = _worker_extra(args)
    systems: dict[str, Starter] = {"serve": lambda w: start_node(w, 1, serve=True, extra=extra)}
    if args.base_src:
        systems["base-serve"] = lambda w: start_node(w, 1, True, args.base_src, serve=True)
    systems = _baselines(args, systems)
    sends = _sends(args, data)
    states = {"fresh": 0.0, "warm": args.warm_seconds}
    times, rss = _measure(args, systems, sends, states)
    _table(args, "serve (default configuration, workers on)", list(systems), sends,
           list(states), times, rss)


def _json_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _wait_log(path: Path, msg: str, series_uid: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in _json_log(path):
            if r.get("msg") == msg and r.get("series_uid") == series_uid:
                return r
            if (r.get("msg", "").startswith("job ") and r.get("series_uid") == series_uid
                    and r.get("state") == "failed"):
                raise RuntimeError(f"the job of {series_uid} failed: {r.get('error')}")
        time.sleep(0.05)
    raise TimeoutError(f"no {msg!r} for series {series_uid} in {timeout} s: "
                       f"{path.read_text(errors='replace')[-2000:]}")


def _relabel(src: list[Path], out: Path, tag: int) -> tuple[Path, str]:
    """A copy of a series as another study (new study, series and instance UIDs)."""
    import pydicom  # only this scenario needs it

    first = pydicom.dcmread(src[0], stop_before_pixels=True)
    uid = f"2.25.{int(first.SeriesInstanceUID.replace('.', '')[-20:]) * 97 + tag}"
    if out.exists() and len(list(out.glob("*.dcm"))) == len(src):
        return out, f"{uid}.2"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for i, p in enumerate(src):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{uid}.1", f"{uid}.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(
            f"{uid}.3.{i + 1}")
        ds.FrameOfReferenceUID = f"{uid}.4"
        ds.save_as(out / f"{i + 1:04d}.dcm", enforce_file_format=True)
    return out, f"{uid}.2"


def run_busy(args: argparse.Namespace, data: Dataset) -> None:
    """The 300-slice CT into the default ``serve`` while deepbet-brain runs on an MR
    study, against the same node idle; deepbet-brain's time then against alone."""
    try:
        from tests.support.infer_data import colin27_mr_series  # needs mricron-data

        mr = colin27_mr_series()
    except BaseException as exc:  # pytest.skip raises an exception outside pytest too
        if isinstance(exc, KeyboardInterrupt):
            raise
        print(f"\n== busy: skipped, no Colin27 T1 series ({exc})")
        return
    mr_alone, uid_alone = _relabel(list(mr.paths), CACHE / "mr-alone", 1)
    mr_busy, uid_busy = _relabel(list(mr.paths), CACHE / "mr-busy", 2)
    cts = [data.single]
    for i in (1, 2):  # two more 300-slice studies: one node sees each only once
        d = CACHE / f"ct{args.slices}x{args.size}_busy{i}"
        if len(list(d.glob("*.dcm"))) != args.slices:
            shutil.rmtree(d, ignore_errors=True)
            make_series(d, args.slices, size=args.size, study=30 + i, seed=30 + i)
        cts.append(d)
    extra = {
        "logging": {"json": True},
        # MR -> deepbet-brain only: the CT studies make jobs with no model, so the only
        # model running is the one measured.
        "routes": [{"name": "brain", "when": {"Modality": "MR"}, "models": ["deepbet-brain"]}],
        "completion": {"series_quiet_seconds": 2.0},
        **_worker_extra(args),
    }
    rows: list[dict[str, float]] = []
    for rep in range(args.repeat):
        work = Path(tempfile.mkdtemp(prefix="ingest-busy-", dir=args.workdir))
        try:
            node = start_node(work, 1, serve=True, extra=extra)
            assert node.log is not None
            try:
                time.sleep(args.warm_seconds)
                idle1 = send(node.port, node.aet, [cts[0]])
                send(node.port, node.aet, [mr_alone])
                alone = _wait_log(node.log, "job done", uid_alone, 600)
                send(node.port, node.aet, [mr_busy])
                _wait_log(node.log, "job claimed", uid_busy, 120)
                time.sleep(args.busy_delay)  # past loading: the model is computing
                busy = send(node.port, node.aet, [cts[1]])
                overlapped = not any(r.get("msg") == "job done"
                                     and r.get("series_uid") == uid_busy
                                     for r in _json_log(node.log))
                during = _wait_log(node.log, "job done", uid_busy, 600)
                idle2 = send(node.port, node.aet, [cts[2]])
            finally:
                node.stop()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row = {"idle": (idle1 + idle2) / 2, "idle1": idle1, "idle2": idle2, "busy": busy,
               "model_alone": float(alone.get("model_s", 0.0)),
               "model_busy": float(during.get("model_s", 0.0)),
               "overlapped": float(overlapped)}
        rows.append(row)
        print(f"  run {rep + 1}/{args.repeat} busy: CT idle {idle1:.2f} / {idle2:.2f} s, "
              f"during deepbet-brain {busy:.2f} s{'' if overlapped else ' (MODEL ENDED FIRST)'}"
              f"; deepbet-brain model {row['model_alone']:.2f} s alone, "
              f"{row['model_busy']:.2f} s while receiving", flush=True)

    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)

    print(f"\n== busy: {args.slices}-slice CT (1 association) while deepbet-brain runs on a "
          f"181-slice MR study; medians of {args.repeat} runs")
    print(f"  CT ingest, idle node (before/after)   {med('idle'):.2f} s "
          f"({args.slices / med('idle'):.0f} inst/s)")
    print(f"  CT ingest, model running              {med('busy'):.2f} s "
          f"({args.slices / med('busy'):.0f} inst/s)")
    print(f"  rate while busy / idle rate           {med('idle') / med('busy'):.2f} "
          f"(target >= 0.9)")
    print(f"  deepbet-brain model time alone        {med('model_alone'):.2f} s")
    print(f"  deepbet-brain model time, CT arriving {med('model_busy'):.2f} s "
          f"({med('model_busy') / med('model_alone') - 1:+.0%}; target <= +15 %)")
    if not all(r["overlapped"] for r in rows):
        print("  NOTE: in some runs the model finished before the CT was in "
              "(raise --busy-delay or lower it)")


SCENARIOS = {"receive": run_receive, "serve": run_serve, "busy": run_busy}


def run(args: argparse.Namespace) -> int:
    data = prepare(args.slices, args.size)
    for name in args.scenarios:
        SCENARIOS[name](args, data)
    return 0


def _scenarios(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in names if x not in SCENARIOS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(bad) or '(none)'}; choose from "
            f"{', '.join(SCENARIOS)}")
    return names


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", type=_scenarios, default=list(SCENARIOS),
                   help="comma-separated: receive, serve, busy (default: all)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--receivers", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 2, 3], help="node.receivers variants of `receive` (default 1,2,3)")
    p.add_argument("--only", type=lambda s: s.split(","), default=None,
                   help="comma-separated system name prefixes (node, serve, storescp, orthanc)")
    p.add_argument("--warm-seconds", type=float, default=20.0,
                   help="`serve` warm state and `busy`: seconds after the receiver answers "
                        "C-ECHO before sending (default 20)")
    p.add_argument("--busy-delay", type=float, default=1.0,
                   help="`busy`: seconds after the MR job is claimed before the CT is sent "
                        "(past loading the MR; default 1)")
    p.add_argument("--worker-nice", type=int, default=None,
                   help="`serve` and `busy`: the node's worker.nice (default: the setting's "
                        "default, 10); 0 shows what the lower priority changes")
    p.add_argument("--nofsync", action="store_true",
                   help="also run the node with storage.fsync off (diagnostic: what durability "
                        "costs; not a valid configuration for a clinical node)")
    p.add_argument("--limits", action="store_true",
                   help="receive: also run the node with the storage size limits on "
                        "(limits-rN)")
    p.add_argument("--http", action="store_true",
                   help="receive: also measure http-rN, the node with its HTTP side on and "
                        "scraped every second")
    p.add_argument("--base-src", type=Path, default=None,
                   help="folder holding another version's dicomnode package (e.g. from "
                        "`git archive <rev> dicomnode | tar -x -C DIR`): also measured, as "
                        "base-rN (receive) and base-serve (serve)")
    p.add_argument("--workdir", default=None, help="where receivers write (default: $TMPDIR)")
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
