"""Command line: ``dicomnode <command> ...``.

Each command group lives in its own module under ``dicomnode.cli`` exposing
``register(subparsers)``; a registered sub-parser sets ``func(args) -> int``.
Errors derived from :class:`dicomnode.errors.DicomNodeError` become a one-line
message on stderr and exit code 2.

The global options (``--config``, ``--log-json``, ``--log-level``) are accepted
before and after any (sub)command: ``dicomnode serve --config node.yaml`` is
``dicomnode --config node.yaml serve``; given in both places, the later wins.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from dicomnode import __version__
from dicomnode.cli import (
    audit,
    check,
    db,
    demo,
    jobs,
    models,
    routes,
    send,
    serve,
    storage,
    studies,
    worker_cmd,
)
from dicomnode.errors import DicomNodeError

# Order is the order in --help.
COMMAND_MODULES = (serve, worker_cmd, check, send, studies, storage, db, models, jobs,
                   routes, audit, demo)


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--config``, ``--log-json``, ``--log-level`` on ``parser``.

    ``suppress``: on a (sub)command's parser the options have no default, so that
    one given before the command is kept unless it is given again after it.
    """
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "-c",
        "--config",
        default=default(None),
        help="YAML configuration file (default: $DICOMNODE_CONFIG, else built-in defaults)",
    )
    parser.add_argument("--log-json", action="store_true", default=default(False),
                        help="log one JSON object per line")
    parser.add_argument("--log-level", default=default(None),
                        help="DEBUG, INFO, WARNING, ERROR")


class CommandParser(argparse.ArgumentParser):
    """The parser of every (sub)command: it accepts the global options too.

    argparse creates nested sub-parsers (``jobs list``) with the class of their
    parent, so every level gets them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        add_global_options(self, suppress=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description="PACS-integrated DICOM node for medical-imaging AI.",
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for module in COMMAND_MODULES:
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
