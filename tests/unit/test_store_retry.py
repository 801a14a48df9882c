"""RetryStrategy (pure computation): backoff, cap, jitter, attempts, deadline, from the settings.

Ported from the RetryPolicy tests of tests/integration/test_dispatch_policy.py
(dispatch/retry.py, which nothing but its test used, is gone); the store's use
of the strategy for jobs and deliveries is tested in test_store_queue.py.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta

import pytest

from dicomnode.config import (
    DestinationConfig,
    NotificationConfig,
    Settings,
    WorkerConfig,
)
from dicomnode.errors import ConfigError
from dicomnode.store.retry import RetryDecision, RetryStrategy

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PACS = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=104,
                         retry_deadline_seconds=900)
HOOK = NotificationConfig(name="hook", kind="webhook", url="http://127.0.0.1:9/x",
                          retry_deadline_seconds=120)


def test_backoff_grows_then_caps_without_jitter() -> None:
    p = RetryStrategy(base_seconds=5, max_seconds=60, multiplier=2, jitter=0)
    assert [p.delay(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert p.delay(10_000) == 60  # no overflow


def test_default_has_no_jitter_and_is_the_old_backoff_formula() -> None:
    # The node's real path had no jitter: base * 2**(attempts-1), capped (attempts 0
    # counts as 1), exactly as store/_common.backoff_seconds computed it.
    p = RetryStrategy(base_seconds=10, max_seconds=25)
    assert p.jitter == 0 and p.multiplier == 2
    for attempts in range(0, 12):
        assert p.delay(attempts) == float(min(25, 10 * (2 ** max(0, attempts - 1))))
    assert {p.delay(3) for _ in range(50)} == {25.0}


def test_jitter_stays_within_bounds_and_spreads() -> None:
    p = RetryStrategy(base_seconds=10, max_seconds=100, jitter=0.5)
    rng = random.Random(1)
    delays = [p.delay(3, rng) for _ in range(200)]
    assert all(20 <= d <= 40 for d in delays)
    assert max(delays) - min(delays) > 10  # actually jittered


def test_next_attempt_respects_deadline() -> None:
    p = RetryStrategy(base_seconds=60, max_seconds=600, deadline_seconds=300)
    deadline = p.deadline_from(T0)
    assert deadline == T0 + timedelta(seconds=300)
    assert p.next_attempt(attempts=1, now=T0, deadline=deadline) == T0 + timedelta(seconds=60)
    # 180 s in, the next backoff (120 s) lands on the deadline: still tried.
    mid = T0 + timedelta(seconds=180)
    assert p.next_attempt(attempts=2, now=mid, deadline=deadline) == deadline
    # 240 s in, it would overshoot: the store gives up rather than try after the
    # deadline (the behaviour of the outbox, unchanged; test_store_queue.py).
    late = T0 + timedelta(seconds=240)
    assert p.next_attempt(attempts=2, now=late, deadline=deadline) is None
    assert p.decide(attempts=2, now=late, deadline=deadline) == RetryDecision(
        None, "retry deadline passed")
    # at / after the deadline: give up
    assert p.next_attempt(attempts=3, now=deadline, deadline=deadline) is None
    # no deadline given: only the attempts bound the retries
    assert p.next_attempt(attempts=9, now=late) == late + timedelta(seconds=600)
    assert RetryStrategy().deadline_from(T0) is None


def test_permanent_errors_and_max_attempts_give_up() -> None:
    p = RetryStrategy(max_attempts=3)
    assert p.next_attempt(attempts=1, now=T0, transient=False) is None
    assert p.decide(attempts=1, now=T0, transient=False).reason == "permanent failure"
    assert p.next_attempt(attempts=2, now=T0) == T0 + timedelta(seconds=10)
    assert p.next_attempt(attempts=3, now=T0) is None
    assert p.decide(attempts=3, now=T0) == RetryDecision(None, "gave up after 3 attempt(s)")
    assert p.decide(attempts=2, now=T0) == RetryDecision(T0 + timedelta(seconds=10))
    # a permanent error is named as such even past every other bound
    assert p.decide(attempts=3, now=T0, deadline=T0, transient=False).reason == \
        "permanent failure"


def test_for_destination_uses_worker_backoff_and_destination_deadline() -> None:
    w = WorkerConfig(backoff_base_seconds=2, backoff_max_seconds=30)
    p = RetryStrategy.for_destination(PACS, w)
    assert (p.base_seconds, p.max_seconds, p.deadline_seconds) == (2, 30, 900)
    assert p.max_attempts is None and p.jitter == 0
    n = RetryStrategy.for_destination(HOOK, w, max_attempts=4)
    assert (n.base_seconds, n.max_seconds, n.deadline_seconds, n.max_attempts) == (2, 30, 120, 4)


def test_for_jobs_uses_worker_backoff_and_attempts_without_deadline() -> None:
    p = RetryStrategy.for_jobs(WorkerConfig(max_attempts=4, backoff_base_seconds=3,
                                            backoff_max_seconds=20))
    assert (p.max_attempts, p.base_seconds, p.max_seconds, p.deadline_seconds) == (4, 3, 20, None)
    assert [p.delay(n) for n in range(1, 5)] == [3, 6, 12, 20]


def test_for_delivery_finds_destination_then_notification_by_name() -> None:
    s = dataclasses.replace(Settings(), worker=WorkerConfig(backoff_base_seconds=1),
                            destinations=(PACS,), notifications=(HOOK,))
    assert RetryStrategy.for_delivery(s, "pacs").deadline_seconds == 900
    assert RetryStrategy.for_delivery(s, "hook").deadline_seconds == 120
    gone = RetryStrategy.for_delivery(s, "removed", max_attempts=5)
    assert (gone.deadline_seconds, gone.base_seconds, gone.max_attempts) == (None, 1, 5)


@pytest.mark.parametrize(("base", "cap"), [(10, 5), (0, 100), (-1, 8), (-3, -2)])
def test_settings_give_the_delays_they_always_gave(base: float, cap: float) -> None:
    # The settings accept any backoff numbers; the strategy built from them waits
    # what base * 2**(n-1) capped waited (a negative wait meant "at once", as 0 does).
    p = RetryStrategy.for_jobs(WorkerConfig(backoff_base_seconds=base, backoff_max_seconds=cap))
    for attempts in range(1, 8):
        assert p.delay(attempts) == max(0.0, float(min(cap, base * 2 ** (attempts - 1))))


@pytest.mark.parametrize("kwargs", [
    {"base_seconds": -1}, {"base_seconds": 10, "max_seconds": 5}, {"multiplier": 0.5},
    {"jitter": 1.5}, {"jitter": -0.1}, {"deadline_seconds": -1}, {"max_attempts": 0},
])
def test_invalid_strategy(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="retry:"):
        RetryStrategy(**kwargs)  # type: ignore[arg-type]


def test_base_zero_retries_at_once() -> None:
    # worker.backoff_base_seconds 0 is accepted by the settings: retry at once.
    p = RetryStrategy(base_seconds=0, max_seconds=0)
    assert p.next_attempt(attempts=4, now=T0) == T0
