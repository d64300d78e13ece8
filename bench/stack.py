"""The whole service as `make run` starts it (gunicorn API, Redis, one worker, SQLite), for the
benchmark's ``system`` row, in a temporary directory of its own."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.processes import Process, free_port, start_api, start_redis, start_worker
from core.db import Database, upgrade
from core.settings import Settings


class Stack:
    """Redis + migrated database + API + worker for one registered model."""

    def __init__(self, *, model_dir: Path, model_name: str, worker_args: list[str],
                 database_url: str | None = None, api_workers: int = 2, **settings: object) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="batchgen-bench-"))
        self.model_name, self.worker_args, self.api_workers = model_name, worker_args, api_workers
        registry = self.dir / "models.json"
        # The same model again under a name no worker serves: jobs for it only cost the API.
        self.unserved = f"{model_name}-unserved"
        registry.write_text(json.dumps({"models": [
            {"name": name, "path": str(model_dir), "chat": False, "context_length": 4096}
            for name in (model_name, self.unserved)]}))
        self.redis_port = free_port()
        self.api_port = free_port()
        self.settings = Settings.model_validate({
            "var_dir": self.dir, "database_url": database_url or f"sqlite:///{self.dir / 'bench.db'}",
            "redis_url": f"redis://127.0.0.1:{self.redis_port}/0", "registry_file": registry,
            "port": self.api_port, "log_level": "WARNING", **settings,
        })
        self.procs: list[Process] = []
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.worker_log = self.dir / "worker.log"

    def start(self) -> Stack:
        env = {**self.settings.to_env()}
        redis, _ = start_redis(self.dir / "redis", port=self.redis_port)
        self.procs.append(redis)
        upgrade(self.settings.database_url)
        from core.auth import create_key

        db = Database(self.settings.database_url)
        with db.write() as session:
            _, self.token = create_key(session=session, owner="bench", name="benchmark")
        db.dispose()
        self.procs.append(start_api(env, port=self.api_port, workers=self.api_workers,
                                    log_path=self.dir / "api.log"))
        self.procs.append(start_worker({**env, "BATCHGEN_LOG_LEVEL": "INFO"}, self.model_name, *self.worker_args,
                                       log_path=self.worker_log, timeout=120))
        return self

    def database(self) -> Database:
        return Database(self.settings.database_url)

    @property
    def api_pids(self) -> list[int]:
        """The gunicorn master and its workers."""
        master = self.procs[1].pid  # redis, api, worker
        return [master] + children(master)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def children(pid: int) -> list[int]:
    """Direct children of a process (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@contextmanager
def scratch_postgres(admin_url: str) -> Iterator[str]:
    """A database of the bench's own on a PostgreSQL server (the one this machine runs), dropped
    afterwards: the server is left as it was found."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"batchgen_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
