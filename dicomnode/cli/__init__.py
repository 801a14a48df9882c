"""Command line: ``dicomnode <command> ...``.

Each command group lives in its own module under ``dicomnode.cli`` exposing
``register(subparsers)``; a registered sub-parser sets ``func(args) -> int``.
Errors derived from :class:`dicomnode.errors.DicomNodeError` become a one-line
message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dicomnode import __version__
from dicomnode.errors import DicomNodeError

# Order is the order in --help.
COMMAND_MODULES = (
    "serve",
    "worker_cmd",
    "send",
    "studies",
    "db",
    "models",
    "jobs",
    "routes",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description="PACS-integrated DICOM node for medical-imaging AI.",
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        help="YAML configuration file (default: $DICOMNODE_CONFIG, else built-in defaults)",
    )
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"dicomnode.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DicomNodeError as exc:
        print(f"dicomnode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
