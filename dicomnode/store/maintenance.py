"""Database maintenance: an online backup of the SQLite file, and a read-only check
that the database and the storage folder agree (``dicomnode db backup | check``).

Both run beside a serving node. The backup uses SQLite's online backup API, which
copies a consistent snapshot (WAL content included) page by page while writers
go on; the copy is written under a temporary name, flushed, checked with
``PRAGMA integrity_check`` and only then renamed to its final name. PostgreSQL
databases are backed up with ``pg_dump`` (the error says how).

The check changes nothing: it reports, and ``dicomnode serve`` start-up
reconciliation (:meth:`dicomnode.store.Store.reconcile`) is what repairs.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, func, select

from dicomnode.errors import StoreError
from dicomnode.store import files
from dicomnode.store._common import deliveries, instances, jobs, outputs, series, studies, versions

#: How many pages the backup copies per step (4 KiB pages: 4 MiB), yielding between
#: steps so that the node's writers are not held up.
BACKUP_PAGES_PER_STEP = 1024


@dataclass(frozen=True)
class BackupReport:
    path: Path
    bytes: int
    integrity: str


@dataclass(frozen=True)
class Finding:
    """One problem the check found: what, how many, and a few examples."""

    check: str
    count: int
    examples: tuple[str, ...] = ()

    def __str__(self) -> str:
        more = f" (e.g. {', '.join(self.examples)})" if self.examples else ""
        return f"{self.check}: {self.count}{more}"


@dataclass
class CheckReport:
    """Everything :func:`check` looked at: counts per table and the problems found."""

    integrity: str
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def sqlite_path(engine: Engine) -> Path | None:
    """The database file of a SQLite engine (``None`` for other databases)."""
    if engine.dialect.name != "sqlite" or not engine.url.database:
        return None
    return Path(engine.url.database)


def backup(engine: Engine, dest: Path, *, overwrite: bool = False,
           progress: Callable[[int, int], None] | None = None) -> BackupReport:
    """Copy the live SQLite database to ``dest`` (see the module docstring)."""
    src_path = sqlite_path(engine)
    if src_path is None:
        raise StoreError(
            f"database.url is {engine.dialect.name}: back it up with its own tools, e.g. "
            "`pg_dump --format=custom --file=FILE DBNAME` for PostgreSQL (restore with "
            "pg_restore); `dicomnode db backup` copies SQLite databases")
    dest = Path(dest)
    if dest.resolve() == src_path.resolve():
        raise StoreError(f"{dest}: that is the live database itself; give another file")
    if dest.exists() and not overwrite:
        raise StoreError(f"{dest}: exists already (--overwrite replaces it)")
    if not dest.parent.is_dir():
        raise StoreError(f"{dest.parent}: no such folder")
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.unlink(missing_ok=True)
    raw = engine.raw_connection()
    try:
        src = raw.driver_connection
        if not isinstance(src, sqlite3.Connection):  # pragma: no cover - pysqlite only
            raise StoreError("db backup: the SQLite driver is not the standard sqlite3")
        out = sqlite3.connect(tmp)
        try:
            def step(_status: int, remaining: int, total: int) -> None:
                if progress is not None:
                    progress(total - remaining, total)

            src.backup(out, pages=BACKUP_PAGES_PER_STEP, progress=step, sleep=0.005)
            integrity = str(out.execute("PRAGMA integrity_check").fetchone()[0])
            # A single file, independent of the source's journal mode.
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()
    except sqlite3.Error as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"db backup to {dest} failed: {exc}") from None
    finally:
        raw.close()
    if integrity != "ok":
        tmp.unlink(missing_ok=True)
        raise StoreError(f"db backup: the copy fails its integrity check ({integrity}); the "
                         "live database may be damaged: run `dicomnode db check`")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    files.fsync_dir(dest.parent)
    return BackupReport(dest, dest.stat().st_size, integrity)


def _examples(rows: list[str], n: int = 3) -> tuple[str, ...]:
    return tuple(rows[:n])


def check(conn: Connection, root: Path) -> CheckReport:
    """Read-only consistency check of the database and the storage folder ``root``."""
    if conn.dialect.name == "sqlite":
        integrity = "; ".join(str(r[0]) for r in conn.exec_driver_sql("PRAGMA integrity_check"))
        fk = list(conn.exec_driver_sql("PRAGMA foreign_key_check"))
    else:
        integrity = f"not checked on {conn.dialect.name} (use its own tools, e.g. amcheck)"
        fk = []
    report = CheckReport(integrity)
    if conn.dialect.name == "sqlite" and integrity != "ok":
        report.problems.append(Finding("SQLite integrity_check", 1, (integrity[:200],)))
    for name, table in (("studies", studies), ("series", series), ("series versions", versions),
                        ("instances", instances), ("jobs", jobs), ("outputs", outputs),
                        ("deliveries", deliveries)):
        report.counts[name] = int(conn.execute(select(func.count()).select_from(table))
                                  .scalar() or 0)
    if fk:
        report.problems.append(Finding("rows referring to a missing row (foreign_key_check)",
                                       len(fk), _examples([f"{r[0]} rowid {r[1]}" for r in fk])))

    def orphans(label: str, child: Table, col: Any, parent: Table, pcol: Any) -> None:
        q = select(child.c.id).where(~col.in_(select(pcol)))
        ids = [str(i) for i in conn.execute(q).scalars()]
        if ids:
            report.problems.append(Finding(label, len(ids), _examples(ids)))

    orphans("series without their study", series, series.c.study_id, studies, studies.c.id)
    orphans("instances without their series", instances, instances.c.series_id, series,
            series.c.id)
    orphans("series versions without their series", versions, versions.c.series_id, series,
            series.c.id)
    orphans("jobs without their series version", jobs, jobs.c.series_version_id, versions,
            versions.c.id)
    orphans("outputs without their job", outputs, outputs.c.job_id, jobs, jobs.c.id)
    orphans("deliveries without their job", deliveries, deliveries.c.job_id, jobs, jobs.c.id)

    rows = {r.path: (r.sop_instance_uid, bool(r.file_missing)) for r in conn.execute(
        select(instances.c.path, instances.c.sop_instance_uid, instances.c.file_missing))}
    on_disk = {str(p.relative_to(root)) for p in files.list_instance_files(root)}
    missing = sorted(rel for rel, (_uid, flagged) in rows.items()
                     if not flagged and rel not in on_disk)
    if missing:
        report.problems.append(Finding("instance rows whose file is gone (not yet flagged)",
                                       len(missing), _examples(missing)))
    flagged = sorted(rel for rel, (_uid, f) in rows.items() if f and rel not in on_disk)
    # Flagged rows whose file the worker moved aside (unreadable): expected, counted.
    quarantined = [rel for rel in flagged
                   if (root / files.quarantine_relpath(rel)).exists()]
    report.counts["quarantined instances"] = len(quarantined)
    flagged = sorted(set(flagged) - set(quarantined))
    if flagged:
        report.problems.append(Finding("instance rows flagged file_missing", len(flagged),
                                       _examples(flagged)))
    unindexed = sorted(on_disk - rows.keys())
    if unindexed:
        report.problems.append(Finding("instance files without a row (indexed at the next "
                                       "start)", len(unindexed), _examples(unindexed)))
    out_missing = sorted(p for p in conn.execute(select(outputs.c.path)).scalars()
                         if not (root / p).exists())
    if out_missing:
        report.problems.append(Finding("result objects whose file is gone", len(out_missing),
                                       _examples(out_missing)))
    return report


__all__ = ["BACKUP_PAGES_PER_STEP", "BackupReport", "CheckReport", "Finding", "backup",
           "check", "sqlite_path"]
