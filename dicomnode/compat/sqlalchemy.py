"""SQLAlchemy internals dicomnode relies on (written for SQLAlchemy 2.1.x).

:mod:`dicomnode.store.fastrecord` runs a few statements compiled by SQLAlchemy on
``sqlite3`` connections of its own; to bind values exactly as SQLAlchemy would, it
needs the compiled statement's bind processors and its literal parameters, which
SQLAlchemy keeps private. Called once per statement when the recorder is built, never
per instance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.sql.compiler import SQLCompiler

from dicomnode.compat import require

require("SQLAlchemy", "2.1.")

__all__ = ["BindProcessor", "positional_binds"]

BindProcessor = Callable[[Any], Any]


def positional_binds(compiled: SQLCompiler,
                     ) -> tuple[list[tuple[str, BindProcessor | None]], dict[str, Any]]:
    """``(order, defaults)`` of a statement compiled for a positional (qmark) dialect.

    ``order`` lists the bind parameter names in ``compiled.positiontup`` order, each
    with the processor SQLAlchemy applies to its value before handing it to the
    driver (``compiled._bind_processors``: e.g. a datetime to its SQLite string), or
    ``None``. ``defaults`` are the values bound by the construct itself (literals such
    as ``state = 'receiving'``), from ``compiled.construct_params(_check=False)``: the
    private ``_check`` switch skips the "a required parameter has no value" check,
    since the caller supplies those values per execution.
    """
    procs = compiled._bind_processors
    names = compiled.positiontup or []
    order: list[tuple[str, BindProcessor | None]] = [
        (n, procs.get(n)) for n in names]  # type: ignore[misc]
    defaults = compiled.construct_params(_check=False) or {}
    return order, dict(defaults)
