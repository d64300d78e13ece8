"""The whole service as `make run` starts it (gunicorn API, Redis, one worker, SQLite), for the
benchmark's ``system`` row, in a temporary directory of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli.up import free_port, gunicorn_argv, redis_server_binary, wait_for_port
from core.db import Database, upgrade
from core.settings import PROJECT_ROOT, Settings


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
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.worker_log = self.dir / "worker.log"

    def start(self) -> Stack:
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        redis = subprocess.Popen([redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.redis_port),
                                  "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
                                 stdout=subprocess.DEVNULL)
        self.procs.append(redis)
        wait_for_port("127.0.0.1", self.redis_port, 20, redis)
        upgrade(self.settings.database_url)
        from core.auth import create_key

        db = Database(self.settings.database_url)
        with db.write() as session:
            _, self.token = create_key(session=session, owner="bench", name="benchmark")
        db.dispose()
        api = subprocess.Popen(gunicorn_argv(bind=f"127.0.0.1:{self.api_port}", workers=self.api_workers),
                               env=env, cwd=PROJECT_ROOT)
        self.procs.append(api)
        ready = self.dir / "worker.ready"
        log = open(self.worker_log, "wb")  # noqa: SIM115 - lives as long as the worker
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--model", self.model_name,
                                   "--ready-file", str(ready), *self.worker_args],
                                  env={**env, "BATCHGEN_LOG_LEVEL": "INFO"}, cwd=PROJECT_ROOT,
                                  stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(worker)
        wait_for_port("127.0.0.1", self.api_port, 30, api)
        deadline = time.monotonic() + 120
        while not ready.exists():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{self.worker_log.read_text()[-4000:]}")
            time.sleep(0.05)
        return self

    def database(self) -> Database:
        return Database(self.settings.database_url)

    @property
    def api_pids(self) -> list[int]:
        """The gunicorn master and its workers."""
        master = self.procs[1].pid
        return [master] + children(master)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
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
