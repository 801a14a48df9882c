"""Run every benchmark (``python -m benchmarks``) or named ones (``python -m benchmarks ingest``).

Each benchmark is a package ``benchmarks/<name>/`` with a ``__main__``; it runs
in its own interpreter and prints its own table, with ratios against baselines
measured in the same run. Arguments after ``--`` are passed to every benchmark.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.name for p in HERE.iterdir()
                  if p.is_dir() and (p / "__main__.py").is_file())


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    names = argv or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available()}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"=== benchmarks.{name} ===", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *extra],
                             cwd=HERE.parent)
        print(f"=== benchmarks.{name}: exit {rc} in {time.monotonic() - t0:.0f} s ===\n",
              flush=True)
        if rc:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
