"""The common case of recording a received instance, on SQLite, without SQLAlchemy's
per-statement machinery.

Receiving a CT slice commits one small transaction: look up a previous copy of
the instance, count it into its series' open version, insert (or update) its
row. Through SQLAlchemy Core those three statements and the transaction cost
more Python time than reading, checking and writing the 0.5 MB instance
itself (py-spy, three concurrent senders). :class:`FastRecorder` runs the very
same statements (compiled once from :mod:`dicomnode.store.series`'s SQLAlchemy
constructs, values converted by SQLAlchemy's own bind processors) on
``sqlite3`` connections of its own.

It handles only the common case and says so by returning ``None`` otherwise,
after rolling back: a study or series this process has not seen yet, no open
(``receiving``) version, or an instance that completes its version by count.
:func:`dicomnode.store.series.record_instance` then does the whole thing; it
stays the one description of the bookkeeping (the general twin), and
``tests/unit/test_store_fastrecord.py`` (``test_fast_and_general_paths_leave_identical_rows``)
checks that both leave identical rows. The SQLAlchemy internals it needs (bind
processors of a compiled statement) come from :mod:`dicomnode.compat.sqlalchemy`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from dicomnode.compat.sqlalchemy import positional_binds
from dicomnode.store import db
from dicomnode.store import series as series_mod
from dicomnode.store.parse import InstanceMeta

_INSERT_COLUMNS = ("sop_instance_uid", "series_id", "version", "sop_class_uid",
                   "transfer_syntax_uid", "instance_number", "path", "size", "calling_aet",
                   "received_at", "file_missing")


class _Compiled:
    """One statement compiled for the engine's dialect: SQL text, parameter order and
    the bind processors SQLAlchemy would apply."""

    __slots__ = ("sql", "order", "defaults")

    def __init__(self, stmt: Any, engine: Engine) -> None:
        compiled = stmt.compile(dialect=engine.dialect,
                                column_keys=list(_INSERT_COLUMNS) if stmt.is_insert else None)
        self.sql = compiled.string
        # Literal values in the construct (e.g. state = 'receiving') are bound too.
        self.order, self.defaults = positional_binds(compiled)

    def params(self, values: dict[str, Any]) -> list[Any]:
        v = {**self.defaults, **values}
        return [proc(v[n]) if proc is not None else v[n] for n, proc in self.order]


class FastRecorder:
    """A small pool of sqlite3 connections to the store's database for the common case.

    (Not one per thread: every association is a new thread.)
    """

    KEEP_IDLE = 8

    def __init__(self, engine: Engine, busy_timeout_ms: int) -> None:
        self.path = engine.url.database or ""
        self.busy = busy_timeout_ms
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.sel_old = _Compiled(series_mod._SEL_OLD, engine)
        self.upd_open = _Compiled(series_mod._UPD_OPEN, engine)
        self.ins = _Compiled(series_mod._INS_INSTANCE, engine)
        self.upd_inst = _Compiled(series_mod._UPD_INSTANCE, engine)

    @classmethod
    def for_engine(cls, engine: Engine, busy_timeout_ms: int) -> FastRecorder | None:
        """A recorder when the database is an SQLite file, else ``None``."""
        if engine.dialect.name != "sqlite" or not engine.url.database or \
                engine.url.database == ":memory:":
            return None
        return cls(engine, busy_timeout_ms)

    def _acquire(self) -> sqlite3.Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self.busy / 1000)
        db.configure_sqlite(conn, self.busy)
        return conn

    def _release(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if len(self._idle) < self.KEEP_IDLE and not conn.in_transaction:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            try:
                c.close()
            except sqlite3.Error:
                pass

    def record(self, m: InstanceMeta, *, relpath: str, size: int, now: datetime,
               cache: series_mod.IdCache, use_expected_counts: bool,
               attempts: int = 8) -> series_mod.Recorded | None:
        """Record the instance as :func:`series.record_instance` would, or ``None``
        (nothing written) when this is not the common case."""
        st_id = cache.studies.get(m.study_uid)
        se_id = cache.series.get(m.series_uid)
        if st_id is None or se_id is None:
            return None
        delay = 0.01
        for i in range(attempts):
            conn = self._acquire()
            try:
                return self._tx(conn, m, se_id, relpath, size, now, use_expected_counts)
            except sqlite3.OperationalError as exc:  # locked beyond busy_timeout: retry
                if i == attempts - 1:
                    raise DBAPIError.instance("record instance", (), exc,
                                              sqlite3.Error) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except sqlite3.IntegrityError:
                return None  # a race with another writer: the general path sorts it out
            finally:
                self._release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _tx(self, conn: sqlite3.Connection, m: InstanceMeta, se_id: int, relpath: str,
            size: int, now: datetime,
            use_expected_counts: bool) -> series_mod.Recorded | None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            old = conn.execute(self.sel_old.sql, self.sel_old.params(
                {"b_sop": m.sop_instance_uid})).fetchone()
            inc = 0 if (old is not None and old[2] == se_id) else 1
            r = conn.execute(self.upd_open.sql, self.upd_open.params(
                {"b_sid": se_id, "b_now": now, "b_inc": inc,
                 "b_exp": m.expected_count})).fetchone()
            if r is None:
                conn.execute("ROLLBACK")
                return None  # no open version: record_instance opens one
            _v_id, version, count, expected = r
            if use_expected_counts and expected and count >= expected:
                conn.execute("ROLLBACK")
                return None  # completes the version: record_instance enqueues the job
            values = dict(series_id=se_id, version=version, sop_class_uid=m.sop_class_uid,
                          transfer_syntax_uid=m.transfer_syntax_uid,
                          instance_number=m.instance_number, path=relpath, size=size,
                          calling_aet=m.calling_aet, received_at=now, file_missing=False)
            if old is None:
                conn.execute(self.ins.sql, self.ins.params(
                    {"sop_instance_uid": m.sop_instance_uid, **values}))
            else:
                conn.execute(self.upd_inst.sql, self.upd_inst.params(
                    {"b_id": old[0], **{f"b_{k}": v for k, v in values.items()}}))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return series_mod.Recorded(
            replaced_path=old[1] if old is not None and old[1] != relpath else None,
            was_duplicate=old is not None, version=int(version), job=None)
