"""`dicomnode studies` (not implemented yet)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Placeholder until this command is built; registers nothing."""
