"""``dicomnode db upgrade | current | backup FILE | check``: the database schema (alembic
migrations), an online backup, and a consistency check of rows and files.

Imports of the store, infer and encode packages are made inside the command
functions: every command module is loaded to build the parser, and importing
those packages costs 0.4-0.7 s each (measured), which `dicomnode --help` and
the other commands should not pay.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dicomnode.cli.common import settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database: upgrade, current, backup, check")
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dsub.add_parser("upgrade", help="apply pending migrations (safe to repeat)")
    up.add_argument("revision", nargs="?", default="head", help="target revision (default head)")
    up.set_defaults(func=_upgrade)
    cur = dsub.add_parser("current", help="show the database's revision and the newest one")
    cur.set_defaults(func=_current)
    bk = dsub.add_parser("backup", help="online backup of the SQLite database (while serving)",
                         description="Copy the SQLite database with SQLite's online backup API "
                                     "(safe while the node runs), check the copy's integrity, "
                                     "then rename it to FILE. PostgreSQL: use pg_dump.")
    bk.add_argument("file", type=Path, metavar="FILE")
    bk.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    bk.set_defaults(func=_backup)
    ck = dsub.add_parser("check", help="check the database and the storage folder agree",
                         description="Read-only: SQLite integrity and foreign keys, orphaned "
                                     "rows, rows whose file is gone, files without a row. "
                                     "Exit 1 when anything is found.")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(func=_check)


def _upgrade(args: argparse.Namespace) -> int:
    from dicomnode.store import db  # on use, see module docstring

    settings = settings_from_args(args)
    engine = db.make_engine(settings.database)
    try:
        before, after = db.upgrade(engine, args.revision)
    finally:
        engine.dispose()
    url = engine.url.render_as_string(hide_password=True)
    if before == after:
        print(f"{url}: already at revision {after}")
    else:
        print(f"{url}: upgraded from {before or 'empty'} to {after}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from dicomnode.store import db  # on use, see module docstring

    settings = settings_from_args(args)
    engine = db.make_engine(settings.database)
    try:
        cur = db.current_revision(engine)
    finally:
        engine.dispose()
    head = db.head_revision()
    state = "current" if cur == head else "needs `dicomnode db upgrade`"
    print(f"database revision: {cur or 'none (empty)'}; newest: {head} ({state})")
    return 0 if cur == head else 1


def _backup(args: argparse.Namespace) -> int:
    from dicomnode.store import Store  # on use, see module docstring

    settings = settings_from_args(args)
    with Store.open(settings) as store:
        rep = store.backup(args.file, overwrite=args.overwrite)
    print(f"backup written: {rep.path} ({rep.bytes / 1e6:.1f} MB, integrity {rep.integrity})")
    return 0


def _check(args: argparse.Namespace) -> int:
    from dicomnode.store import Store  # on use, see module docstring

    settings = settings_from_args(args)
    with Store.open(settings) as store:
        rep = store.check()
    if args.json:
        print(json.dumps({"ok": rep.ok, "integrity": rep.integrity, "counts": rep.counts,
                          "problems": [{"check": f.check, "count": f.count,
                                        "examples": list(f.examples)} for f in rep.problems]},
                         indent=2))
        return 0 if rep.ok else 1
    print(f"integrity: {rep.integrity}")
    print("rows: " + ", ".join(f"{k} {v}" for k, v in rep.counts.items()))
    for f in rep.problems:
        print(f"PROBLEM {f}")
    print("database and storage agree" if rep.ok else
          f"{len(rep.problems)} problem(s): files without rows and rows without files are "
          "reconciled at the next `dicomnode serve` start")
    return 0 if rep.ok else 1
