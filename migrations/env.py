"""Alembic environment. The URL comes from the caller's config (``core.db.alembic_config``) or,
when run as ``alembic upgrade head`` from the repository root, from ``BATCHGEN_DATABASE_URL``."""

from __future__ import annotations

from alembic import context

from core.db import make_engine, normalize_url
from core.settings import Settings
from core.tables import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return normalize_url(url) if url else Settings.from_env().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = make_engine(_url(), statement_timeout_s=None)  # a migration may take its time
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()  # one-shot: keep no connection around


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # render_as_batch lets later revisions ALTER tables on SQLite (copy-and-move).
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
