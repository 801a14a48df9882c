"""C-STORE status classification (pure computation, no peer).

The retry policy (backoff, cap, deadline) is tested in tests/unit/test_store_retry.py."""

from __future__ import annotations

import pytest

from dicomnode.dispatch import is_transient_status, is_warning_status, status_text


@pytest.mark.parametrize(("code", "transient"), [
    (0xA700, True), (0xA7FF, True), (0x0110, True), (0xA900, False), (0xA9FF, False),
    (0xC000, False), (0xCFFF, False), (0x0122, False), (0x0124, False),
])
def test_status_classification(code: int, transient: bool) -> None:
    assert is_transient_status(code) is transient


def test_warning_codes_and_text() -> None:
    assert all(is_warning_status(c) for c in (0xB000, 0xB006, 0xB007))
    assert not is_warning_status(0xA700) and not is_warning_status(0x0000)
    assert status_text(0xA701) == "0xA701 (Refused: Out of Resources)"
    assert status_text(0xC123) == "0xC123 (Cannot Understand)"
