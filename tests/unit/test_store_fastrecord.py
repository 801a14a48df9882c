"""store/fastrecord.py leaves exactly the rows series.record_instance leaves (SQLite)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import text

from dicomnode.store import Store, read_meta
from dicomnode.store.parse import InstanceMeta
from tests.support.receive_db import settings_for
from tests.support.receive_node import make_instance

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=7)
        return self.now


def _script(tmp: Path) -> list[tuple[InstanceMeta, bytes]]:
    """Every case of the bookkeeping, in one order: new study/series, more instances,
    a duplicate in the same series, an instance moving to another series, an expected
    count completing a version, a late instance opening the next version."""
    study, s1, s2, s3 = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    out: list[tuple[InstanceMeta, bytes]] = []

    def add(series: str, i: int, *, sop: str | None = None, expected: int | None = None) -> str:
        sop = sop or generate_uid()
        p = make_instance(tmp / "src" / f"{len(out)}.dcm", study_uid=study, series_uid=series,
                          sop_uid=sop, instance_number=i, images_in_acquisition=expected)
        data = p.read_bytes()
        out.append((read_meta(data).with_peer("SCU", "DICOMNODE"), data))
        return sop

    first = add(s1, 1)
    for i in range(2, 6):
        add(s1, i)
    add(s1, 1, sop=first)  # duplicate within the series: replaced, not counted twice
    moved = add(s1, 6)
    add(s2, 1)
    add(s2, 2, sop=moved)  # the same SOP Instance UID now in another series
    for i in range(1, 4):
        add(s3, i, expected=3)  # the third completes version 1 by count
    add(s3, 4, expected=3)  # late: version 2
    add(s3, 5, expected=3)
    return out


def _rows(store: Store) -> dict[str, list[Any]]:
    with store.engine.connect() as c:
        return {
            "instances": [tuple(r) for r in c.execute(text(
                "SELECT i.sop_instance_uid, s.series_uid, i.version, i.sop_class_uid, "
                "i.transfer_syntax_uid, i.instance_number, i.path, i.size, i.calling_aet, "
                "i.received_at, i.file_missing FROM instances i JOIN series s "
                "ON s.id = i.series_id ORDER BY i.sop_instance_uid"))],
            "versions": [tuple(r) for r in c.execute(text(
                "SELECT s.series_uid, v.version, v.state, v.instance_count, v.expected_count, "
                "v.first_received_at, v.last_received_at, v.completed_by FROM series_versions v "
                "JOIN series s ON s.id = v.series_id ORDER BY s.series_uid, v.version"))],
            "jobs": [tuple(r) for r in c.execute(text(
                "SELECT series_uid, series_version, state FROM jobs "
                "ORDER BY series_uid, series_version"))],
        }


def _run(tmp: Path, script: list[tuple[InstanceMeta, bytes]], fast: bool) -> tuple[Any, int]:
    store = Store.open(settings_for(tmp, f"sqlite:///{tmp / 'db.sqlite'}"), migrate=True,
                       clock=Clock())
    assert store._fast is not None
    used = 0
    original = store._fast.record

    def counting(*a: Any, **k: Any) -> Any:
        nonlocal used
        r = original(*a, **k)
        used += r is not None
        return r

    if fast:
        store._fast.record = counting  # type: ignore[method-assign]
    else:
        store._fast = None
    try:
        for meta, data in script:
            store.ingest(replace(meta), data)
        rows = _rows(store)
    finally:
        store.close()
    # Paths are relative to each store's root: identical.
    return rows, used


def test_fast_and_general_paths_leave_identical_rows(tmp_path: Path) -> None:
    script = _script(tmp_path)
    general, _ = _run(tmp_path / "general", script, fast=False)
    fast, used = _run(tmp_path / "fast", script, fast=True)
    assert used >= 5, "the common case must actually take the fast path"
    assert fast == general
    # The script did reach the general-only cases: completion by count, later versions.
    assert general["jobs"] and any(v[1] >= 2 for v in general["versions"])
