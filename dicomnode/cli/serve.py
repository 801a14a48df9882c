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
    # Here, not at the top: every command imports this module, and the node's
    # runtime (SCP, worker, models) costs ~0.9 s to import (measured; the CLI: 0.02 s).
    from dicomnode.node.node import run_node

    settings = settings_from_args(args)
    return run_node(settings, with_worker=not args.no_worker)
