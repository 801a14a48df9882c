"""``dicomnode worker``: run worker processes (and the dispatcher) against the database."""

from __future__ import annotations

import argparse

from dicomnode.cli.common import settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run workers (inference) and the dispatcher without receiving",
        description="Run worker processes and the outbox dispatcher against the same "
        "database as `dicomnode serve` (which may run with --no-worker or worker.processes: 0). "
        "Any number of worker hosts may share one database: jobs and deliveries are claimed "
        "with leases.",
    )
    p.add_argument("-n", "--processes", type=int, default=None,
                   help="worker processes (default: worker.processes, at least 1)")
    p.add_argument("--no-dispatch", action="store_true",
                   help="do not run the dispatcher (another process sends the results)")
    p.add_argument("--once", action="store_true",
                   help="in this process: run every due job, send every due delivery, exit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Here, not at the top: the runtime costs ~0.9 s to import (see cli/serve.py).
    from dicomnode.node.workers import run_workers

    settings = settings_from_args(args)
    n = args.processes if args.processes is not None else max(1, settings.worker.processes)
    if n < 0:
        raise SystemExit("dicomnode worker: --processes must be >= 0")
    return run_workers(settings, workers=n, dispatch=not args.no_dispatch, once=args.once)
