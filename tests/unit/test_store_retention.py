"""Retention: purge by age (per calling AE), results, the high-water mark; never what is
still owed; a crash between rows and files never brings purged data back. SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid

from dicomnode.audit import read
from dicomnode.domain import DeliveryState
from dicomnode.store import NewDelivery, Store, read_meta, retention
from dicomnode.store import files as files_mod
from tests.support import receive_db
from tests.support.receive_db import settings_for
from tests.support.receive_node import make_instance

db_url = receive_db.db_url  # fixture: SQLite and PostgreSQL

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _open(tmp: Path, url: str, clock: Clock, **retention_cfg: object) -> Store:
    return Store.open(settings_for(tmp, url, retention=dict(retention_cfg)), migrate=True,
                      clock=clock)


def _study(store: Store, tmp: Path, aet: str = "CT1", n: int = 3) -> tuple[str, str]:
    study, series = generate_uid(), generate_uid()
    for i in range(n):
        p = make_instance(tmp / "in" / f"{series}-{i}.dcm", study_uid=study, series_uid=series,
                          instance_number=i + 1)
        data = p.read_bytes()
        store.ingest(read_meta(data).with_peer(aet, "DICOMNODE"), data)
    return study, series


def _files(store: Store, study: str) -> list[Path]:
    return sorted((store.root / study).rglob("*.dcm")) if (store.root / study).exists() else []


def _done_job(store: Store, series: str, *, deliver: bool = True) -> int:
    """Complete the series, run its job to done with one output and one delivery."""
    job = store.enqueue(series)
    claimed = store.claim_job("w1")
    assert claimed is not None and claimed.id == job.id
    out = store.write_output(job.id, generate_uid(), "1.2.840.10008.5.1.4.1.1.66.4",
                             b"\0" * 128 + b"DICM", kind="seg")
    store.finish_job(job.id, "w1", [out], [NewDelivery("pacs", out)])
    if deliver:
        (d,) = store.list_deliveries(job_id=job.id)
        store.delivery_done(d.id, 0)
    return job.id


def test_age_purge_only_what_is_not_owed(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock, instances_days=3) as store:
        old, old_series = _study(store, tmp_path)
        _done_job(store, old_series)
        clock.advance(1 * DAY)
        owed, owed_series = _study(store, tmp_path)
        job = _done_job(store, owed_series, deliver=False)  # its delivery is pending
        clock.advance(1 * DAY)
        busy, busy_series = _study(store, tmp_path)
        store.enqueue(busy_series)  # a pending job
        clock.advance(1 * DAY)
        fresh, _ = _study(store, tmp_path)  # its series never completes: still receiving
        assert len(_files(store, old)) == 3

        clock.advance(3 * DAY)  # every study is past 3 days now
        dry = store.purge(dry_run=True)
        assert [p.study_uid for p in dry.purged] == [old] and dry.dry_run
        assert len(_files(store, old)) == 3  # a dry run removes nothing

        rep = store.purge()
        assert [(p.what, p.study_uid, p.count) for p in rep.purged] == [("instances", old, 3)]
        assert rep.purged[0].bytes > 0
        assert dict(rep.kept) == {owed: "1 delivery(ies) still to be sent",
                                  busy: "1 job(s) pending or running",
                                  fresh: "a series is still receiving"}
        assert _files(store, old) == [] and not (store.root / old).exists()
        assert len(_files(store, owed)) == 3 and len(_files(store, busy)) == 3
        assert len(_files(store, fresh)) == 3
        studies, _ = store.storage_usage()
        assert old not in {s.study_uid for s in studies}
        assert store.check().ok  # rows and files agree after the purge

        (d,) = store.list_deliveries(job_id=job)
        store.delivery_failed(d.id, "refused", transient=False)  # terminal: nothing owed
        assert [p.study_uid for p in store.purge().purged] == [owed]


def test_per_calling_aet_and_results(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock, instances_days=30,
               per_calling_aet={"CT1": 1, "RESEARCH": 0}, results_days=2) as store:
        ct, ct_series = _study(store, tmp_path, "CT1")
        research, _ = _study(store, tmp_path, "RESEARCH")
        other, other_series = _study(store, tmp_path, "MR1")
        job = _done_job(store, ct_series)
        _done_job(store, other_series)
        (out,) = store.job_outputs(job)
        clock.advance(1.5 * DAY)
        rep = store.purge()
        assert [p.study_uid for p in rep.purged if p.what == "instances"] == [ct]
        assert out.path.exists()  # results are kept 2 days
        clock.advance(400 * DAY)
        rep = store.purge()
        # RESEARCH: 0 = kept forever; MR1: the 30-day default
        assert [p.study_uid for p in rep.purged if p.what == "instances"] == [other]
        results = [p for p in rep.purged if p.what == "results"]
        assert [p.count for p in results] == [1, 1] and results[0].job_id == job
        assert not out.path.exists() and store.job_outputs(job) == []
        assert len(_files(store, research)) == 3


def test_high_water_mark_purges_oldest_first(tmp_path: Path, db_url: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock, high_water_percent=90, low_water_percent=80) as store:
        made = []
        for _ in range(4):
            study, series = _study(store, tmp_path)
            _done_job(store, series)
            made.append(study)
            clock.advance(60)
        held, held_series = _study(store, tmp_path)
        store.enqueue(held_series)
        sizes = {s.study_uid: s.bytes for s in store.storage_usage()[0]}
        # The disk, as the OS would report it: 91 % used of a disk on which freeing two
        # studies' bytes gets below 80 %.
        total = int((sizes[made[0]] + sizes[made[1]]) / 0.11)
        monkeypatch.setattr(retention, "disk_used_percent", lambda _root: 91.0)
        monkeypatch.setattr(files_mod, "disk_usage", lambda _root: (total, 0, 0))
        rep = store.purge()
        assert [p.study_uid for p in rep.purged] == made[:2]  # oldest first, just enough
        assert all("high-water" in p.reason for p in rep.purged)
        monkeypatch.setattr(retention, "disk_used_percent", lambda _root: 50.0)
        assert store.purge().purged == ()
        assert len(_files(store, held)) == 3


def test_interrupted_purge_is_finished_not_reindexed(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    with _open(tmp_path, db_url, clock) as store:
        gone, gone_series = _study(store, tmp_path)
        _done_job(store, gone_series)
        kept, _ = _study(store, tmp_path)
        studies = {s.study_uid: s for s in store.storage_usage()[0]}
        # a purge that committed its rows, then the node died before removing files
        s = studies[gone]
        paths = store._tx(lambda c: retention.take_study(c, s.study_id, s.study_uid))
        assert paths is not None
        retention.write_journal(store.root, paths)
        # a purge whose transaction never committed: its journal names files with rows
        k = studies[kept]
        kept_paths = store._read(lambda c: [str(p.relative_to(store.root)) for p in
                                            _files(store, k.study_uid)])
        retention.write_journal(store.root, kept_paths)
        assert len(_files(store, gone)) == 3
        report = store.reconcile()
        assert report.indexed == ()  # not received again
        assert _files(store, gone) == []
        assert len(_files(store, kept)) == 3
        assert not list((store.root / retention.JOURNAL_DIR).glob("*.json"))


def test_cli_usage_and_purge(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"path": str(tmp_path / "storage"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"}}))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicomnode", "storage", *args,
                               "--config", str(cfg)], capture_output=True, text=True,
                              timeout=120)

    from dicomnode.config import load_settings

    with Store.open(load_settings(cfg, environ={}), migrate=True) as store:
        study, series = _study(store, tmp_path)
        _done_job(store, series)
        held, _ = _study(store, tmp_path)
    r = cli("usage")
    assert r.returncode == 0, r.stderr
    assert f"study {study}" in r.stdout and "no age limit" in r.stdout
    assert "held: a series is still receiving" in r.stdout
    r = cli("purge")
    assert r.returncode == 0 and "nothing to purge (no retention rule is set" in r.stdout
    r = cli("purge", "--older-than", "0", "--dry-run")
    assert f"would purge study {study}: 3 instance(s)" in r.stdout
    assert f"kept study {held}: a series is still receiving" in r.stdout
    r = cli("purge", "--older-than", "0", "--json")
    rep = json.loads(r.stdout)
    assert [p["study_uid"] for p in rep["purged"]] == [study]
    r = cli("purge", "--older-than", "soon")
    assert r.returncode == 2 and "not a number of days" in r.stderr
    trail = [rec for _n, rec, _raw in read(tmp_path / "audit.jsonl") if rec]
    purged = [rec for rec in trail if rec["event"] == "instances-purged"]
    assert [(rec["study_uid"], rec["instances"]) for rec in purged] == [(study, 3)]
    assert purged[0]["source"]["role"] == "cli"
    usage = json.loads(cli("usage", "--json").stdout)
    assert [s["study_uid"] for s in usage["studies"]] == [held]
    assert usage["disk"]["total"] > 0 and not (tmp_path / "storage" / study).exists()
    assert DeliveryState.DONE.value == "done"
