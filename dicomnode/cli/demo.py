"""``dicomnode demo``: the whole loop in a minute, with nothing else installed.

Without ``--to`` the demo starts, in a temporary folder, a node on a free port
(``dicomnode serve`` as a child process, SQLite, one worker) and a tiny
receiving PACS (a pynetdicom Storage SCP) as its destination; it sends the
bundled real sample (Colin27 T1, 2 mm, 91 axial MR slices: see
``dicomnode/demo_data``) to the node, waits for the brain-extraction result
(``deepbet-brain``) to arrive at the PACS and prints what was produced and
where. With ``--to AET@HOST:PORT`` it sends the sample to a node already
running; given that node's configuration (``dicomnode -c node.yaml demo --to
...``) it also follows the job in its database.

The parts: :mod:`dicomnode.cli.demo_sample` (the sample series),
:mod:`dicomnode.cli.demo_pacs` (the little PACS), :mod:`dicomnode.cli.demo_run`
(node, sending with :func:`dicomnode.dispatch.scu.store_files`, following the job).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dicomnode.cli.demo_sample import SAMPLE, write_sample_series
from dicomnode.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="send a bundled real MR series through a node and show the results",
        description="Start a node and a small PACS on free ports in a temporary folder "
        "(or use a running node with --to), send the bundled Colin27 T1 sample, wait for the "
        "SEG + SR and print what was produced and where.",
    )
    p.add_argument("--to", metavar="AET@HOST:PORT",
                   help="send to this running node instead of starting one")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the results (default 300)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep everything in this folder (default: a temporary one, removed)")
    p.add_argument("--write-only", type=Path, metavar="DIR", default=None,
                   help="only write the sample series as DICOM files into DIR and exit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.write_only is not None:
        paths = write_sample_series(Path(args.write_only))
        print(f"wrote {len(paths)} MR instances to {args.write_only}")
        return 0
    if not SAMPLE.is_file():
        raise ConfigError(f"demo sample {SAMPLE} is missing from this installation")
    # Imported here, not at the top: demo_run loads the store (SQLAlchemy), the model
    # registry and pynetdicom, +0.5 s on every `dicomnode` command, `--help` included
    # (every command module is imported to build the parser; measured with -X importtime).
    from dicomnode.cli import demo_run

    return demo_run.run(args)
