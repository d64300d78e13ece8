"""Engines and sessions: one engine per process, one session per unit of work.

SQLite (the laptop default) gets WAL, a busy timeout and foreign keys so that the API and a
worker can write the same file at once. PostgreSQL URLs may be written ``postgresql://``; they
are pointed at the psycopg 3 driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# A PostgreSQL that stops answering (packets dropped: a partition, a dead host) must cost a
# caller seconds, never a hung thread: connecting gives up after CONNECT_TIMEOUT_S, a connection
# whose data goes unacknowledged for NETWORK_TIMEOUT_S (or that answers no keepalive for about
# that long) is dropped, a checkout waits at most POOL_TIMEOUT_S for a free connection, and the
# server ends any statement after STATEMENT_TIMEOUT_S. Each surfaces as an error the API answers
# with 503 and the worker retries.
CONNECT_TIMEOUT_S = 3
NETWORK_TIMEOUT_S = 5
POOL_TIMEOUT_S = 5.0
STATEMENT_TIMEOUT_S = 60.0


def postgres_connect_args() -> dict[str, object]:
    """libpq connection parameters that bound how long a dead network can hold a caller."""
    return {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "keepalives": 1, "keepalives_idle": NETWORK_TIMEOUT_S, "keepalives_interval": 1, "keepalives_count": 3,
        "tcp_user_timeout": NETWORK_TIMEOUT_S * 1000,
    }


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, pool_size: int = 5, statement_timeout_s: float | None = STATEMENT_TIMEOUT_S) -> Engine:
    """An engine for ``url`` with the connection settings this service relies on
    (``statement_timeout_s=None``: no limit on statements, for migrations)."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # Let SQLAlchemy issue BEGIN itself (see "begin" below); pysqlite's own handling
            # would defer it and break SELECT-then-UPDATE atomicity.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit reaches the disk before it returns (an fsync of the WAL per commit),
            # so a job answered 202 and a stored result survive a power cut; NORMAL could lose
            # the last commits. It costs I/O wait, not CPU (bench/README.md).
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            # A writer takes the write lock up front (IMMEDIATE): two writers then queue on
            # busy_timeout instead of failing when one upgrades a read lock. Readers don't block.
            write = conn.get_execution_options().get("batchgen_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size * 2, pool_pre_ping=True,
                           pool_timeout=POOL_TIMEOUT_S, connect_args=postgres_connect_args())
    if statement_timeout_s:
        # Set per connection rather than as a startup ``options`` parameter: that would replace
        # options given in the URL, and connection poolers (PgBouncer) refuse it.
        @event.listens_for(engine, "connect")
        def _statement_timeout(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT set_config('statement_timeout', %s, false)", (str(int(statement_timeout_s * 1000)),))
            dbapi_conn.commit()

    return engine


class KeptConnection:
    """A write connection one thread keeps between its transactions (the API's group commit, a
    worker's writer): a checkout from the pool costs a round trip of its own on PostgreSQL (the
    pool's ping), and its reset and events cost more than a small transaction's statements.
    ``drop`` it when it may have broken; the next ``get`` opens a fresh one."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Connection | None = None

    def get(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self.db.connection(write=True)
        return self._conn

    def drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:  # it was broken already
                pass
            self._conn = None


def connection_of(unit: Session | Connection) -> Connection:
    """The Core connection of a unit of work: an ORM session's, or the connection itself."""
    return unit if isinstance(unit, Connection) else unit.connection()


class Database:
    """A process's engine and its units of work: ``read()`` and ``write()`` sessions."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(url, pool_size=pool_size)
        self.dialect = self.engine.dialect.name
        # Loaded values stay usable after commit: views serialize after the unit of work ends.
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._write_engine = self.engine.execution_options(batchgen_write=True)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any exception."""
        with self._writer() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only unit of work (whatever it changed is rolled back)."""
        with self._reader() as session:
            yield session

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A read on a Core connection (rolled back at the end): no ORM session to build, for
        reads that run on every poll."""
        with self.engine.connect() as conn:
            yield conn

    def connection(self, *, write: bool = False) -> Connection:
        """A Core connection the caller keeps (and closes): a worker's writer holds one for its
        life (``write``: its transactions take SQLite's write lock up front, as ``write`` does)."""
        return (self._write_engine if write else self.engine).connect()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A write transaction on a Core connection: commits on success, rolls back on any
        exception (on SQLite it takes the write lock up front, as ``write`` does)."""
        with self._write_engine.begin() as conn:
            yield conn

    def dispose(self) -> None:
        """Close pooled connections (after a fork, or at shutdown)."""
        self.engine.dispose()


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    """An Alembic config for ``url`` that needs no alembic.ini on disk."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision`` with Alembic."""
    from alembic import command

    if make_url(url).get_backend_name() == "sqlite":
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The newest revision in ``migrations/``."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head
