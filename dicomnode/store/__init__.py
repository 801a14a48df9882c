"""Durable storage: every byte on disk and every row in the database.

Use the one facade, :class:`Store`::

    store = Store.open(settings, migrate=True)
    result = store.ingest(meta, part10_bytes)        # receive
    jobs = store.complete_quiet_series()             # completeness tracker
    job = store.claim_job("worker-1")                # worker
    refs = store.series_instances(job.series_uid, job.series_version)
    out = store.write_output(job.id, sop_uid, sop_class_uid, dataset, kind="seg")
    store.finish_job(job.id, "worker-1", [out], [NewDelivery("pacs", out)])
    for d in store.claim_deliveries("pacs", "dispatcher-1"): ...   # dispatcher
        store.delivery_done(d.id, 0x0000)

Nothing outside this package issues SQL or writes under ``storage.path``.
:class:`Store` holds no SQL itself: its statements are named functions in
``series`` (studies, series, versions, instance rows, completeness), ``queue``
(jobs, outputs), ``outbox`` (deliveries, notifications) and ``catalog`` (study
summaries); :class:`RetryStrategy` (``retry``) is the one retry policy.
"""

from __future__ import annotations

from dicomnode.store.catalog import SeriesSummary, StudySummary
from dicomnode.store.outbox import NewDelivery
from dicomnode.store.parse import (
    InstanceMeta,
    InvalidUIDError,
    MissingAttributeError,
    UndecodableError,
    meta_from_dataset,
    read_meta,
)
from dicomnode.store.retry import RetryDecision, RetryStrategy
from dicomnode.store.store import IngestOutcome, IngestResult, ReconcileReport, Store

__all__ = [
    "IngestOutcome",
    "IngestResult",
    "InstanceMeta",
    "InvalidUIDError",
    "MissingAttributeError",
    "NewDelivery",
    "ReconcileReport",
    "RetryDecision",
    "RetryStrategy",
    "SeriesSummary",
    "Store",
    "StudySummary",
    "UndecodableError",
    "meta_from_dataset",
    "read_meta",
]
