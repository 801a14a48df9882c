"""``dicomnode serve``: migrate, reconcile, receive, track completeness (and run workers)."""

from __future__ import annotations

import argparse

from dicomnode.cli.common import settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the node: DICOM SCP, completeness tracker (and workers)",
        description="Apply pending database migrations, reconcile the store with the "
        "database, then receive C-STORE/C-ECHO until SIGTERM/SIGINT.",
    )
    p.add_argument("--no-worker", action="store_true",
                   help="receive only: do not start worker processes")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dicomnode.receive.node import run_node

    settings = settings_from_args(args)
    return run_node(settings, with_worker=not args.no_worker)
