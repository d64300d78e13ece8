"""The compose stack for real: `docker-compose --profile cpu up` on images built from the project's
Dockerfiles, used only through the published port, as a user would, and broken as production
breaks it (a worker killed, PostgreSQL restarted, the whole stack taken down and brought back).

Run by `make test-compose` (tests/compose/run.sh), which starts the Docker engine, builds the
stand-in base images and the project's images, and stops the engine afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from cli.processes import free_port
from tests.support import ROOT, wait_until

PROJECT = os.environ.get("BATCHGEN_COMPOSE_PROJECT", "batchgen-compose-test")
STANDIN = os.environ.get("BATCHGEN_STANDIN_PREFIX", "batchgen-standin")
FILES = ["-f", "docker-compose.yml", "-f", "tests/compose/fast-recovery.yml"]
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("BATCHGEN_", "POSTGRES_", "COMPOSE_"))},
    "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
    "BATCHGEN_REDIS_IMAGE": f"{STANDIN}/redis:7-alpine",
    "BATCHGEN_POSTGRES_IMAGE": f"{STANDIN}/postgres:16-alpine",
    # Built by run.sh under test tags, so a user's own batchgen-api/batchgen-worker stay as they are.
    "BATCHGEN_API_IMAGE": "batchgen-test/api",
    "BATCHGEN_WORKER_IMAGE": "batchgen-test/worker",
    "BATCHGEN_PORT": str(free_port()),
    "FLOWER_PORT": str(free_port()),
}
URL = f"http://127.0.0.1:{ENV['BATCHGEN_PORT']}"


def compose(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker-compose", "-p", PROJECT, *FILES, "--profile", "cpu", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc.stdout.strip()


def container(service: str) -> str:
    cid = compose("ps", "-q", service).stdout.strip()
    assert cid, f"no {service} container"
    return cid


def state(service: str, field: str) -> str:
    return docker("inspect", "-f", f"{{{{json .State.{field}}}}}", container(service))


def logs(*services: str) -> str:
    return compose("logs", "--no-color", "--tail", "40", *services, check=False).stdout[-6000:]


def soon(predicate, timeout: float, interval: float = 0.5) -> bool:  # type: ignore[no-untyped-def]
    """``wait_until`` that answers False at the deadline, so the failure can show the logs."""
    try:
        return bool(wait_until(predicate, timeout, interval))
    except TimeoutError:
        return False


def when(value: str) -> datetime:
    """Docker's RFC 3339 times (nanoseconds, trailing zeros cut) as datetimes."""
    stamp = json.loads(value).rstrip("Z")
    head, _, frac = stamp.partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")


def ready() -> bool:
    try:
        if requests.get(f"{URL}/readyz", timeout=5).status_code != 200:
            return False
    except requests.RequestException:
        return False
    return json.loads(state("worker-cpu", "Health"))["Status"] == "healthy"


@pytest.fixture(scope="module")
def stack():
    compose("down", "-v", "--remove-orphans", check=False)  # what an interrupted run left
    try:
        compose("up", "-d", "--no-build", timeout=600)
        if not soon(ready, 240, 1):
            raise AssertionError(f"the stack did not become ready:\n{logs()}")
        yield
    finally:
        compose("down", "-v", "--remove-orphans", check=False, timeout=300)


@pytest.fixture(scope="module")
def key(stack) -> str:
    # As docs/operations.md says: `docker compose exec api batchgen keys create --owner you`.
    out = compose("exec", "-T", "api", "batchgen", "keys", "create", "--owner", "you").stdout
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def http(key) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
    return session


def wait_job(http: requests.Session, job_id: str, timeout: float = 300) -> dict:
    final: dict = {}

    def ended() -> bool:
        body = http.get(f"{URL}/v1/jobs/{job_id}", timeout=10).json()
        final.update(body)
        return body["status"] in ("completed", "failed", "cancelled", "expired")

    if not soon(ended, timeout):
        raise AssertionError(f"job {job_id} did not end: {final}\n{logs('worker-cpu', 'api')}")
    return final


def all_results(http: requests.Session, job_id: str) -> list[dict]:
    return [json.loads(line) for line in http.get(f"{URL}/v1/jobs/{job_id}/results.jsonl", timeout=60).text.splitlines()]


def assert_each_result_stored_once(http: requests.Session, job: dict, n: int) -> None:
    assert job["status"] == "completed" and job["counts"]["succeeded"] == n and job["counts"]["failed"] == 0, job
    results = all_results(http, job["id"])
    assert len(results) == n and len({r["id"] for r in results}) == n
    assert [r["index"] for r in results] == list(range(n))
    assert all(r["status"] == "succeeded" for r in results)
    # Usage is counted once per request: the job's totals are the sums of what was stored.
    assert job["usage"]["completion_tokens"] == sum(r["completion_tokens"] for r in results)
    assert job["usage"]["prompt_tokens"] == sum(r["prompt_tokens"] for r in results)


def long_job(http: requests.Session, n: int) -> dict:
    resp = http.post(f"{URL}/v1/jobs", timeout=30, json={
        "model": "demo", "prompts": [f"Write a long story number {i} about the sea." for i in range(n)],
        "params": {"max_new_tokens": 96, "min_new_tokens": 96}})
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_images_run_unprivileged_and_the_api_image_holds_no_model_library():
    for image in (ENV["BATCHGEN_API_IMAGE"], ENV["BATCHGEN_WORKER_IMAGE"]):
        assert docker("image", "inspect", "-f", "{{.Config.User}}", image) == "batchgen"
        size = int(docker("image", "inspect", "-f", "{{.Size}}", image))
        print(f"\nimage {image}: {size / 1e6:.0f} MB")
    for library in ("ctranslate2", "transformers", "torch"):
        probe = subprocess.run(["docker", "run", "--rm", "--network", "none", ENV["BATCHGEN_API_IMAGE"], "python", "-c",
                                f"import {library}"], capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (library, probe.stderr)
    # The serving worker has CTranslate2 and no PyTorch (that lives in the convert target only).
    probe = subprocess.run(["docker", "run", "--rm", "--network", "none", ENV["BATCHGEN_WORKER_IMAGE"], "python", "-c",
                            "import ctranslate2, tokenizers, transformers\ntry:\n import torch\nexcept ImportError:"
                            "\n print('no torch')"], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "no torch", probe.stderr[-2000:]


def test_the_readme_first_job(stack, http):
    for service in ("api", "worker-cpu", "flower"):
        uid = compose("exec", "-T", service, "id", "-u").stdout.strip()
        assert uid != "0", f"{service} runs as root"
    resp = http.post(f"{URL}/v1/jobs", timeout=30, json={
        "model": "demo", "prompts": ["Hello", "Tell me a story"], "params": {"max_new_tokens": 32}})
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "queued" and resp.json()["id"].startswith("job_")
    job = wait_job(http, resp.json()["id"])
    assert_each_result_stored_once(http, job, 2)
    page = http.get(f"{URL}/v1/jobs/{job['id']}/results", timeout=10).json()
    assert [r["prompt"] for r in page["data"]] == ["Hello", "Tell me a story"]
    assert all(r["finish_reason"] in ("length", "stop") and r["completion_tokens"] <= 32 for r in page["data"])
    # Without a key: the envelope, not a page of someone's jobs.
    refused = requests.get(f"{URL}/v1/jobs", timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"]


def test_the_openai_client_batch_flow(stack, key):
    from openai import OpenAI

    client = OpenAI(base_url=f"{URL}/v1", api_key=key, max_retries=0, timeout=30)
    lines = [json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "demo", "max_tokens": 16,
                                  "messages": [{"role": "user", "content": f"Question {i}"}]}})
             for i in range(5)]
    upload = client.files.create(file=("questions.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.request_counts.total == 5

    def done() -> bool:
        nonlocal batch
        batch = client.batches.retrieve(batch.id)
        return batch.status in ("completed", "failed", "cancelled", "expired") and (
            batch.status != "completed" or batch.output_file_id is not None)

    assert wait_until(done, 180, 0.5, what="the batch to end")
    assert batch.status == "completed" and batch.request_counts.completed == 5, batch
    rows = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == [f"q{i}" for i in range(5)]
    for row in rows:
        body = row["response"]["body"]
        assert row["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] <= 16


def test_a_worker_killed_mid_job_is_restarted_and_the_job_completes(stack, http):
    worker = container("worker-cpu")
    restarts = int(docker("inspect", "-f", "{{.RestartCount}}", worker))
    # The worker's main process (the container's first process), as this host sees it; killed
    # from the host as a crash would kill it, not by `docker kill` (which Docker may take for a
    # deliberate stop that restart policies leave alone).
    pid = int(state("worker-cpu", "Pid"))
    assert worker in Path(f"/proc/{pid}/cgroup").read_text(), "the engine's processes are not on this host"
    job = long_job(http, 96)

    def some_stored() -> dict | None:
        counts = http.get(f"{URL}/v1/jobs/{job['id']}", timeout=10).json()["counts"]
        return counts if counts["succeeded"] > 0 else None

    counts = wait_until(some_stored, 120, 0.1, what="the first results")
    os.kill(pid, signal.SIGKILL)
    assert counts["succeeded"] < 96, "the job ended before the kill"

    def restarted() -> bool:
        count = int(docker("inspect", "-f", "{{.RestartCount}}", worker))
        return count > restarts and json.loads(state("worker-cpu", "Running"))

    assert wait_until(restarted, 60, 0.5, what="the restart policy to start the worker again")
    final = wait_job(http, job["id"], timeout=300)
    assert_each_result_stored_once(http, final, 96)


def test_postgres_restarted_mid_job_the_api_says_503_and_the_job_completes(stack, http):
    job = long_job(http, 64)
    codes: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                resp = http.get(f"{URL}/v1/jobs/{job['id']}", timeout=15)
                codes.append(resp.status_code)
                if resp.status_code != 200:
                    assert resp.json()["error"]["code"]  # the envelope, even then
            except requests.RequestException:
                codes.append(-1)
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        time.sleep(1)
        counts = http.get(f"{URL}/v1/jobs/{job['id']}", timeout=10).json()["counts"]
        assert counts["succeeded"] < 64, "the job ended before the restart"
        # Stopped until the API has said 503 at least once, then started again: a restart quicker
        # than the API's connect timeout (3 s) is only a slow answer, never an error, so the
        # outage lasts as long as it takes to see one.
        compose("stop", "postgres", timeout=120)
        wait_until(lambda: 503 in codes, 60, 0.2, what="the API to answer 503 while postgres is away")
        compose("start", "postgres", timeout=120)
        wait_until(lambda: json.loads(state("postgres", "Health"))["Status"] == "healthy", 60, 0.5,
                   what="postgres healthy again")
        n = len(codes)
        wait_until(lambda: len(codes) > n and codes[-1] == 200, 30, 0.2, what="the API to answer 200 again")
    finally:
        stop.set()
        poller.join(30)
    assert 503 in codes, sorted(set(codes))
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert codes[-1] == 200
    final = wait_job(http, job["id"], timeout=300)
    assert_each_result_stored_once(http, final, 64)


def test_down_and_up_keeps_jobs_and_starts_the_api_and_worker_after_migrate(stack, http):
    jobs = http.get(f"{URL}/v1/jobs?limit=100", timeout=10).json()["data"]
    before = {j["id"]: (j["status"], j["counts"]["succeeded"]) for j in jobs}
    assert len(before) >= 4
    results = {job_id: all_results(http, job_id) for job_id in before}
    compose("down", timeout=300)
    assert not compose("ps", "-q").stdout.strip()
    compose("up", "-d", "--no-build", timeout=600)
    assert soon(ready, 240, 1), logs()
    after = {j["id"]: (j["status"], j["counts"]["succeeded"])
             for j in http.get(f"{URL}/v1/jobs?limit=100", timeout=10).json()["data"]}
    assert after == before
    assert {job_id: all_results(http, job_id) for job_id in before} == results
    # The new containers: migrate ran to completion before the API and the worker started.
    migrated = when(state("migrate", "FinishedAt"))
    assert json.loads(state("migrate", "ExitCode")) == 0
    for service in ("api", "worker-cpu"):
        assert when(state(service, "StartedAt")) > migrated, service
    # And the stack still serves: a new job runs.
    resp = http.post(f"{URL}/v1/jobs", timeout=30, json={"model": "demo", "prompts": ["again"],
                                                         "params": {"max_new_tokens": 8}})
    assert_each_result_stored_once(http, wait_job(http, resp.json()["id"]), 1)
