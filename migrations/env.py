"""Alembic environment for dicomnode.

Run through ``dicomnode db upgrade`` (or ``dicomnode serve``, which applies
pending migrations on start). The engine comes from
``config.attributes['engine']`` when called from the node, else from the
``sqlalchemy.url`` option, else from the node's settings (``--config``/env).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from dicomnode.store.tables import Base

config = context.config
target_metadata = Base.metadata


def _engine():  # type: ignore[no-untyped-def]
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return create_engine(url)
    from dicomnode.config import load_settings
    from dicomnode.store.db import make_engine

    return make_engine(load_settings().database)


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite",
                          compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
