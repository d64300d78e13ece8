"""HTTP submit -> Redis -> a real Celery worker process -> CTranslate2 -> SQL -> HTTP poll."""

import json
import time

import pytest
import requests

from tests.conftest import make_key
from tests.support import ApiServer, WorkerProcess, cut_at, wait_until
from webapi import create_app


@pytest.fixture
def stack(make_settings, database_url):
    settings = make_settings(database_url)
    app = create_app(settings)
    api = ApiServer(app, make_key(database_url)).start()
    worker = WorkerProcess(settings, "tiny-chat").start()
    yield api, worker
    worker.stop()
    api.stop()
    app.extensions["batchgen"].close()


@pytest.mark.slow
def test_a_job_runs_end_to_end(stack):
    api, worker = stack
    resp = api.http.post(f"{api.url}/v1/jobs", json={
        "model": "tiny-chat", "prompts": ["Hello", "Tell me a story"], "params": {"max_new_tokens": 12}})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "queued" and job["id"].startswith("job_")

    seen = []
    final = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = api.http.get(f"{api.url}/v1/jobs/{job['id']}").json()
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        if body["status"] in ("completed", "failed"):
            final = body
            break
        time.sleep(0.01)
    assert final is not None, worker.log()
    order = ["queued", "running", "completed"]
    assert seen == sorted(seen, key=order.index) and seen[-1] == "completed", seen
    assert final["counts"] == {"total": 2, "queued": 0, "running": 0, "succeeded": 2, "failed": 0,
                               "cancelled": 0, "expired": 0}
    assert final["usage"]["completion_tokens"] > 0
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + final["usage"]["completion_tokens"]
    assert final["started_at"] <= final["completed_at"]

    page = api.http.get(f"{api.url}/v1/jobs/{job['id']}/results?limit=1").json()
    assert page["has_more"] and len(page["data"]) == 1
    rest = api.http.get(f"{api.url}/v1/jobs/{job['id']}/results", params={"after": page["last_id"]}).json()
    results = page["data"] + rest["data"]
    assert [r["index"] for r in results] == [0, 1] and [r["prompt"] for r in results] == ["Hello", "Tell me a story"]
    for r in results:
        assert r["status"] == "succeeded" and r["text"] is not None
        # Random weights may emit the end token early (finish_reason "stop"), even at once.
        assert cut_at(r["finish_reason"], r["completion_tokens"], 12)
        assert r["prompt_tokens"] > 0 and r["error"] is None
    assert sum(r["completion_tokens"] for r in results) == final["usage"]["completion_tokens"]


@pytest.mark.slow
def test_chat_requests_and_mixed_params_in_one_job(stack):
    api, worker = stack
    resp = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny", "system": "Answer in one word.", "requests": [
        {"custom_id": "chat", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                           {"role": "user", "content": "Again?"}]},
        {"custom_id": "plain", "prompt": "Once upon a time", "params": {"max_new_tokens": 5, "temperature": 0}},
        {"custom_id": "greedy", "prompt": "In the beginning", "params": {"max_new_tokens": 6, "temperature": 0}},
    ]})
    assert resp.status_code == 202, resp.text
    final = api.wait_for_job(resp.json()["id"])
    assert final["status"] == "completed", worker.log()
    assert final["counts"]["succeeded"] == 3 and final["counts"]["failed"] == 0
    results = {r["custom_id"]: r for r in api.http.get(f"{api.url}/v1/jobs/{final['id']}/results").json()["data"]}
    assert results["chat"]["status"] == "succeeded" and results["chat"]["messages"][2]["content"] == "Again?"
    assert cut_at(results["plain"]["finish_reason"], results["plain"]["completion_tokens"], 5)
    assert cut_at(results["greedy"]["finish_reason"], results["greedy"]["completion_tokens"], 6)
    done = api.http.get(f"{api.url}/v1/jobs/{final['id']}/results", params={"status": "succeeded"}).json()
    assert [r["custom_id"] for r in done["data"]] == ["chat", "plain", "greedy"]
    assert api.http.get(f"{api.url}/v1/jobs/{final['id']}/results", params={"status": "failed"}).json()["data"] == []


@pytest.mark.slow
def test_follow_a_running_job_with_events_then_download_its_results(stack):
    api, worker = stack
    job = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny", "prompts": [f"p{i}" for i in range(6)],
                                                    "params": {"max_new_tokens": 8}}).json()
    with api.http.get(f"{api.url}/v1/jobs/{job['id']}/events", stream=True, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = []
        for block in resp.iter_lines(delimiter=b"\n\n"):
            lines = block.decode().split("\n")
            if lines[0].startswith("event:"):
                events.append((lines[0][7:], json.loads(lines[1][6:])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "end" and set(kinds[:-1]) == {"progress"}
    final = events[-1][1]
    assert final["status"] == "completed" and final["counts"]["succeeded"] == 6, worker.log()
    done = [body["counts"]["succeeded"] for _, body in events]
    assert done == sorted(done)  # progress only moves forward
    lines = api.http.get(f"{api.url}/v1/jobs/{job['id']}/results.jsonl").text.splitlines()
    assert [json.loads(x)["index"] for x in lines] == list(range(6))
    assert all(json.loads(x)["status"] == "succeeded" for x in lines)


def read_events(blocks, until):
    """(event, body) pairs from the blocks of a server-sent event stream (one iterator, read on
    from call to call), until ``until(events)`` is true."""
    events = []
    for block in blocks:
        lines = block.decode().split("\n")
        if lines[0].startswith("event:"):
            events.append((lines[0][7:], json.loads(lines[1][6:])))
            if until(events):
                return events
    raise AssertionError(f"the stream ended first: {events}")


@pytest.mark.slow
def test_follow_all_jobs_of_a_key_with_one_stream(stack, database_url):
    api, worker = stack
    ended = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny", "prompts": ["before"],
                                                      "params": {"max_new_tokens": 2}}).json()
    api.wait_for_job(ended["id"])
    other = requests.Session()
    other.headers["Authorization"] = f"Bearer {make_key(database_url, owner='bob')}"
    with api.http.get(f"{api.url}/v1/jobs/events", stream=True, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        # First what is active or ended in the last minute: the job that just ended.
        blocks = resp.iter_lines(delimiter=b"\n\n")
        first = read_events(blocks, lambda ev: any(b["id"] == ended["id"] for _, b in ev))
        assert first[-1][1]["status"] == "completed"
        theirs = other.post(f"{api.url}/v1/jobs", json={"model": "tiny", "prompts": ["not yours"]}).json()
        job = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny", "prompts": [f"p{i}" for i in range(6)],
                                                        "params": {"max_new_tokens": 8}}).json()
        events = read_events(blocks, lambda ev: ev[-1][1]["id"] == job["id"] and ev[-1][1]["status"] == "completed")
    seen = [b for _, b in events]
    assert {k for k, _ in events} == {"progress"}
    assert theirs["id"] not in {b["id"] for _, b in first + events}  # another key's jobs are not shown
    mine = [b for b in seen if b["id"] == job["id"]]
    done = [b["counts"]["succeeded"] for b in mine]
    assert done == sorted(done) and done[-1] == 6, worker.log()
    assert len(mine) == len({(b["status"], json.dumps(b["counts"]), json.dumps(b["usage"])) for b in mine})  # changes only
    other.close()


@pytest.mark.slow
def test_two_workers_share_one_job_each_request_runs_once_and_one_scrape_sees_both(make_settings, sqlite_url):
    import re

    from prometheus_client.parser import text_string_to_metric_families
    from sqlalchemy import select

    from core.db import Database
    from core.tables import JobRequest

    settings = make_settings(sqlite_url)
    app = create_app(settings)
    api = ApiServer(app, make_key(sqlite_url)).start()
    # Small prefetch so that neither worker takes the whole job at once.
    workers = [WorkerProcess(settings, "tiny-chat", "--max-batch-size", "2", "--inflight", "4").start()
               for _ in range(2)]
    db = Database(sqlite_url)
    try:
        job = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny", "prompts": [f"p{i}" for i in range(40)],
                                                        "params": {"max_new_tokens": 60, "min_new_tokens": 60}}).json()
        assert api.wait_for_job(job["id"], timeout=120)["counts"]["succeeded"] == 40
        with db.read() as s:
            rows = list(s.scalars(select(JobRequest).where(JobRequest.job_id == job["id"])))
        assert all(r.attempts == 1 and r.status == "succeeded" for r in rows)  # each ran once
        stored_runs = {r.run_id for r in rows}
        ran = [set(re.findall(r"batch (run_\w+):", w.log())) for w in workers]
        assert ran[0] and ran[1], "both workers should have run batches of the job"
        assert not ran[0] & ran[1] and ran[0] | ran[1] == stored_runs

        def worker_batches() -> dict[str, float]:
            text = api.http.get(f"{api.url}/metrics").text
            return {s.labels["process"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "batchgen_batch_size_count" and s.labels.get("process", "").startswith("worker:")}

        # Each worker's batch count, as /metrics shows it, is the number of batches its log shows.
        ran_counts = sorted([len(ran[0]), len(ran[1])])
        seen = wait_until(lambda: sorted(worker_batches().values()) == ran_counts and worker_batches(), 20, 0.5,
                          "both workers' batches in one scrape")
        assert len(seen) == 2 and sum(seen.values()) == len(ran[0] | ran[1])
    finally:
        for w in workers:
            w.stop()
        api.stop()
        db.dispose()
        app.extensions["batchgen"].close()
