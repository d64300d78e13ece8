"""The compose stack, without a Docker engine: docker-compose validates the file, and every command
it runs is started here the same way (same arguments; container paths, hosts and ports mapped to
the test's own)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from cli.processes import free_port, wait_for_port
from tests.conftest import make_key
from tests.support import ROOT, wait_until

COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (make test installs it)")


def compose(*args: str, password: str | None = "test-password") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    if password is not None:
        env["POSTGRES_PASSWORD"] = password
    return subprocess.run([COMPOSE or "docker-compose", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


@needs_compose
def test_the_compose_file_is_valid_and_has_no_default_password():
    assert compose("config", "-q").returncode == 0
    refused = compose("config", "-q", password=None)
    assert refused.returncode != 0 and "set POSTGRES_PASSWORD in .env" in refused.stderr
    config = yaml.safe_load(compose("config").stdout)["services"]

    def started_with(profile: str) -> set[str]:  # a service without profiles always starts
        return {name for name, svc in config.items() if profile in svc.get("profiles", [profile])}

    common = {"redis", "postgres", "migrate", "api", "flower"}
    # Each profile starts only what its machine can run: no GPU worker under --profile cpu.
    assert started_with("cpu") == common | {"demo-model", "worker-cpu"}
    assert started_with("gpu") == common | {"worker-gpu0"}
    assert started_with("convert") == common | {"convert"}


@needs_compose
def test_the_stack_is_wired_for_health_order_and_gpus():
    config = yaml.safe_load(compose("--profile", "cpu", "--profile", "gpu", "--profile", "convert",
                                    "config").stdout)["services"]
    for name, service in config.items():
        if name not in ("migrate", "demo-model", "convert"):
            assert "healthcheck" in service, name
            assert service.get("restart") == "unless-stopped", name
    assert config["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert config["worker-gpu0"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = config["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["device_ids"] == ["0"] and gpu["capabilities"] == ["gpu"]
    assert "--device-index" in config["worker-gpu0"]["command"]
    # The one password comes from .env, for the server and the services that connect to it.
    assert config["postgres"]["environment"]["POSTGRES_PASSWORD"] == "test-password"
    assert ":test-password@postgres:" in config["api"]["environment"]["BATCHGEN_DATABASE_URL"]
    for dockerfile in ("docker/api.Dockerfile", "docker/worker.Dockerfile"):
        text = (ROOT / dockerfile).read_text()
        assert "\nUSER batchgen\n" in text, f"{dockerfile} must not run as root"
    assert "ctranslate2" not in (ROOT / "docker/api.Dockerfile").read_text().split("-e .")[1]
    # PyTorch only in the convert image: the serving worker's stage installs no convert extra.
    worker_stage = (ROOT / "docker/worker.Dockerfile").read_text().split("AS convert")[0]
    assert "torch" not in worker_stage.replace("no PyTorch", "") and config["worker-cpu"]["build"]["target"] == "worker"
    assert (ROOT / ".dockerignore").read_text().count(".venv")


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    number = value.rstrip("smh")
    return float(number) * units[value[len(number):]]


@needs_compose
def test_only_the_api_is_published_beyond_this_host_and_it_may_stop_gracefully():
    config = yaml.safe_load(compose("--profile", "cpu", "config").stdout)["services"]
    published = {}
    for name, service in config.items():
        for port in service.get("ports", []):
            if isinstance(port, dict):  # long syntax
                published[name] = port.get("host_ip", "0.0.0.0")
            else:  # "host_ip:published:target/proto"
                published[name] = port.split(":")[0] if port.count(":") == 2 else "0.0.0.0"
    assert published.pop("api") == "0.0.0.0"
    assert published and all(ip == "127.0.0.1" for ip in published.values()), published  # Flower: no auth
    from webapi import gunicorn_conf

    assert "--graceful-timeout" not in config["api"]["command"]  # so gunicorn_conf's holds
    assert _seconds(config["api"]["stop_grace_period"]) > gunicorn_conf.graceful_timeout


@needs_compose
@pytest.mark.slow
def test_every_command_the_compose_file_runs_starts_here_the_same_way(make_settings, sqlite_url, tmp_path):
    config = yaml.safe_load(compose("--profile", "cpu", "--profile", "gpu", "config").stdout)["services"]
    settings = make_settings(sqlite_url, models_dir=tmp_path / "models", registry_file=tmp_path / "models.json")
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    models = str(tmp_path / "models")

    def local(argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            arg = arg.replace("/models", models).replace("/tmp/worker.ready", str(tmp_path / "ready"))
            out.append(arg)
        return [sys.executable, "-m", "cli", *out[1:]] if out[0] == "batchgen" else \
            [sys.executable, *out[1:]] if out[0] == "python" else \
            [str(Path(sys.executable).parent / out[0]), *out[1:]]

    def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(local(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    def started(argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(local(argv), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def stop(proc: subprocess.Popen[bytes]) -> int:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(60)

    # migrate: one shot, the schema at head.
    assert run(config["migrate"]["command"]).returncode == 0
    # demo-model: one shot, builds once.
    first = run(config["demo-model"]["command"], timeout=300)
    assert first.returncode == 0 and (tmp_path / "models" / "demo" / "model.bin").is_file(), first.stderr[-2000:]
    assert "already built" in run(config["demo-model"]["command"]).stdout
    # api: serves, and is ready.
    port = free_port()
    api_cmd = [a.replace("0.0.0.0:8000", f"127.0.0.1:{port}") for a in config["api"]["command"]]
    api = started(api_cmd)
    try:
        wait_for_port("127.0.0.1", port, 30, api)
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/readyz", timeout=10).json()["status"] == "ready"
        # A client following a job while the API stops: its stream ends cleanly (the server process
        # does not hold on to it until it is killed), and the client can reconnect elsewhere.
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {make_key(settings.database_url)}"
        job = http.post(f"{url}/v1/jobs", json={"model": "demo", "prompts": ["still queued"]}, timeout=10).json()
        stream = http.get(f"{url}/v1/jobs/{job['id']}/events", stream=True, timeout=60)
        events = stream.iter_lines()
        assert next(events).startswith(b"retry:") and next(events) == b""
        assert next(events) == b"event: progress"
    finally:
        assert stop(api) == 0
    rest = list(events)  # the stream ended; a cut connection would raise ChunkedEncodingError here
    assert b"event: end" not in rest  # the job did not end: the server did
    # worker-cpu: consumes (its healthcheck is the ready file), stops cleanly on SIGTERM.
    worker = started(config["worker-cpu"]["command"])
    try:
        wait_until(lambda: (tmp_path / "ready").exists() or worker.poll() is not None, 90, what="worker ready")
        assert worker.poll() is None
    finally:
        assert stop(worker) == 0
    # worker-gpu0: the same command; with no GPU here it must say so and stop (exit 2), pinned first.
    gpu = run(config["worker-gpu0"]["command"] + ["--model", "demo"])
    if gpu.returncode != 0:
        assert gpu.returncode == 2 and "pinned to GPU 0" in gpu.stderr and "cannot load demo on cuda:0" in gpu.stderr
    # flower: serves its health check.
    flower_port = free_port()
    flower = started([a.replace("--port=5555", f"--port={flower_port}") for a in config["flower"]["command"]])
    try:
        wait_for_port("127.0.0.1", flower_port, 60, flower)
        assert wait_until(lambda: requests.get(f"http://127.0.0.1:{flower_port}/healthcheck", timeout=5).ok, 30)
    finally:
        flower.send_signal(signal.SIGTERM)
        flower.wait(30)
