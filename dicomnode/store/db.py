"""Database engines and migrations (SQLite or PostgreSQL behind one API).

SQLite runs in WAL mode with a busy timeout and ``synchronous=NORMAL``; every
write transaction starts with ``BEGIN IMMEDIATE`` so that concurrent writers
(several receiving processes, workers) queue on the busy timeout instead of
failing on a lock upgrade. ``synchronous=NORMAL`` can lose the last commits on
power loss (never on a process crash); the instance files themselves are
fsynced before their rows are written, and start-up reconciliation indexes any
file without a row, so an acknowledged instance is never lost.

PostgreSQL is used through psycopg2 with READ COMMITTED; queue claims use
``SELECT ... FOR UPDATE SKIP LOCKED`` (see :mod:`dicomnode.store.queue`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from dicomnode.config import DatabaseConfig
from dicomnode.errors import StoreError
from dicomnode.logs import kv

log = logging.getLogger(__name__)
# Alembic narrates every step at INFO; the node logs what matters itself.
logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

_upgrade_lock = threading.Lock()


def configure_sqlite(dbapi_conn: Any, busy_timeout_ms: int) -> None:
    """Settings every SQLite connection to the store's database gets (the engine's,
    and store/fastrecord.py's own): busy timeout, WAL, synchronous NORMAL, foreign keys."""
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(cfg: DatabaseConfig) -> Engine:
    """Create an engine for ``cfg.url`` with the node's connection settings."""
    try:
        url = make_url(cfg.url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises several types
        raise StoreError(f"database.url: {cfg.url!r} is not a valid URL: {exc}") from None
    kwargs: dict[str, Any] = {"echo": cfg.echo, "future": True}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the driver issues no implicit BEGIN; we emit ours.
        kwargs["connect_args"] = {"isolation_level": None, "check_same_thread": False,
                                  "timeout": cfg.busy_timeout_ms / 1000}
        engine = create_engine(url, **kwargs)
        busy = int(cfg.busy_timeout_ms)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            configure_sqlite(dbapi_conn, busy)

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Writers take the lock up front: no SQLITE_BUSY on upgrade mid-transaction.
            mode = "BEGIN" if conn.info.get("readonly") else "BEGIN IMMEDIATE"
            # Straight on the driver's connection: through exec_driver_sql this
            # statement cost as much Python time as the instance's own rows.
            try:
                conn.connection.driver_connection.execute(mode)
            except sqlite3.Error as exc:  # as SQLAlchemy would raise it (retried by Store)
                raise DBAPIError.instance(mode, (), exc, sqlite3.Error) from exc

        return engine
    if url.get_backend_name() == "postgresql":
        kwargs["pool_pre_ping"] = True
        kwargs["pool_size"] = 5
        kwargs["max_overflow"] = 10
        return create_engine(url, **kwargs)
    # Other backends are not tested; allow them but say so.
    log.warning("untested database backend", extra=kv(backend=url.get_backend_name()))
    kwargs["poolclass"] = NullPool
    return create_engine(url, **kwargs)


def alembic_config(engine_or_url: Engine | str) -> Config:
    """An alembic ``Config`` pointing at ``migrations/``, usable from any working directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if isinstance(engine_or_url, str):
        cfg.set_main_option("sqlalchemy.url", engine_or_url.replace("%", "%%"))
    else:
        cfg.attributes["engine"] = engine_or_url
    return cfg


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    if head is None:
        raise StoreError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Apply pending migrations; return ``(revision before, revision after)``."""
    with _upgrade_lock:
        before = current_revision(engine)
        command.upgrade(alembic_config(engine), revision)
        after = current_revision(engine)
    return before, after or ""


def ensure_schema_current(engine: Engine) -> None:
    """Raise :class:`StoreError` unless the database is at the newest migration."""
    cur = current_revision(engine)
    head = head_revision()
    if cur != head:
        tables = inspect(engine).get_table_names()
        hint = "empty database" if not tables else f"at revision {cur}"
        raise StoreError(
            f"database schema is not current ({hint}, code expects {head}): "
            "run `dicomnode db upgrade`"
        )
