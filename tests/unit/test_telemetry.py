"""Metrics never fail the work they count, and cost nothing while off."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from dicomnode import telemetry
from dicomnode.telemetry import Metrics, guard


class Broken:
    """A metric whose file cannot be written (a full disk under the metrics folder)."""

    def labels(self, *args: Any) -> Broken:
        return self

    def inc(self, amount: float = 1) -> None:
        raise OSError(28, "No space left on device")


def test_a_failing_metric_is_logged_once_and_never_raises(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(telemetry, "_warned", False)
    m = Metrics()
    m.enabled = True
    m.instances = m.received_bytes = m.series_completed = Broken()
    with caplog.at_level(logging.WARNING, logger="dicomnode.telemetry"):
        m.instance("CT1", 0, 100)  # the C-STORE path
        m.instance("CT1", 0, 100)
        with guard():
            m.series_completed.inc()
    warnings = [r for r in caplog.records if "updating a metric failed" in r.getMessage()]
    assert len(warnings) == 1


def test_off_metrics_accept_every_call() -> None:
    m = Metrics()
    assert not m.enabled
    m.instance("CT1", 0xA700, 0)
    for metric in (m.associations_active, m.associations_refused, m.series_completed,
                   m.jobs, m.job_seconds, m.stage_seconds, m.deliveries, m.notifications,
                   m.retries, m.model_loaded):
        metric.labels("a", "b").inc()
        metric.labels("a").observe(1.0)
        metric.set(1)
        metric.dec()
