"""Shared pytest configuration: fixtures from tests/support made available suite-wide."""

from __future__ import annotations

# Real test volumes as DICOM series (session-scoped, cached on disk).
from tests.support.infer_data import colin27_mr, cranium_ct  # noqa: F401
