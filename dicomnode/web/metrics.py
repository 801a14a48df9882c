"""``/metrics``: the node's Prometheus exposition.

The counters, gauges and histograms every process writes
(:mod:`dicomnode.telemetry`) are aggregated from the multiprocess folder by
prometheus_client's ``MultiProcessCollector``; what the database and the disk
know is computed at scrape time by :class:`NodeCollector`: the queue depth by
state and priority, the outbox by destination and state, free disk space.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from dicomnode.logs import kv
from dicomnode.store import Store
from dicomnode.telemetry import ENV_DIR

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeCollector(Collector):
    """Gauges read from the store and the disk at each scrape."""

    def __init__(self, store: Callable[[], Store | None]) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        store = self._store()
        if store is None:
            return
        up = GaugeMetricFamily("dicomnode_database_up",
                               "1 when the database answered this scrape's queries.")
        try:
            jobs = store.queue_depth()
            outbox = store.outbox_depth()
        except Exception as exc:  # noqa: BLE001 - a scrape reports, never fails
            log.warning("metrics: database not readable", extra=kv(error=str(exc)))
            up.add_metric([], 0)
            jobs, outbox = [], []
        else:
            up.add_metric([], 1)
        yield up
        q = GaugeMetricFamily("dicomnode_queue_jobs", "Jobs in the database, by state and "
                              "priority.", labels=["state", "priority"])
        for state, priority, count in jobs:
            q.add_metric([state, str(priority)], count)
        yield q
        o = GaugeMetricFamily("dicomnode_outbox_deliveries", "Deliveries and notifications "
                              "in the outbox, by destination and state.",
                              labels=["destination", "state"])
        for dest, state, count in outbox:
            o.add_metric([dest, state], count)
        yield o
        free = GaugeMetricFamily("dicomnode_disk_free_bytes",
                                 "Free space of the storage file system.")
        try:
            free.add_metric([], store.free_mb() * 1048576)
        except OSError:
            pass
        yield free
        need = GaugeMetricFamily("dicomnode_disk_min_free_bytes",
                                 "storage.min_free_mb: below it C-STOREs are refused.")
        need.add_metric([], store.settings.storage.min_free_mb * 1048576)
        yield need


def registry_for(store: Callable[[], Store | None]) -> CollectorRegistry:
    """A registry: every process's metrics (when multiprocess mode is on) + the node's."""
    reg = CollectorRegistry(auto_describe=False)
    directory = os.environ.get(ENV_DIR)
    if directory and os.path.isdir(directory):
        MultiProcessCollector(reg, path=directory)
    reg.register(NodeCollector(store))
    return reg


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def model_states() -> dict[str, float]:
    """``dicomnode_model_loaded`` as the worker processes report it: model -> 0 / 1."""
    directory = os.environ.get(ENV_DIR)
    if not directory or not os.path.isdir(directory):
        return {}
    reg = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(reg, path=directory)
    out: dict[str, float] = {}
    for metric in reg.collect():
        if metric.name != "dicomnode_model_loaded":
            continue
        for sample in metric.samples:
            model = sample.labels.get("model", "")
            out[model] = max(out.get(model, 0.0), float(sample.value))
    return out




__all__ = ["CONTENT_TYPE", "NodeCollector", "model_states", "registry_for", "render"]
