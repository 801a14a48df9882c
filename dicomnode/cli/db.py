"""``dicomnode db upgrade | current``: the database schema (alembic migrations).

Imports of the store, infer and encode packages are made inside the command
functions: every command module is loaded to build the parser, and importing
those packages costs 0.4-0.7 s each (measured), which `dicomnode --help` and
the other commands should not pay.
"""

from __future__ import annotations

import argparse

from dicomnode.cli.common import settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema: upgrade, current")
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dsub.add_parser("upgrade", help="apply pending migrations (safe to repeat)")
    up.add_argument("revision", nargs="?", default="head", help="target revision (default head)")
    up.set_defaults(func=_upgrade)
    cur = dsub.add_parser("current", help="show the database's revision and the newest one")
    cur.set_defaults(func=_current)


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
