"""A real SQLite write lock held by another connection: the store waits and retries
(general path and store/fastrecord.py alike), and gives up with a StoreError, never a
raw driver exception."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.errors import StoreError
from dicomnode.store import Store, read_meta
from tests.support.receive_db import settings_for
from tests.support.receive_node import make_instance


def _open(tmp: Path) -> Store:
    return Store.open(settings_for(tmp, f"sqlite:///{tmp / 'db.sqlite'}",
                                   database={"busy_timeout_ms": 50}), migrate=True)


def _instances(tmp: Path, n: int) -> list[bytes]:
    study, series = generate_uid(), generate_uid()
    return [make_instance(tmp / "src" / f"{i}.dcm", study_uid=study, series_uid=series,
                          instance_number=i + 1).read_bytes() for i in range(n)]


def _hold_lock(db: Path, seconds: float) -> threading.Thread:
    held = threading.Event()

    def hold() -> None:
        c = sqlite3.connect(db, isolation_level=None)
        c.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        c.execute("ROLLBACK")
        c.close()

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    return t


def test_a_briefly_held_lock_is_waited_out(tmp_path: Path) -> None:
    data = _instances(tmp_path, 3)
    with _open(tmp_path) as store:
        store.ingest(read_meta(data[0]), data[0])  # new series: general path
        t = _hold_lock(tmp_path / "db.sqlite", 0.3)
        store.ingest(read_meta(data[1]), data[1])  # fast path, retried past the lock
        t.join()
        t = _hold_lock(tmp_path / "db.sqlite", 0.3)
        assert store.enqueue(str(read_meta(data[0]).series_uid)) is not None  # general path
        t.join()
        store.ingest(read_meta(data[2]), data[2])
        assert len(store.series_instances(read_meta(data[0]).series_uid)) == 3


@pytest.mark.parametrize("first_of_series", [True, False])
def test_a_lock_held_too_long_is_a_store_error(tmp_path: Path, first_of_series: bool) -> None:
    data = _instances(tmp_path, 2)
    with _open(tmp_path) as store:
        if not first_of_series:
            store.ingest(read_meta(data[0]), data[0])
        t = _hold_lock(tmp_path / "db.sqlite", 6.0)
        try:
            with pytest.raises(StoreError, match="locked"):
                store.ingest(read_meta(data[1]), data[1])
        finally:
            t.join()
