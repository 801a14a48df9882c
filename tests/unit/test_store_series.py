"""Series versions and completeness, duplicates, reconciliation (real SQLite, real files)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.domain import JobState
from dicomnode.store import IngestOutcome, Store, read_meta
from tests.support.receive_db import settings_for
from tests.support.receive_node import dataset_bytes, make_instance

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _store(tmp: Path, clock: Clock, **sections: dict) -> Store:
    sections.setdefault("completion", {"series_quiet_seconds": 10})
    return Store.open(settings_for(tmp, f"sqlite:///{tmp / 'db.sqlite'}", **sections),
                      migrate=True, clock=clock)


def _ingest(store: Store, path: Path):  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    return store.ingest(read_meta(data), data)


def test_quiet_series_becomes_one_job(tmp_path: Path, clock: Clock) -> None:
    with _store(tmp_path, clock) as store:
        study, series = generate_uid(), generate_uid()
        for i in range(3):
            clock.now = T0 + timedelta(seconds=i)
            r = _ingest(store, make_instance(tmp_path / f"{i}.dcm", study_uid=study,
                                             series_uid=series, instance_number=i + 1))
            assert r.outcome is IngestOutcome.STORED and r.job is None
        assert store.complete_quiet_series(T0 + timedelta(seconds=11)) == []
        (job,) = store.complete_quiet_series(T0 + timedelta(seconds=12))
        assert (job.series_uid, job.series_version, job.state) == (series, 1, JobState.PENDING)
        assert store.complete_quiet_series(T0 + timedelta(seconds=60)) == []  # exactly one
        ref = store.series_ref(series)
        assert ref.instance_count == 3 and ref.study_uid == study


def test_expected_count_completes_at_once(tmp_path: Path, clock: Clock) -> None:
    with _store(tmp_path, clock) as store:
        series = generate_uid()
        results = [_ingest(store, make_instance(tmp_path / f"{i}.dcm", series_uid=series,
                                                study_uid="1.2.3", instance_number=i + 1,
                                                images_in_acquisition=3)) for i in range(3)]
        assert [r.job is not None for r in results] == [False, False, True]
        assert results[-1].job.series_version == 1  # type: ignore[union-attr]
        assert store.complete_quiet_series(T0 + timedelta(hours=1)) == []


def test_late_instance_opens_new_version_that_supersedes(tmp_path: Path, clock: Clock) -> None:
    with _store(tmp_path, clock) as store:
        series = generate_uid()
        _ingest(store, make_instance(tmp_path / "a.dcm", series_uid=series, study_uid="1.2.3",
                                     instance_number=1))
        (v1,) = store.complete_quiet_series(T0 + timedelta(seconds=10))
        clock.now = T0 + timedelta(seconds=20)
        late = _ingest(store, make_instance(tmp_path / "b.dcm", series_uid=series,
                                            study_uid="1.2.3", instance_number=2))
        assert late.series_version == 2
        (v2,) = store.complete_quiet_series(T0 + timedelta(seconds=30))
        assert v2.series_version == 2
        assert store.get_job(v1.id).state is JobState.SUPERSEDED
        assert store.job_superseded_by(v1.id) == v2.id
        assert store.series_ref(series).instance_count == 2
        (summary,) = store.studies()
        assert summary.series[0].version == 2 and summary.series[0].job_id == v2.id


def test_duplicate_policies(tmp_path: Path, clock: Clock) -> None:
    sop, series = generate_uid(), generate_uid()
    first = make_instance(tmp_path / "1.dcm", sop_uid=sop, series_uid=series, instance_number=1)
    second = make_instance(tmp_path / "2.dcm", sop_uid=sop, series_uid=series,
                           instance_number=2)
    with _store(tmp_path / "replace", clock) as store:
        assert _ingest(store, first).outcome is IngestOutcome.STORED
        r = _ingest(store, second)
        assert r.outcome is IngestOutcome.REPLACED
        (ref,) = store.series_instances(series)
        assert ref.instance_number == 2 and dataset_bytes(ref.path) == dataset_bytes(second)
        assert store.series_ref(series).instance_count == 1
    with _store(tmp_path / "keep", clock, storage={"duplicate_policy": "keep"}) as store:
        _ingest(store, first)
        assert _ingest(store, second).outcome is IngestOutcome.KEPT
        (ref,) = store.series_instances(series)
        assert ref.instance_number == 1 and dataset_bytes(ref.path) == dataset_bytes(first)


def test_reconcile_indexes_orphans_flags_missing_removes_temp(tmp_path: Path,
                                                               clock: Clock) -> None:
    with _store(tmp_path, clock) as store:
        series = generate_uid()
        kept = _ingest(store, make_instance(tmp_path / "k.dcm", series_uid=series,
                                            study_uid="1.2.3", instance_number=1))
        gone = _ingest(store, make_instance(tmp_path / "g.dcm", series_uid=series,
                                            study_uid="1.2.3", instance_number=2))
        # A crash after the atomic rename, before the row was committed:
        orphan_src = make_instance(tmp_path / "o.dcm", series_uid=series, study_uid="1.2.3",
                                   instance_number=3)
        meta = read_meta(orphan_src.read_bytes())
        orphan = store.instance_path(meta)
        orphan.write_bytes(orphan_src.read_bytes())
        tmp_left = orphan.with_name(orphan.name + ".123.456.tmp")
        tmp_left.write_bytes(b"partial")
        junk = orphan.parent / "9.9.9.dcm"
        junk.write_bytes(b"not dicom")
        gone.instance.path.unlink()

        report = store.reconcile()
        assert report.indexed == (orphan,)
        assert report.missing == (gone.instance.sop_instance_uid,)
        assert report.temp_removed == 1 and not tmp_left.exists()
        assert report.unreadable == (junk,)
        refs = store.series_instances(series)
        assert [r.instance_number for r in refs] == [1, 3]
        assert kept.instance.path.exists()
        (summary,) = store.studies("1.2.3")
        assert summary.series[0].missing_files == 1
        # Idempotent: nothing new the second time.
        again = store.reconcile()
        assert again.indexed == () and again.missing == ()


def test_resent_under_other_series_moves_and_stale_copy_is_not_indexed(
        tmp_path: Path, clock: Clock) -> None:
    with _store(tmp_path, clock) as store:
        sop = generate_uid()
        a = _ingest(store, make_instance(tmp_path / "a.dcm", sop_uid=sop, study_uid="1.2.3",
                                         series_uid="1.2.3.1"))
        b = _ingest(store, make_instance(tmp_path / "b.dcm", sop_uid=sop, study_uid="1.2.3",
                                         series_uid="1.2.3.2"))
        assert b.outcome is IngestOutcome.REPLACED
        assert not a.instance.path.exists() and b.instance.path.exists()
        assert store.series_instances("1.2.3.1") == []
        # A crash before the old copy was removed leaves it behind: not re-indexed.
        a.instance.path.write_bytes((tmp_path / "a.dcm").read_bytes())
        report = store.reconcile()
        assert report.indexed == () and report.unreadable == (a.instance.path,)
        (ref,) = store.series_instances("1.2.3.2")
        assert ref.sop_instance_uid == sop
