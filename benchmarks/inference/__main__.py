"""Model runtime: the node's full path against raw onnxruntime, per shipped model.

For each shipped model, on its real volume written as a DICOM series
(``ct-tissue``: the InVesalius Cranium head CT, 108 x 256 x 256;
``deepbet-brain``: Colin27 T1, 181 x 217 x 181):

* **full**: DICOM files -> ``load_volume`` -> pre-processing -> network(s)
  -> post-processing -> masks on the source grid (``ModelRegistry.run``);
* **raw** (baseline, same run): only ``InferenceSession.run`` of the same
  warm sessions on the tensors the node prepared (recorded from a full run),
  i.e. what any runtime must pay for the network itself.

Each side runs in its own fresh interpreter (sessions created first, then
one cold call to record peak memory, then ``--repeat`` warm calls; the
median is reported). Peak RSS is the kernel's high-water mark (VmHWM); the
"working set" is that peak minus the resident size just before the call
(interpreter, libraries and loaded sessions), i.e. the memory the call
itself needs.

Targets (issue 3): overhead (full - raw) <= 25 % of raw, and peak RSS <= 4x
the volume's float32 size. onnxruntime's own activations for a 3D U-Net at
256^3 are far larger than the volume, so the table also gives the raw
call's working set and the node's extra memory (full - raw working set) to
compare with the 4x budget.

Usage::

    python -m benchmarks.inference [--models ct-tissue,deepbet-brain] [--repeat 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".bench" / "inference"
MODELS = ("ct-tissue", "deepbet-brain")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is this call's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _series(model: str) -> tuple[Path, tuple[int, int, int]]:
    """The DICOM series for a model (written once, cached under .bench/inference)."""
    os.environ.setdefault("DICOMNODE_TEST_CACHE", str(CACHE))
    sys.path.insert(0, str(ROOT))
    from tests.support.infer_data import colin27_mr_series, cranium_ct_series

    fx = cranium_ct_series() if model == "ct-tissue" else colin27_mr_series()
    return fx.directory, fx.array.shape


# --------------------------------------------------------------------------- children


def _setup(model: str, threads: int):
    sys.path.insert(0, str(ROOT))
    from dicomnode.infer import ModelRegistry, load_volume
    from dicomnode.infer.registry import SHIPPED_MODELS_DIR

    reg = ModelRegistry(SHIPPED_MODELS_DIR, enabled=[model], threads=threads)
    runner = reg.runner(model)  # sessions created before any clock starts
    backends = [b for b in (runner.localizer, runner.backend) if b is not None]

    def full(series: Path) -> None:
        result = reg.run(model, load_volume(series))
        assert result.segmentation is not None
        assert result.segmentation.masks.shape[1:] == result.volume.shape

    return reg, runner, backends, full


def _inputs_file(model: str) -> Path:
    return CACHE / f"{model}-network-inputs.npz"


def _record(model: str, series: Path, threads: int) -> None:
    """Save the exact tensors the node feeds each session during one full run."""
    reg, runner, backends, full = _setup(model, threads)
    recorded: list[np.ndarray] = []
    for attr in ("localizer", "backend"):
        inner = getattr(runner, attr)
        if inner is None:
            continue

        class Recorder:
            def __init__(self, inner: Any) -> None:
                self.inner, self.path = inner, inner.path

            def run(self, x: np.ndarray) -> list[np.ndarray]:
                recorded.append(x.copy())
                return self.inner.run(x)

        setattr(runner, attr, Recorder(inner))
    full(series)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(_inputs_file(model), *recorded)


def _raw_call(backends: list[Any], model: str):
    data = np.load(_inputs_file(model))
    tensors = [data[f"arr_{i}"] for i in range(len(data.files))]
    assert len(tensors) == len(backends)

    def raw() -> None:
        for backend, x in zip(backends, tensors, strict=True):
            backend.run(x)

    return raw


def _child(mode: str, model: str, series: Path, repeat: int, threads: int) -> dict[str, Any]:
    if mode == "record":
        _record(model, series, threads)
        return {}
    reg, runner, backends, full = _setup(model, threads)
    raw = _raw_call(backends, model)
    gc.collect()
    if mode in ("peak-full", "peak-raw"):
        # Fresh interpreter, sessions loaded, nothing run yet: one cold call.
        call = (lambda: full(series)) if mode == "peak-full" else raw
        base = _status_kb("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        call()
        took = time.perf_counter() - t
        peak = _status_kb("VmHWM")
        return {"cold_s": took, "base_rss_mb": base / 1024, "peak_rss_mb": peak / 1024,
                "working_set_mb": (peak - base) / 1024}
    # Timing: raw and full interleaved in one process, so machine noise hits both.
    raw()
    full(series)
    times: dict[str, list[float]] = {"raw": [], "full": []}
    cpu: dict[str, list[float]] = {"raw": [], "full": []}
    for _ in range(repeat):
        for name, call in (("raw", raw), ("full", lambda: full(series))):
            gc.collect()
            c, t = time.process_time(), time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v,
                "cpu_median_s": statistics.median(cpu[k])}
            for k, v in times.items()}


def _spawn(mode: str, model: str, series: Path, repeat: int, threads: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.inference", "--child", mode, "--models", model,
         "--series", str(series), "--repeat", str(repeat), "--threads", str(threads)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    if out.returncode != 0:
        raise SystemExit(f"{mode} {model} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_over(full: dict[str, Any], raw: dict[str, Any]) -> float:
    return float((full["cpu_median_s"] - raw["cpu_median_s"]) / raw["cpu_median_s"])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.inference")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    ap.add_argument("--child", choices=("record", "peak-raw", "peak-full", "time"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--series", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if args.child:
        print(json.dumps(_child(args.child, models[0], Path(args.series), args.repeat,
                                args.threads)))
        return 0
    print(f"inference benchmark: {os.cpu_count()} CPU(s), repeat {args.repeat}, "
          f"threads {args.threads or 'default'}")
    rows = []
    for model in models:
        series, shape = _series(model)
        vol_mb = float(np.prod(shape)) * 4 / 2**20
        _spawn("record", model, series, 1, args.threads)
        peak_raw = _spawn("peak-raw", model, series, 1, args.threads)
        peak_full = _spawn("peak-full", model, series, 1, args.threads)
        timing = _spawn("time", model, series, args.repeat, args.threads)
        rows.append((model, shape, vol_mb, timing, peak_raw, peak_full))
    hdr = (f"{'model':<14} {'volume':<12} {'raw s':>6} {'full s':>6} {'overhead':>8} "
           f"{'(min)':>7} {'peak RSS':>8} {'full WS':>7} {'raw WS':>7} {'node WS':>7} "
           f"{'4x vol':>6}")
    print(hdr)
    print("-" * len(hdr))
    verdicts: list[str] = []
    for model, shape, vol_mb, timing, peak_raw, peak_full in rows:
        raw, full = timing["raw"], timing["full"]
        over = (full["median_s"] - raw["median_s"]) / raw["median_s"]
        over_min = (full["min_s"] - raw["min_s"]) / raw["min_s"]
        node_ws = peak_full["working_set_mb"] - peak_raw["working_set_mb"]
        print(f"{model:<14} {'x'.join(map(str, shape)):<12} {raw['median_s']:>6.2f} "
              f"{full['median_s']:>6.2f} {100 * over:>7.1f}% {100 * over_min:>6.1f}% "
              f"{peak_full['peak_rss_mb']:>7.0f}M {peak_full['working_set_mb']:>6.0f}M "
              f"{peak_raw['working_set_mb']:>6.0f}M {node_ws:>6.0f}M {4 * vol_mb:>5.0f}M")
        verdicts.append(
            f"{model}: overhead <= 25% of raw: wall {'met' if over <= 0.25 else 'NOT met'}, "
            f"CPU {'met' if cpu_over(full, raw) <= 0.25 else 'NOT met'}; node working set "
            f"<= 4x volume: {'met' if node_ws <= 4 * vol_mb else 'NOT met'}; absolute peak RSS "
            f"<= 4x volume: {'met' if peak_full['peak_rss_mb'] <= 4 * vol_mb else 'NOT met'}")
        raw_runs = " ".join(f"{t:.2f}" for t in raw["times_s"])
        full_runs = " ".join(f"{t:.2f}" for t in full["times_s"])
        print(f"{'':<14} raw runs [{raw_runs}] s, full runs [{full_runs}] s")
        print(f"{'':<14} CPU time (all threads, robust to other load): raw "
              f"{raw['cpu_median_s']:.2f} s, full {full['cpu_median_s']:.2f} s, "
              f"overhead {100 * cpu_over(full, raw):.1f}%")
    print("\nraw: InferenceSession.run only, on the tensors the node prepared (same sessions).")
    print("full: DICOM files -> volume -> model -> masks on the source grid. Medians of "
          "interleaved warm runs; (min): the same ratio from the fastest runs.")
    print("peak RSS / WS (working set = peak minus RSS before the call): one cold call in a "
          "fresh interpreter with sessions loaded; node WS = full WS - raw WS.")
    for v in verdicts:
        print(v)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
