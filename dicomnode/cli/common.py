"""Helpers shared by CLI commands."""

from __future__ import annotations

import argparse

from dicomnode.config import Settings, load_settings
from dicomnode.logs import setup_logging


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Load settings from ``--config`` (or env/defaults) and set up logging."""
    settings = load_settings(getattr(args, "config", None))
    level = getattr(args, "log_level", None) or settings.logging.level
    json_lines = bool(getattr(args, "log_json", False)) or settings.logging.json
    setup_logging(level, json_lines, settings.logging.file)
    return settings
