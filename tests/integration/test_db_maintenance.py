"""``dicomnode db backup`` (SQLite online backup while a real node receives) and
``dicomnode db check`` (rows and files agree; problems found and named)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine

from dicomnode.errors import StoreError
from dicomnode.store import db as store_db
from dicomnode.store import maintenance
from tests.support.peers import dcmtk
from tests.support.receive_node import make_instance, node_running


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", "db", *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)


def _series(folder: Path, n: int) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    return [make_instance(folder / f"{i}.dcm", study_uid=study, series_uid=series,
                          instance_number=i) for i in range(1, n + 1)]


def test_backup_while_receiving_and_check(tmp_path: Path) -> None:
    work = tmp_path / "node"
    batches = [_series(tmp_path / f"in{b}", 40) for b in range(3)]
    with node_running(work) as node:
        cfg = node.config_path
        errors: list[str] = []

        def send() -> None:
            for files in batches:
                r = dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                          *map(str, files))
                if r.returncode:
                    errors.append(r.stderr)

        sender = threading.Thread(target=send)
        sender.start()
        backups = []
        while sender.is_alive() or not backups:
            dest = tmp_path / f"backup-{len(backups)}.db"
            r = _cli(cfg, "backup", str(dest))
            assert r.returncode == 0, r.stderr
            assert "backup written" in r.stdout and "integrity ok" in r.stdout
            backups.append(dest)
        sender.join()
        assert not errors
        # every copy is a complete, current database on its own
        for dest in backups:
            con = sqlite3.connect(dest)
            try:
                assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
                rev = con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
                n = con.execute("SELECT count(*) FROM instances").fetchone()[0]
            finally:
                con.close()
            assert rev == store_db.head_revision()
            assert 0 <= n <= 120
            assert not (dest.parent / f".{dest.name}.partial").exists()
        last = tmp_path / "final.db"
        assert _cli(cfg, "backup", str(last)).returncode == 0
        con = sqlite3.connect(last)
        assert con.execute("SELECT count(*) FROM instances").fetchone()[0] == 120
        con.close()

        r = _cli(cfg, "backup", str(last))
        assert r.returncode == 2 and "exists already (--overwrite replaces it)" in r.stderr
        assert _cli(cfg, "backup", str(last), "--overwrite").returncode == 0
        r = _cli(cfg, "backup", str(work / "dicomnode.db"))
        assert r.returncode == 2 and "live database itself" in r.stderr
        r = _cli(cfg, "backup", str(tmp_path / "nope" / "x.db"))
        assert r.returncode == 2 and "no such folder" in r.stderr
        assert "Traceback" not in r.stderr

        r = _cli(cfg, "check")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "integrity: ok" in r.stdout and "instances 120" in r.stdout
        assert "database and storage agree" in r.stdout

    # damage: a file removed, a stray file without a row, checked while stopped
    storage = work / "storage"
    stored = sorted(storage.rglob("*.dcm"))
    stored[0].unlink()
    stray = stored[1].parent / f"{generate_uid()}.dcm"
    shutil.copy(stored[1], stray)
    r = _cli(cfg, "check", "--json")
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    found = {p["check"]: p for p in rep["problems"]}
    assert found["instance rows whose file is gone (not yet flagged)"]["count"] == 1
    assert found["instance files without a row (indexed at the next start)"]["count"] == 1
    assert str(stray.relative_to(storage)) in \
        found["instance files without a row (indexed at the next start)"]["examples"]
    r = _cli(cfg, "check")
    assert r.returncode == 1 and r.stdout.count("PROBLEM ") == 2


def test_backup_of_postgresql_says_pg_dump(tmp_path: Path) -> None:
    engine = create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    try:
        with pytest.raises(StoreError, match="pg_dump --format=custom"):
            maintenance.backup(engine, tmp_path / "x.db")
    finally:
        engine.dispose()
