"""How the service connects: what it asks of SQLite and PostgreSQL for durability and for a
database that stops answering."""

from sqlalchemy import text

from core.db import Database


def test_sqlite_commits_reach_the_disk_before_they_return(sqlite_url):
    # synchronous=FULL in WAL mode: every commit syncs the log, so a 202 or a stored result
    # survives a power cut (NORMAL may lose the last commits). Every process connects this way.
    db = Database(sqlite_url)
    with db.read() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert s.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    with db.write() as s:
        assert s.execute(text("PRAGMA synchronous")).scalar() == 2
    db.dispose()


def test_postgresql_bounds_what_a_dead_network_can_cost(postgres_url):
    db = Database(postgres_url)
    with db.read() as s:
        assert s.execute(text("SHOW statement_timeout")).scalar() == "1min"
    raw = db.engine.raw_connection()
    try:
        params = raw.driver_connection.info.get_parameters()
        assert params["connect_timeout"] == "3" and params["keepalives"] == "1"
        assert params["tcp_user_timeout"] == "5000"
    finally:
        raw.close()
    db.dispose()
