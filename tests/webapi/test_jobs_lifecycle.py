"""The complete jobs API without a worker: list, idempotency, metadata, priority, cancel, delete,
download, events, limits. (Jobs that run are in tests/test_end_to_end.py.)"""

import json
from datetime import datetime

import pytest
from sqlalchemy import func, select

from core.tables import Job, JobRequest
from tests.conftest import authed, make_key
from tests.support import clear_of_minute_boundary, queued_request_ids

TINY = {"model": "tiny", "prompts": ["a", "b"]}


def test_list_is_newest_first_with_cursor_and_status_filter(client):
    ids = [client.post("/v1/jobs", json=TINY).get_json()["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    page = client.get("/v1/jobs?limit=2").get_json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get(f"/v1/jobs?limit=10&after={page['last_id']}").get_json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    assert [j["id"] for j in client.get("/v1/jobs?status=cancelled").get_json()["data"]] == [ids[1]]
    assert client.get("/v1/jobs?status=nope").status_code == 422


def test_idempotency_key_returns_the_same_job(app, client, settings):
    first = client.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "batch-42"})
    again = client.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "batch-42"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["id"] == first.get_json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = client.post("/v1/jobs", json={**TINY, "prompts": ["c"]}, headers={"Idempotency-Key": "batch-42"})
    assert other.status_code == 409 and other.get_json()["error"]["code"] == "conflict"
    bob = authed(app, make_key(settings.database_url, owner="bob"))
    assert bob.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "batch-42"}).status_code == 202
    assert client.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "bad key\u00e9"}).status_code == 422
    with app.extensions["batchgen"].db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 2


def test_metadata_priority_and_window_are_kept(client):
    job = client.post("/v1/jobs", json={**TINY, "metadata": {"project": "x", "run": "7"}, "priority": 8,
                                        "completion_window": "30m"}).get_json()
    assert job["metadata"] == {"project": "x", "run": "7"} and job["priority"] == 8
    created, expires = (datetime.fromisoformat(job[k].replace("Z", "+00:00")) for k in ("created_at", "expires_at"))
    assert (expires - created).total_seconds() == 1800 and job["completion_window"] == "30m"


@pytest.mark.parametrize("extra,loc", [
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"metadata": {"k": 5}}, "metadata.k"),
    ({"priority": 10}, "priority"),
    ({"completion_window": "1y"}, "completion_window"),
    ({"completion_window": "30s"}, "completion_window"),
    ({"params": {"seed": "x"}}, "params.seed"),
])
def test_out_of_bounds_job_fields_are_422(client, extra, loc):
    resp = client.post("/v1/jobs", json={**TINY, **extra})
    assert resp.status_code == 422 and loc in [d["loc"] for d in resp.get_json()["error"]["details"]]


def test_a_seed_is_accepted_as_best_effort(client):
    """Clients such as lm-eval send a seed with every request; it is taken (and documented as not
    making sampling reproducible) rather than failing their whole run."""
    resp = client.post("/v1/jobs", json={**TINY, "params": {"seed": 1234, "max_new_tokens": 4}})
    assert resp.status_code == 202 and resp.get_json()["params"]["seed"] == 1234


def test_higher_priority_jobs_are_queued_ahead(app, client, settings):
    low = client.post("/v1/jobs", json={**TINY, "priority": 1}).get_json()
    high = client.post("/v1/jobs", json={**TINY, "priority": 8}).get_json()
    app.extensions["batchgen"].dispatcher.wait_idle()  # published by the dispatcher's thread
    ids = queued_request_ids(settings, "tiny-chat")
    page = lambda j: [r["id"] for r in client.get(f"/v1/jobs/{j['id']}/results").get_json()["data"]]  # noqa: E731
    assert ids == page(high) + page(low)
    # 9 is the synchronous calls' lane (someone waits on those): a job cannot take it.
    refused = client.post("/v1/jobs", json={**TINY, "priority": 9})
    assert refused.status_code == 422 and refused.get_json()["error"]["details"][0]["loc"] == "priority"


def test_cancel_before_anything_ran(client):
    job = client.post("/v1/jobs", json=TINY).get_json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", json={}).get_json()
    assert cancelled["status"] == "cancelled" and cancelled["counts"]["cancelled"] == 2
    assert cancelled["counts"]["queued"] == 0 and cancelled["cancel_requested_at"]
    assert {r["status"] for r in client.get(f"/v1/jobs/{job['id']}/results").get_json()["data"]} == {"cancelled"}
    assert client.post(f"/v1/jobs/{job['id']}/cancel").get_json()["status"] == "cancelled"  # again: no change


def test_delete_only_what_has_ended(app, client):
    job = client.post("/v1/jobs", json=TINY).get_json()
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 409
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/jobs/{job['id']}").get_json() == {"id": job["id"], "object": "job.deleted",
                                                                 "deleted": True}
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    with app.extensions["batchgen"].db.read() as s:
        assert s.scalar(select(func.count()).select_from(JobRequest)) == 0


def test_results_download_streams_every_request_in_order(client, monkeypatch):
    import webapi.jobs

    monkeypatch.setattr(webapi.jobs, "STREAM_CHUNK", 7)  # several chunks
    job = client.post("/v1/jobs", json={"model": "tiny", "prompts": [f"p{i}" for i in range(30)]}).get_json()
    resp = client.get(f"/v1/jobs/{job['id']}/results.jsonl")
    assert resp.mimetype == "application/jsonl" and job["id"] in resp.headers["Content-Disposition"]
    lines = [json.loads(x) for x in resp.get_data(as_text=True).splitlines()]
    assert [r["index"] for r in lines] == list(range(30)) and lines[3]["prompt"] == "p3"
    client.post(f"/v1/jobs/{job['id']}/cancel")
    cancelled = client.get(f"/v1/jobs/{job['id']}/results.jsonl?status=cancelled").get_data(as_text=True)
    assert len(cancelled.splitlines()) == 30
    assert client.get(f"/v1/jobs/{job['id']}/results.jsonl?status=succeeded").get_data() == b""


def test_events_end_when_the_job_ends(client):
    job = client.post("/v1/jobs", json=TINY).get_json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    resp = client.get(f"/v1/jobs/{job['id']}/events")
    assert resp.mimetype == "text/event-stream"
    events = [block for block in resp.get_data(as_text=True).split("\n\n") if block.startswith("event:")]
    assert [e.split("\n")[0] for e in events] == ["event: progress", "event: end"]
    assert json.loads(events[-1].split("data: ", 1)[1])["status"] == "cancelled"


def test_capacity_limits_answer_429_with_retry_after(make_settings, sqlite_url):
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, max_pending_per_model=3, max_pending_per_key=4))
    client = authed(app, make_key(sqlite_url))
    assert client.post("/v1/jobs", json={"model": "tiny", "prompts": list("ab")}).status_code == 202
    full = client.post("/v1/jobs", json={"model": "tiny", "prompts": list("ab")})  # 4 > 3 for the model
    assert full.status_code == 429 and full.get_json()["error"]["code"] == "queue_full" and full.headers["Retry-After"]
    assert client.post("/v1/jobs", json={"model": "tiny-base", "prompts": list("ab")}).status_code == 202
    busy = client.post("/v1/jobs", json={"model": "tiny-base", "prompts": ["a"]})  # 5 > 4 for the key
    assert busy.status_code == 429 and busy.get_json()["error"]["code"] == "too_many_pending"


def test_caps_weigh_a_request_by_its_samples_and_tokens(make_settings, sqlite_url):
    """A request of 16 samples (or 64 scored continuations) was one request to every cap: a key
    allowed 20 pending requests could queue 20 x 16 samples. Each sample, and each
    ``request_weight_tokens`` of prompt + new tokens, counts now."""
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, max_pending_per_key=20, request_weight_tokens=64,
                                   max_request_new_tokens=128, rate_limit_per_minute=0))
    client = authed(app, make_key(sqlite_url))
    sixteen = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["a"], "params": {"n": 16,
                                                                                       "max_new_tokens": 8}})
    assert sixteen.status_code == 202, sixteen.get_json()
    again = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["a"], "params": {"n": 8, "max_new_tokens": 8}})
    assert again.status_code == 429 and again.get_json()["error"]["code"] == "too_many_pending"  # 16 + 8 > 20
    assert client.post("/v1/jobs", json={"model": "tiny", "prompts": list("abcd")}).status_code == 202  # 16 + 4
    # Tokens count too: about 76 prompt tokens (300 bytes) and 8 new ones are two units of 64.
    other = authed(app, make_key(sqlite_url, owner="bob"))
    assert other.post("/v1/jobs", json={"model": "tiny", "prompts": ["word " * 60] * 10}).status_code == 202
    assert other.post("/v1/jobs", json={"model": "tiny", "prompts": ["word " * 60]}).status_code == 429  # 20 + 2
    assert other.post("/v1/jobs", json={"model": "tiny", "prompts": ["short"]}).status_code == 429  # 20 + 1
    # One request's samples x max_new_tokens has a ceiling.
    carol = authed(app, make_key(sqlite_url, owner="carol"))
    heavy = carol.post("/v1/jobs", json={"model": "tiny", "prompts": ["a"], "params": {"n": 16, "max_new_tokens": 9}})
    assert heavy.status_code == 422 and heavy.get_json()["error"]["details"][0]["type"] == "too_much_work"


def test_rate_limit_per_key_answers_429(make_settings, sqlite_url):
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, rate_limit_per_minute=3))
    client = authed(app, make_key(sqlite_url))
    clear_of_minute_boundary(10)  # requests are counted per clock minute
    codes = [client.get("/v1/jobs").status_code for _ in range(4)]
    limited = client.get("/v1/jobs")
    assert codes[:3] == [200, 200, 200] and limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    other = authed(app, make_key(sqlite_url, owner="bob"))
    assert other.get("/v1/jobs").status_code == 200  # per key


def test_long_calls_past_the_limit_get_429_and_a_closed_stream_frees_its_place(make_settings, sqlite_url):
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, max_long_calls=1))
    client = authed(app, make_key(sqlite_url))
    job = client.post("/v1/jobs", json=TINY).get_json()
    stream = client.get(f"/v1/jobs/{job['id']}/events", buffered=False)
    assert stream.status_code == 200 and next(stream.response).startswith(b"retry:")
    busy = client.get("/v1/jobs/events")  # a second stream in this process: refused at once
    assert busy.status_code == 429 and busy.headers["Retry-After"] == "2"
    assert busy.get_json()["error"]["code"] == "too_many_streams"
    # A synchronous call holds a thread as long: refused too, in its route's shape, storing nothing.
    with app.extensions["batchgen"].db.read() as s:
        jobs_before = s.scalar(select(func.count()).select_from(Job))
    chat = client.post("/v1/chat/completions", json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 429 and chat.get_json()["error"]["code"] == "too_many_streams"
    assert set(chat.get_json()["error"]) == {"message", "type", "param", "code"}
    with app.extensions["batchgen"].db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == jobs_before
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200  # short calls are still served
    stream.close()  # the client went away: its place is free again
    again = client.get("/v1/jobs/events", buffered=False)
    assert again.status_code == 200
    again.close()


def test_a_streamed_completion_never_read_frees_its_place_and_cancels_its_request(make_settings, sqlite_url):
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, max_long_calls=1))
    client = authed(app, make_key(sqlite_url))
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    unread = client.post("/v1/chat/completions", json=body, buffered=False)
    assert unread.status_code == 200
    assert client.post("/v1/chat/completions", json=body).status_code == 429
    unread.close()  # closed before its first chunk: no worker ran it, and none will
    with app.extensions["batchgen"].db.read() as s:
        (status,) = s.execute(select(Job.status)).one()
    assert status == "cancelled"
    second = client.post("/v1/chat/completions", json=body, buffered=False)
    assert second.status_code == 200
    second.close()
