"""The one retry policy of the node: jobs, DICOM deliveries and notifications.

A :class:`RetryStrategy` (after procrastinate's ``RetryStrategy``) is a frozen
value built from the settings; the store asks it, after each failure, when to
try again::

    strategy = RetryStrategy.for_jobs(settings.worker)
    decision = strategy.decide(attempts=job.attempts, now=now, transient=True)
    if decision.retry_at is None: mark failed (decision.reason says why)
    else:                         set not_before = decision.retry_at

The n-th failure (``attempts`` counts the attempts made so far, the claim
counts each one) waits ``base_seconds * multiplier ** (attempts - 1)``, capped
at ``max_seconds``: with the node's settings ``worker.backoff_base_seconds``
doubling up to ``worker.backoff_max_seconds``. There is no jitter unless asked
for (the node asks for none). A delivery also has a deadline (its destination's
or notification target's ``retry_deadline_seconds`` after it was queued,
stored on its row): a retry that would land after it is not scheduled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from dicomnode.config import DestinationConfig, NotificationConfig, Settings, WorkerConfig
from dicomnode.errors import ConfigError

# The exponent is capped: multiplier ** large overflows long before it matters.
_MAX_EXPONENT = 64


@dataclass(frozen=True)
class RetryDecision:
    """What to do after a failure: retry at ``retry_at``, or give up (``None``) because
    of ``reason`` (``permanent failure``, ``retry deadline passed`` or ``gave up after N
    attempt(s)``)."""

    retry_at: datetime | None
    reason: str = ""


@dataclass(frozen=True)
class RetryStrategy:
    """Exponential backoff, bounded by a number of attempts and/or a deadline.

    ``max_attempts``: give up once this many attempts were made (``None``: no
    limit, only the deadline bounds the retries). ``deadline_seconds``: how long
    after a delivery is queued its retries may go on (``None``: no deadline);
    :meth:`deadline_from` turns it into the time stored on the row. ``jitter``
    scales each delay by a random factor in ``[1 - jitter, 1]`` (never longer
    than the cap); 0 (the default, what the node uses) makes delays exact.
    """

    max_attempts: int | None = None
    base_seconds: float = 5.0
    max_seconds: float = 600.0
    multiplier: float = 2.0
    deadline_seconds: float | None = None
    jitter: float = 0.0

    def __post_init__(self) -> None:
        # base 0 is allowed (retry at once): the settings accept it today.
        if self.base_seconds < 0 or self.max_seconds < self.base_seconds:
            raise ConfigError("retry: need 0 <= base_seconds <= max_seconds")
        if self.multiplier < 1:
            raise ConfigError("retry: multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("retry: jitter must be within [0, 1]")
        if self.deadline_seconds is not None and self.deadline_seconds < 0:
            raise ConfigError("retry: deadline_seconds must be >= 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigError("retry: max_attempts must be at least 1")

    # ------------------------------------------------------------------ from the settings

    @staticmethod
    def _backoff(worker: WorkerConfig) -> tuple[float, float]:
        """``(base, cap)`` from ``worker.backoff_*``, giving the delays the settings mean:
        a cap below the base caps every delay (base = cap gives the same delays); a
        negative value (accepted by the settings) means at once, as 0 does."""
        cap = max(0.0, float(worker.backoff_max_seconds))
        return min(max(0.0, float(worker.backoff_base_seconds)), cap), cap

    @classmethod
    def for_jobs(cls, worker: WorkerConfig) -> RetryStrategy:
        """Jobs: ``worker.backoff_*`` up to ``worker.max_attempts``; no deadline."""
        base, cap = cls._backoff(worker)
        return cls(max_attempts=worker.max_attempts, base_seconds=base, max_seconds=cap)

    @classmethod
    def for_destination(cls, destination: DestinationConfig | NotificationConfig,
                        worker: WorkerConfig | None = None, *,
                        max_attempts: int | None = None) -> RetryStrategy:
        """A DICOM destination or notification target: ``worker.backoff_*``, the
        target's ``retry_deadline_seconds``; ``max_attempts`` as given (the dispatcher
        lets only the deadline bound the retries)."""
        base, cap = cls._backoff(worker or WorkerConfig())
        return cls(max_attempts=max_attempts, base_seconds=base, max_seconds=cap,
                   deadline_seconds=destination.retry_deadline_seconds)

    @classmethod
    def for_delivery(cls, settings: Settings, destination: str, *,
                     max_attempts: int | None = None) -> RetryStrategy:
        """The strategy of the destination or notification target named ``destination``;
        a name no longer configured keeps the backoff and gets no deadline."""
        targets: list[DestinationConfig | NotificationConfig] = [*settings.destinations,
                                                                  *settings.notifications]
        for target in targets:
            if target.name == destination:
                return cls.for_destination(target, settings.worker, max_attempts=max_attempts)
        base, cap = cls._backoff(settings.worker)
        return cls(max_attempts=max_attempts, base_seconds=base, max_seconds=cap)

    # ------------------------------------------------------------------ decisions

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th attempt failed (0 counts as 1)."""
        exp = min(max(0, attempts - 1), _MAX_EXPONENT)
        raw = float(min(self.max_seconds, self.base_seconds * self.multiplier ** exp))
        if not self.jitter:
            return raw
        return raw * (1.0 - self.jitter * (rng or random).random())

    def deadline_from(self, start: datetime) -> datetime | None:
        """The deadline of something first queued at ``start`` (``None``: none)."""
        if self.deadline_seconds is None:
            return None
        return start + timedelta(seconds=float(self.deadline_seconds))

    def decide(self, *, attempts: int, now: datetime, deadline: datetime | None = None,
               transient: bool = True, rng: random.Random | None = None) -> RetryDecision:
        """Retry or give up after a failure, ``attempts`` attempts having been made.

        Gives up on a permanent (not ``transient``) error, when the next attempt
        would come after ``deadline``, or once ``max_attempts`` attempts were made.
        """
        if not transient:
            return RetryDecision(None, "permanent failure")
        retry_at = now + timedelta(seconds=self.delay(attempts, rng))
        if deadline is not None and retry_at > deadline:
            return RetryDecision(None, "retry deadline passed")
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return RetryDecision(None, f"gave up after {attempts} attempt(s)")
        return RetryDecision(retry_at)

    def next_attempt(self, *, attempts: int, now: datetime, deadline: datetime | None = None,
                     transient: bool = True, rng: random.Random | None = None) -> datetime | None:
        """When to try again, or ``None`` to give up (see :meth:`decide`)."""
        return self.decide(attempts=attempts, now=now, deadline=deadline, transient=transient,
                           rng=rng).retry_at
