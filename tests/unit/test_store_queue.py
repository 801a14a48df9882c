"""Job queue and delivery outbox on SQLite and PostgreSQL (real databases, real files)."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.config import DestinationConfig, _build
from dicomnode.domain import DeliveryState, JobState
from dicomnode.errors import StoreError
from dicomnode.store import NewDelivery, Store, read_meta
from tests.support import receive_db
from tests.support.receive_db import settings_for
from tests.support.receive_node import make_instance

db_url = receive_db.db_url  # fixture: SQLite and PostgreSQL

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _series(store: Store, tmp: Path, n: int = 2) -> str:
    """Ingest ``n`` instances of a new series; return its UID."""
    study, series = generate_uid(), generate_uid()
    for i in range(n):
        p = make_instance(tmp / f"{series}-{i}.dcm", study_uid=study, series_uid=series,
                          instance_number=i + 1)
        data = p.read_bytes()
        store.ingest(read_meta(data), data)
    return series


def _open(tmp: Path, url: str, clock: Clock, **sections: dict) -> Store:
    worker = {"max_attempts": 3, "backoff_base_seconds": 10, "backoff_max_seconds": 25,
              "lease_seconds": 60}
    worker.update(sections.pop("worker", {}))
    return Store.open(settings_for(tmp, url, worker=worker, **sections), migrate=True,
                      clock=clock)


def test_claim_heartbeat_finish_with_outputs_and_deliveries(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock) as store:
        series = _series(store, tmp_path)
        job = store.enqueue(series, priority=5)
        assert job.state is JobState.PENDING and job.series_version == 1 and job.priority == 5
        assert store.enqueue(series).id == job.id  # idempotent
        claimed = store.claim_job("w1")
        assert claimed is not None and claimed.id == job.id
        assert claimed.state is JobState.RUNNING and claimed.attempts == 1
        assert claimed.lease_until == T0 + timedelta(seconds=60)
        assert store.claim_job("w2") is None
        clock.advance(30)
        assert store.heartbeat(job.id, "w1")
        assert store.get_job(job.id).lease_until == T0 + timedelta(seconds=90)
        assert not store.heartbeat(job.id, "intruder")

        out = store.write_output(job.id, generate_uid(), "1.2.840.10008.5.1.4.1.1.66.4",
                                 b"\0" * 128 + b"DICM", kind="seg")
        assert out.path.is_file() and out.path.is_relative_to(store.root)
        done = store.finish_job(job.id, "w1", [out], [NewDelivery("pacs", out),
                                                      NewDelivery("archive", out)])
        assert done.state is JobState.DONE
        assert store.job_outputs(job.id) == [out]
        dels = store.list_deliveries(job_id=job.id)
        assert {d.destination for d in dels} == {"pacs", "archive"}
        assert all(d.state is DeliveryState.PENDING for d in dels)
        with pytest.raises(StoreError, match="lease was lost"):
            store.finish_job(job.id, "w1")


def test_concurrent_claimers_each_job_once(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock) as store:
        ids = {store.enqueue(_series(store, tmp_path, 1)).id for _ in range(24)}
        settings = store.settings
    claims: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        try:
            with Store.open(settings, clock=clock) as own:  # own engine, own connections
                got = claims.setdefault(name, [])
                while (job := own.claim_job(name)) is not None:
                    got.append(job.id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    all_claims = [j for got in claims.values() for j in got]
    assert sorted(all_claims) == sorted(ids)  # every job exactly once


def test_lease_expiry_returns_job_to_queue(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock, worker={"max_attempts": 2}) as store:
        job = store.enqueue(_series(store, tmp_path))
        assert store.claim_job("crashed", lease_seconds=5).id == job.id
        clock.advance(4)
        assert store.claim_job("w2") is None  # lease still valid
        clock.advance(2)
        again = store.claim_job("w2", lease_seconds=5)
        assert again is not None and again.id == job.id
        assert again.attempts == 2 and again.worker_id == "w2"
        assert not store.heartbeat(job.id, "crashed")  # the crashed worker lost it
        with pytest.raises(StoreError):
            store.fail_job(job.id, "crashed", "late", transient=True)
        clock.advance(10)  # the second lease expires too: max_attempts reached
        assert store.claim_job("w3") is None
        failed = store.get_job(job.id)
        assert failed.state is JobState.FAILED and "lease expired" in (failed.last_error or "")


def test_transient_failures_back_off_then_give_up(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock) as store:
        job = store.enqueue(_series(store, tmp_path))
        delays = []
        for attempt in (1, 2):
            assert store.claim_job("w").attempts == attempt
            j = store.fail_job(job.id, "w", "model server busy", transient=True)
            assert j.state is JobState.PENDING
            delays.append((j.not_before - clock.now).total_seconds())
            assert store.claim_job("w") is None  # not due yet
            clock.advance(delays[-1])
        assert delays == [10.0, 20.0]  # base 10 s doubling (cap 25 s)
        assert store.claim_job("w").attempts == 3
        j = store.fail_job(job.id, "w", "model server busy", transient=True)
        assert j.state is JobState.FAILED and "gave up after 3" in (j.last_error or "")
        # Operator retry: back to pending with a fresh attempt budget.
        r = store.retry_job(job.id)
        assert r.state is JobState.PENDING and r.attempts == 0
        assert store.claim_job("w").id == job.id
        j = store.fail_job(job.id, "w", "unsupported geometry", transient=False)
        assert j.state is JobState.FAILED and j.last_error == "unsupported geometry"
        assert store.list_jobs(states=[JobState.FAILED]) == [j]
        assert store.cancel_job(job.id).state is JobState.CANCELLED
        with pytest.raises(StoreError, match="cannot cancel"):
            store.cancel_job(job.id)


def test_priority_order(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock) as store:
        low = store.enqueue(_series(store, tmp_path, 1), priority=0)
        high = store.enqueue(_series(store, tmp_path, 1), priority=10)
        low2 = store.enqueue(_series(store, tmp_path, 1), priority=0)
        assert [store.claim_job("w").id for _ in range(3)] == [high.id, low.id, low2.id]


def test_newer_version_supersedes(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock) as store:
        study, series = generate_uid(), generate_uid()

        def send(i: int) -> None:
            p = make_instance(tmp_path / f"s{i}.dcm", study_uid=study, series_uid=series,
                              instance_number=i)
            store.ingest(read_meta(p.read_bytes()), p.read_bytes())

        send(1)
        v1 = store.enqueue(series)
        running = store.claim_job("w")
        assert running.id == v1.id
        send(2)  # late instance: version 2
        v2 = store.enqueue(series)
        assert v2.series_version == 2
        assert [r.instance_number for r in store.series_instances(series, 2)] == [1, 2]
        assert [r.instance_number for r in store.series_instances(series, 1)] == [1]
        assert store.job_superseded_by(v1.id) == v2.id
        out = store.write_output(v1.id, generate_uid(), "1.2.840.10008.5.1.4.1.1.88.22", b"x")
        ended = store.finish_job(v1.id, "w", [out], [NewDelivery("pacs", out)])
        assert ended.state is JobState.SUPERSEDED
        assert store.list_deliveries(job_id=v1.id) == []  # stale results not sent
        with pytest.raises(StoreError, match="superseded"):
            store.retry_job(v1.id)


def test_delivery_retries_until_deadline(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    dest = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
             "retry_deadline_seconds": 40}]
    settings = settings_for(tmp_path, db_url, worker={"backoff_base_seconds": 10,
                                                      "backoff_max_seconds": 100,
                                                      "max_attempts": 10})
    settings = dataclasses.replace(settings, destinations=tuple(
        _build("destinations[0]", DestinationConfig, d) for d in dest))
    with Store.open(settings, migrate=True, clock=clock) as store:
        job = store.enqueue(_series(store, tmp_path))
        store.claim_job("w")
        out = store.write_output(job.id, generate_uid(), "1.2.840.10008.5.1.4.1.1.88.22", b"x")
        store.finish_job(job.id, "w", [out], [NewDelivery("pacs", out)])
        (d,) = store.claim_deliveries("pacs", "disp")
        assert d.state is DeliveryState.SENDING and d.attempts == 1
        assert d.deadline == T0 + timedelta(seconds=40) and d.path == out.path
        assert store.claim_deliveries("pacs", "disp") == []
        d = store.delivery_failed(d.id, "connection refused", transient=True)
        assert d.state is DeliveryState.PENDING and d.not_before == T0 + timedelta(seconds=10)
        clock.advance(10)
        (d,) = store.claim_deliveries("pacs", "disp")
        d = store.delivery_failed(d.id, "connection refused", transient=True)  # retry at +30
        assert d.state is DeliveryState.PENDING
        clock.advance(20)
        (d,) = store.claim_deliveries("pacs", "disp")
        d = store.delivery_failed(d.id, "refused 0xA700", transient=True, peer_status=0xA700)
        assert d.state is DeliveryState.FAILED and "deadline" in (d.last_error or "")
        assert d.peer_status == 0xA700
        d = store.retry_delivery(d.id)
        assert d.state is DeliveryState.PENDING and d.deadline > clock.now
        (d,) = store.claim_deliveries("pacs", "disp")
        d = store.delivery_done(d.id, 0x0000)
        assert d.state is DeliveryState.DONE and d.peer_status == 0
        assert store.list_deliveries(states=[DeliveryState.DONE]) == [d]
        # A sender that crashed mid-send: its delivery comes back after the lease.
        job2 = store.enqueue(_series(store, tmp_path))
        store.claim_job("w")
        out2 = store.write_output(job2.id, generate_uid(), "1.2.840.10008.5.1.4.1.1.88.22",
                                  b"y")
        store.finish_job(job2.id, "w", [out2], [NewDelivery("pacs", out2)])
        (lost,) = store.claim_deliveries("pacs", "crashed", lease_seconds=5)
        clock.advance(6)
        (again,) = store.claim_deliveries("pacs", "disp")
        assert again.id == lost.id and again.attempts == 2


def test_attempt_log_kept_and_last_error_cleared_on_success(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock, worker={"lease_seconds": 5}) as store:
        job = store.enqueue(_series(store, tmp_path))
        store.claim_job("w1")
        store.fail_job(job.id, "w1", "database is locked", transient=True)
        clock.advance(10)
        assert store.claim_job("crashed", lease_seconds=5).id == job.id
        clock.advance(6)  # the second worker dies: its lease expires, w3 reclaims
        assert store.claim_job("w3").attempts == 3
        failing = store.get_job(job.id)
        assert failing.last_error == "database is locked"
        done = store.finish_job(job.id, "w3", notes={"excluded": [{"reason": "scout"}]})
        assert done.state is JobState.DONE and done.last_error is None
        assert done.notes == {"excluded": [{"reason": "scout"}]}
        log = done.attempt_log
        assert [(e["attempt"], e["transient"], e["worker"]) for e in log] == [
            (1, True, "w1"), (2, True, "crashed")]
        assert log[0]["error"] == "database is locked"
        assert "lease expired: worker crashed stopped" in str(log[1]["error"])
        assert log[0]["at"] == T0.replace(tzinfo=None).isoformat(timespec="seconds")


def test_skipped_version_hands_the_series_back(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock) as store:
        study, series = generate_uid(), generate_uid()

        def send(i: int) -> None:
            p = make_instance(tmp_path / f"s{i}.dcm", study_uid=study, series_uid=series,
                              instance_number=i)
            store.ingest(read_meta(p.read_bytes()), p.read_bytes())

        send(1)
        v1 = store.enqueue(series)
        store.claim_job("w")
        store.finish_job(v1.id, "w")
        send(2)
        v2 = store.enqueue(series)
        assert store.get_job(v1.id).state is JobState.SUPERSEDED
        assert store.job_handed_back_to(v2.id).id == v1.id  # type: ignore[union-attr]
        store.claim_job("w")
        skipped = store.skip_job(v2.id, "w", "only a scout", {"excluded": []})
        assert skipped.state is JobState.SKIPPED and skipped.notes["skipped"] == "only a scout"
        back = store.get_job(v1.id)
        assert back.state is JobState.DONE and store.job_superseded_by(v1.id) is None
        # Run again (jobs retry): the same earlier result is found.
        store.retry_job(v2.id)
        assert store.job_handed_back_to(v2.id).id == v1.id  # type: ignore[union-attr]
        # Version 3 brings a real image but fails; version 4 is not skipped: the
        # result before it (v1) no longer covers what v3 brought.
        send(3)
        v3 = store.enqueue(series)
        assert store.job_superseded_by(v1.id) == v3.id
        store.claim_job("w")
        store.fail_job(v3.id, "w", "bad", transient=False)
        send(4)
        v4 = store.enqueue(series)
        assert store.get_job(v3.id).state is JobState.SUPERSEDED
        assert store.job_handed_back_to(v4.id) is None


def test_a_job_finished_while_superseded_is_not_handed_back_to(tmp_path: Path,
                                                              db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock) as store:
        study, series = generate_uid(), generate_uid()
        for i in (1, 2):
            p = make_instance(tmp_path / f"s{i}.dcm", study_uid=study, series_uid=series,
                              instance_number=i)
            store.ingest(read_meta(p.read_bytes()), p.read_bytes())
            if i == 1:
                v1 = store.enqueue(series)
                store.claim_job("w")
        v2 = store.enqueue(series)
        # v1 ends after v2 exists: superseded, its deliveries never queued.
        assert store.finish_job(v1.id, "w").state is JobState.SUPERSEDED
        assert store.job_handed_back_to(v2.id) is None
