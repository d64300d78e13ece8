"""Fixtures: real Redis, real SQLite and PostgreSQL migrated by Alembic, a real CTranslate2 model.

Isolation from the machine's shared services: Redis is a private server on its own port;
PostgreSQL tests use a database created for this run and dropped at its end; every process a
test starts is stopped by its fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from core.db import Database, upgrade
from core.settings import Settings
from tests.support import (
    PostgresCluster,
    RedisServer,
    create_database,
    drop_database,
    postgres_reachable,
)

TEST_CONTEXT_LENGTH = 256


# --- services ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    url = os.environ.get("BATCHGEN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    if postgres_reachable(url):
        yield url
        return
    try:
        cluster = PostgresCluster()
        url = cluster.start()
    except Exception as exc:  # no server and none can be started here
        if os.environ.get("BATCHGEN_TEST_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"PostgreSQL not reachable and no throwaway cluster could start: {exc}")
    yield url
    cluster.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    url, name = create_database(postgres_admin_url)
    upgrade(url)
    yield url
    drop_database(postgres_admin_url, name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "batchgen.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A fresh, migrated SQLite database for one test."""
    path = tmp_path / "batchgen.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


def _truncate(url: str) -> None:
    db = Database(url)
    with db.write() as session:
        session.execute(text("TRUNCATE job_requests, jobs, webhook_events CASCADE"))
    db.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """Each test twice: on a fresh SQLite database and on an emptied PostgreSQL database."""
    if request.param == "sqlite":
        return sqlite_url
    url = request.getfixturevalue("postgres_url")
    _truncate(url)
    return url


# --- models --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with random weights (int8), written by the builder without PyTorch; the converter's
    own path is tested in tests/worker/test_convert.py and test_builder.py."""
    from worker.builder import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=1)


@pytest.fixture(scope="session")
def registry_file(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """Registry entries for the tiny model as a chat model and as a base model."""
    path = tmp_path_factory.mktemp("registry") / "models.json"
    entries = [
        {"name": "tiny-chat", "path": str(tiny_model), "chat": True, "aliases": ["tiny"],
         "context_length": TEST_CONTEXT_LENGTH, "defaults": {"max_new_tokens": 8}},
        {"name": "tiny-base", "path": str(tiny_model), "chat": False,
         "context_length": TEST_CONTEXT_LENGTH, "defaults": {"max_new_tokens": 8}},
    ]
    path.write_text(json.dumps({"models": entries}))
    return path


# --- settings and app ----------------------------------------------------------------------


@pytest.fixture
def make_settings(tmp_path: Path, redis_server: RedisServer, registry_file: Path):  # type: ignore[no-untyped-def]
    """Settings for this test: its own var dir, the private Redis under its own key prefix."""

    def _make(database_url: str, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "var_dir": tmp_path / "var", "database_url": database_url, "redis_url": redis_server.url,
            "redis_prefix": f"test-{uuid.uuid4().hex[:8]}:", "registry_file": registry_file,
            "models_dir": tmp_path / "models", "max_wait_ms": 5.0, "log_level": "INFO",
            # Fixed batch limits: tests about batching must not depend on this machine's speed
            # (calibration has tests of its own).
            "calibrate": "off",
        }
        values.update(overrides)
        return Settings.model_validate(values)

    return _make


@pytest.fixture
def settings(make_settings, sqlite_url: str) -> Settings:  # type: ignore[no-untyped-def]
    return make_settings(sqlite_url)  # type: ignore[no-any-return]


def make_key(database_url: str, owner: str = "alice", admin: bool = False) -> str:
    """A new API key in that database; returns its token."""
    from core.auth import create_key

    db = Database(database_url)
    with db.write() as session:
        _, token = create_key(session=session, owner=owner, name="test", admin=admin)
    db.dispose()
    return token


@pytest.fixture
def token(settings: Settings) -> str:
    """A key of owner "alice" in the test's database."""
    return make_key(settings.database_url)


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from webapi import create_app

    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    app.extensions["batchgen"].close()


@pytest.fixture
def client(app, token: str):  # type: ignore[no-untyped-def]
    """Flask's test client, sending alice's key."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


def authed(app, token: str):  # type: ignore[no-untyped-def]
    """A test client for ``app`` sending ``token``."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_server, registry_file, sqlite_template):  # type: ignore[no-untyped-def]
    """The API over HTTP with a tiny-chat worker, shared by a module's tests: (api, worker, settings, token)."""
    import uuid

    from tests.support import ApiServer, WorkerProcess
    from webapi import create_app

    var = tmp_path_factory.mktemp("served")
    shutil.copy(sqlite_template, var / "batchgen.db")
    settings = Settings.model_validate({
        "var_dir": var, "database_url": f"sqlite:///{var / 'batchgen.db'}", "redis_url": redis_server.url,
        "redis_prefix": f"test-{uuid.uuid4().hex[:8]}:", "registry_file": registry_file, "max_wait_ms": 5.0,
        "model": "tiny-chat", "calibrate": "off"})
    app = create_app(settings)
    token = make_key(settings.database_url)
    api = ApiServer(app, token).start()
    worker = WorkerProcess(settings, "tiny-chat").start()
    yield api, worker, settings, token
    worker.stop()
    api.stop()
    app.extensions["batchgen"].close()


@pytest.fixture(scope="module")
def openai_stack(served):  # type: ignore[no-untyped-def]
    """The official openai client on ``served``'s API: (client, api, worker)."""
    import openai

    api, worker, _, token = served
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=token, max_retries=0, timeout=60), api, worker
