"""Database fixtures for store tests: SQLite in a temp folder, PostgreSQL in a throwaway schema.

PostgreSQL is the local test server (127.0.0.1:5432, user postgres, database
``test``); each use gets its own schema (dropped afterwards) so concurrent test
runs never see each other's rows. Tests skip PostgreSQL cleanly when it is not
reachable.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomnode.config import Settings, load_settings

PG_BASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def postgres_available() -> bool:
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test",
                         connect_timeout=2).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means: not available
        return False


@contextlib.contextmanager
def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped on exit."""
    import psycopg2

    schema = f"dn_test_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.close()


def settings_for(tmp: Path, url: str, **sections: Any) -> Settings:
    overrides: dict[str, Any] = {
        "storage": {"path": str(tmp / "storage"), "min_free_mb": 0},
        "database": {"url": url},
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            overrides.setdefault(k, {}).update(v)
        else:
            overrides[k] = v
    return load_settings(environ={}, overrides=overrides)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Database URL for both backends (PostgreSQL skipped when unreachable)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}"
        return
    if not postgres_available():
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
    with pg_schema_url() as url:
        yield url
