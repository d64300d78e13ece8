"""Alembic is the schema: it migrates an empty database, matches the models, and downgrades."""

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from core.db import Database, alembic_config, current_revision, head_revision, upgrade
from core.tables import Base


def test_models_match_the_migrations(database_url):
    db = Database(database_url)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    db.dispose()
    assert diff == []


def test_upgrade_from_empty_then_downgrade_to_base(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade(url)
    db = Database(url)
    assert current_revision(db.engine) == head_revision()
    assert {"jobs", "job_requests"} <= set(inspect(db.engine).get_table_names())
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}  # every table of ours is gone
    db.dispose()
