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
    return fx.directory, fx.array.shape  # type: ignore[return-value]


# --------------------------------------------------------------------------- children


def _child(mode: str, model: str, series: Path, repeat: int, threads: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from dicomnode.infer import ModelRegistry, load_volume
    from dicomnode.infer.registry import SHIPPED_MODELS_DIR

    reg = ModelRegistry(SHIPPED_MODELS_DIR, enabled=[model], threads=threads)
    runner = reg.runner(model)  # sessions created before any clock starts
    gc.collect()
    if mode == "full":
        def call() -> None:
            result = reg.run(model, load_volume(series))
            assert result.segmentation is not None
            assert result.segmentation.masks.shape[1:] == result.volume.shape

        base = _status_kb("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        call()
        cold = time.perf_counter() - t
        peak = _status_kb("VmHWM")
    else:
        # Record the exact tensors the node feeds each session during one full run.
        recorded: list[tuple[Any, np.ndarray]] = []
        for attr in ("localizer", "backend"):
            backend = getattr(runner, attr)
            if backend is None:
                continue

            class Recorder:
                def __init__(self, inner: Any) -> None:
                    self.inner, self.path = inner, inner.path

                def run(self, x: np.ndarray) -> list[np.ndarray]:
                    recorded.append((self.inner, x.copy()))
                    return self.inner.run(x)

            setattr(runner, attr, Recorder(backend))
        reg.run(model, load_volume(series))
        runner.backend = recorded[-1][0]
        gc.collect()

        def call() -> None:
            for backend, x in recorded:
                backend.run(x)

        base = _status_kb("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        call()
        cold = time.perf_counter() - t
        peak = _status_kb("VmHWM")
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return {"mode": mode, "model": model, "cold_s": cold, "median_s": statistics.median(times),
            "times_s": times, "base_rss_mb": base / 1024, "peak_rss_mb": peak / 1024,
            "working_set_mb": (peak - base) / 1024}


def _spawn(mode: str, model: str, series: Path, repeat: int, threads: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.inference", "--child", mode, "--models", model,
         "--series", str(series), "--repeat", str(repeat), "--threads", str(threads)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    if out.returncode != 0:
        raise SystemExit(f"{mode} {model} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.inference")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    ap.add_argument("--child", choices=("full", "raw"), help=argparse.SUPPRESS)
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
        raw = _spawn("raw", model, series, args.repeat, args.threads)
        full = _spawn("full", model, series, args.repeat, args.threads)
        overhead = full["median_s"] - raw["median_s"]
        rows.append((model, shape, vol_mb, raw, full, overhead))
    hdr = (f"{'model':<14} {'volume':<14} {'raw s':>7} {'full s':>7} {'full/raw':>8} "
           f"{'overhead':>9} {'peak RSS':>9} {'full WS':>8} {'raw WS':>7} {'node WS':>8} "
           f"{'4x vol':>7}")
    print(hdr)
    print("-" * len(hdr))
    ok = True
    for model, shape, vol_mb, raw, full, overhead in rows:
        node_ws = full["working_set_mb"] - raw["working_set_mb"]
        print(f"{model:<14} {'x'.join(map(str, shape)):<14} {raw['median_s']:>7.3f} "
              f"{full['median_s']:>7.3f} {full['median_s'] / raw['median_s']:>8.2f} "
              f"{100 * overhead / raw['median_s']:>8.1f}% {full['peak_rss_mb']:>8.0f}M "
              f"{full['working_set_mb']:>7.0f}M {raw['working_set_mb']:>6.0f}M "
              f"{node_ws:>7.0f}M {4 * vol_mb:>6.0f}M")
        ok &= overhead <= 0.25 * raw["median_s"]
    print("\nraw: InferenceSession.run only, on the tensors the node prepared (same sessions).")
    print("full: DICOM files -> volume -> model -> masks on the source grid (median of warm "
          "runs).")
    print("WS (working set): peak RSS of the first call minus RSS just before it; node WS = "
          "full WS - raw WS.")
    print(f"overhead target <= 25% of raw: {'met' if ok else 'NOT met'} for all models")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
