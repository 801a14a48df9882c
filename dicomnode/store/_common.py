"""Helpers shared by the store modules (not part of the public API)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite

from dicomnode.store import tables as t

# The Core tables of the ORM models (statements here are built on these).
_TABLES = t.Base.metadata.tables
studies: Table = _TABLES["studies"]
series: Table = _TABLES["series"]
versions: Table = _TABLES["series_versions"]
instances: Table = _TABLES["instances"]
jobs: Table = _TABLES["jobs"]
outputs: Table = _TABLES["job_outputs"]
deliveries: Table = _TABLES["deliveries"]


def utcnow() -> datetime:
    """Naive UTC now, the representation stored in the database."""
    return datetime.now(UTC).replace(tzinfo=None)


def aware(dt: datetime | None) -> datetime | None:
    """Database (naive UTC) -> aware UTC for the domain objects."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def naive(dt: datetime) -> datetime:
    """Aware or naive UTC -> naive UTC for the database."""
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo is not None else dt


def seconds(s: float) -> timedelta:
    return timedelta(seconds=float(s))


def insert_ignore(conn: Connection, table: Table, values: dict[str, Any],
                  conflict: list[str]) -> None:
    """``INSERT ... ON CONFLICT (conflict) DO NOTHING`` on SQLite and PostgreSQL."""
    name = conn.dialect.name
    if name == "postgresql":
        stmt: Any = postgresql.insert(table).values(**values).on_conflict_do_nothing(
            index_elements=conflict)
    elif name == "sqlite":
        stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing(
            index_elements=conflict)
    else:  # pragma: no cover - untested backends: plain insert, caller retries on conflict
        stmt = table.insert().values(**values)
    conn.execute(stmt)
