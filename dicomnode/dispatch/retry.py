"""Retry policy for deliveries: exponential backoff with jitter, bounded by a deadline.

One object decides; callers only ask it. The worker records, per delivery,
the number of attempts made and when the first attempt happened, then calls
:meth:`RetryPolicy.next_attempt` after each failure::

    when = policy.next_attempt(attempts=d.attempts, first_attempt_at=d.created_at,
                               now=utcnow(), transient=err.transient)
    if when is None: mark failed (permanent error or deadline passed)
    else:            set not_before = when
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from dicomnode.config import DestinationConfig, WorkerConfig
from dicomnode.errors import ConfigError


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by a deadline and optionally a count.

    The n-th retry (``attempts`` failures so far, 1-based) waits
    ``min(max_seconds, base_seconds * multiplier ** (attempts - 1))`` scaled by
    a random factor in ``[1 - jitter, 1]`` ("equal jitter" style: never longer
    than the cap, spreads retries of many deliveries that failed together).
    No retry is scheduled after ``deadline_seconds`` from the first attempt:
    the last one is moved earlier to land on the deadline instead.
    """

    base_seconds: float = 5.0
    max_seconds: float = 600.0
    multiplier: float = 2.0
    jitter: float = 0.5
    deadline_seconds: float = 3600.0
    max_attempts: int | None = None  # None: only the deadline bounds the retries

    def __post_init__(self) -> None:
        if self.base_seconds <= 0 or self.max_seconds < self.base_seconds:
            raise ConfigError("retry: need 0 < base_seconds <= max_seconds")
        if self.multiplier < 1:
            raise ConfigError("retry: multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("retry: jitter must be within [0, 1]")
        if self.deadline_seconds < 0:
            raise ConfigError("retry: deadline_seconds must be >= 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigError("retry: max_attempts must be at least 1")

    @classmethod
    def for_destination(cls, destination: DestinationConfig,
                        worker: WorkerConfig | None = None) -> RetryPolicy:
        """Backoff from ``worker.backoff_*``, deadline from the destination."""
        w = worker or WorkerConfig()
        return cls(base_seconds=w.backoff_base_seconds,
                   max_seconds=max(w.backoff_base_seconds, w.backoff_max_seconds),
                   deadline_seconds=destination.retry_deadline_seconds)

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (>= 1)."""
        if attempts < 1:
            raise ValueError("attempts counts failures so far and starts at 1")
        # Cap the exponent: multiplier ** large overflows long before it matters.
        exp = min(attempts - 1, 64)
        raw = min(self.max_seconds, self.base_seconds * self.multiplier ** exp)
        r = (rng or random).random()
        return raw * (1.0 - self.jitter * r)

    def next_attempt(
        self,
        *,
        attempts: int,
        first_attempt_at: datetime,
        now: datetime,
        transient: bool = True,
        rng: random.Random | None = None,
    ) -> datetime | None:
        """When to try again, or ``None`` to give up (mark the delivery failed).

        Gives up on a permanent error, after ``max_attempts`` attempts, or when
        the deadline (``first_attempt_at + deadline_seconds``) has passed.
        """
        if not transient:
            return None
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return None
        deadline = first_attempt_at + timedelta(seconds=self.deadline_seconds)
        if now >= deadline:
            return None
        when = now + timedelta(seconds=self.delay(attempts, rng))
        return min(when, deadline)

    def gives_up_at(self, first_attempt_at: datetime) -> datetime:
        """The deadline after which no attempt is made."""
        return first_attempt_at + timedelta(seconds=self.deadline_seconds)
