"""Retry policy (pure computation, no peer): backoff, jitter, cap, deadline."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from dicomnode.config import DestinationConfig, WorkerConfig
from dicomnode.dispatch import RetryPolicy, is_transient_status, is_warning_status, status_text
from dicomnode.errors import ConfigError

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_backoff_grows_then_caps_without_jitter() -> None:
    p = RetryPolicy(base_seconds=5, max_seconds=60, multiplier=2, jitter=0)
    assert [p.delay(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert p.delay(10_000) == 60  # no overflow


def test_jitter_stays_within_bounds_and_spreads() -> None:
    p = RetryPolicy(base_seconds=10, max_seconds=100, jitter=0.5)
    rng = random.Random(1)
    delays = [p.delay(3, rng) for _ in range(200)]
    assert all(20 <= d <= 40 for d in delays)
    assert max(delays) - min(delays) > 10  # actually jittered


def test_next_attempt_respects_deadline() -> None:
    p = RetryPolicy(base_seconds=60, max_seconds=600, jitter=0, deadline_seconds=300)
    assert p.next_attempt(attempts=1, first_attempt_at=T0, now=T0) == T0 + timedelta(seconds=60)
    # 240 s in, the next backoff (120 s) would overshoot: clamp to the deadline.
    late = T0 + timedelta(seconds=240)
    assert p.next_attempt(attempts=2, first_attempt_at=T0, now=late) == T0 + timedelta(seconds=300)
    # at / after the deadline: give up
    assert p.next_attempt(attempts=3, first_attempt_at=T0, now=T0 + timedelta(seconds=300)) is None
    assert p.gives_up_at(T0) == T0 + timedelta(seconds=300)


def test_permanent_errors_and_max_attempts_give_up() -> None:
    p = RetryPolicy(max_attempts=3)
    assert p.next_attempt(attempts=1, first_attempt_at=T0, now=T0, transient=False) is None
    assert p.next_attempt(attempts=2, first_attempt_at=T0, now=T0) is not None
    assert p.next_attempt(attempts=3, first_attempt_at=T0, now=T0) is None


def test_for_destination_uses_worker_backoff_and_destination_deadline() -> None:
    d = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=104,
                          retry_deadline_seconds=900)
    p = RetryPolicy.for_destination(d, WorkerConfig(backoff_base_seconds=2,
                                                    backoff_max_seconds=30))
    assert (p.base_seconds, p.max_seconds, p.deadline_seconds) == (2, 30, 900)


@pytest.mark.parametrize("kwargs", [
    {"base_seconds": 0}, {"base_seconds": 10, "max_seconds": 5}, {"multiplier": 0.5},
    {"jitter": 1.5}, {"deadline_seconds": -1}, {"max_attempts": 0},
])
def test_invalid_policy(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="retry:"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


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
