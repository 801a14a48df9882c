"""Migrations are the schema's only source: upgrade from empty, and models == migrations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from dicomnode.errors import StoreError
from dicomnode.store import Store, db
from dicomnode.store.tables import Base
from tests.support import receive_db
from tests.support.receive_db import settings_for

db_url = receive_db.db_url  # fixture: SQLite and PostgreSQL


def test_upgrade_from_empty_matches_models(tmp_path: Path, db_url: str) -> None:
    settings = settings_for(tmp_path, db_url)
    engine = db.make_engine(settings.database)
    try:
        assert db.current_revision(engine) is None
        before, after = db.upgrade(engine)
        assert before is None and after == db.head_revision()
        assert db.upgrade(engine) == (after, after)  # idempotent
        tables = set(inspect(engine).get_table_names())
        assert {"studies", "series", "series_versions", "instances", "jobs", "job_outputs",
                "deliveries"} <= tables
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(
                conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
    finally:
        engine.dispose()


def test_store_refuses_stale_schema(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        Store.open(settings)
        raise AssertionError("opened a store without schema")
    except StoreError as exc:
        assert "dicomnode db upgrade" in str(exc)


def test_cli_db_upgrade_from_any_cwd(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")},
           "DICOMNODE_DATABASE__URL": url}
    run = [sys.executable, "-m", "dicomnode", "db"]
    up = subprocess.run([*run, "upgrade"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    assert "upgraded from empty to" in up.stdout
    cur = subprocess.run([*run, "current"], cwd="/", env=env, capture_output=True, text=True,
                         timeout=120)
    assert cur.returncode == 0 and "(current)" in cur.stdout, cur.stdout + cur.stderr
