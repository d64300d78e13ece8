"""The native jobs API through Flask's client: validation, the error envelope, dispatch to Redis."""

import json

import pytest
from sqlalchemy import func, select

from core.tables import Job, JobRequest
from tests.conftest import authed, make_key
from tests.support import queued_request_ids


def job_rows(app):
    with app.extensions["batchgen"].db.read() as s:
        return s.scalar(select(func.count()).select_from(Job)), s.scalar(select(func.count()).select_from(JobRequest))


def assert_envelope(resp, status, code):
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details", "request_id"}
    assert body["error"]["code"] == code and body["error"]["message"]
    assert body["error"]["request_id"] == resp.headers["X-Request-Id"]
    return body["error"]


BAD_JOBS = [
    ("missing model", {"prompts": ["a"]}, 422, "invalid_request", "model"),
    ("unknown model", {"model": "nope", "prompts": ["a"]}, 422, "model_not_found", "model"),
    ("empty prompt list", {"model": "tiny-chat", "prompts": []}, 422, "invalid_request", "prompts"),
    ("empty prompt", {"model": "tiny-chat", "prompts": ["ok", ""]}, 422, "invalid_request", "prompts[1]"),
    ("prompts not a list", {"model": "tiny-chat", "prompts": "hello"}, 422, "invalid_request", "prompts"),
    ("number as string", {"model": "tiny-chat", "prompts": ["a"], "params": {"max_new_tokens": "8"}}, 422,
     "invalid_request", "params.max_new_tokens"),
    ("model not a string", {"model": 7, "prompts": ["a"]}, 422, "invalid_request", "model"),
    ("max_new_tokens beyond context", {"model": "tiny-chat", "prompts": ["a"], "params": {"max_new_tokens": 300}},
     422, "invalid_request", "params.max_new_tokens"),
    ("oversized temperature", {"model": "tiny-chat", "prompts": ["a"], "params": {"temperature": 1e9}}, 422,
     "invalid_request", "params.temperature"),
    ("oversized prompt", {"model": "tiny-chat", "prompts": ["x" * 300_001]}, 422, "invalid_request", "prompts[0]"),
    ("unknown field", {"model": "tiny-chat", "prompts": ["a"], "priority_boost": 1}, 422, "invalid_request",
     "priority_boost"),
    ("prompt too long for the context", {"model": "tiny-chat", "prompts": ["fine", "word " * 300]}, 422,
     "invalid_request", "prompts[1]"),
    ("NUL in a prompt", {"model": "tiny-chat", "prompts": ["ok", "a\u0000b"]}, 422, "invalid_request", "prompts[1]"),
    ("NUL in a message", {"model": "tiny-chat", "requests": [{"messages": [{"role": "user", "content": "\u0000"}]}]},
     422, "invalid_request", "requests[0].messages[0].content"),
    ("chat for base model", {"model": "tiny-base", "requests": [{"messages": [{"role": "user", "content": "x"}]}]},
     422, "invalid_request", "requests[0].messages"),
]


@pytest.mark.parametrize("name,payload,status,code,loc", BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
def test_bad_jobs_get_4xx_envelope_and_write_nothing(app, client, name, payload, status, code, loc):
    resp = client.post("/v1/jobs", json=payload)
    err = assert_envelope(resp, status, code)
    assert loc in [d["loc"] for d in err["details"]]
    assert job_rows(app) == (0, 0)


@pytest.mark.parametrize("body,ctype", [(b"{not json", "application/json"), (b"", "application/json"),
                                        (b"\xff\xfe", "application/json"), (b"model=demo", None)])
def test_non_json_bodies_are_400(app, client, body, ctype):
    resp = client.post("/v1/jobs", data=body, content_type=ctype)
    assert_envelope(resp, 400, "invalid_json")
    assert job_rows(app) == (0, 0)


def test_json_that_is_not_an_object_is_422(client):
    assert_envelope(client.post("/v1/jobs", json=["a"]), 422, "invalid_request")


def test_too_many_requests_in_one_job(make_settings, sqlite_url):
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, max_requests_per_job=3))
    err = assert_envelope(authed(app, make_key(sqlite_url)).post("/v1/jobs", json={"model": "tiny", "prompts": list("abcd")}),
                          422, "invalid_request")
    assert err["details"][0]["type"] == "too_many_requests"


def test_oversized_body_is_413(make_settings, sqlite_url):
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, max_body_bytes=2048))
    resp = authed(app, make_key(sqlite_url)).post("/v1/jobs", data=json.dumps({"model": "tiny", "prompts": ["x" * 4096]}),
                                  content_type="application/json")
    assert_envelope(resp, 413, "payload_too_large")


def test_unknown_job_route_and_method(client):
    assert_envelope(client.get("/v1/jobs/job_doesnotexist"), 404, "not_found")
    assert_envelope(client.get("/v1/jobs/job_doesnotexist/results"), 404, "not_found")
    assert_envelope(client.get("/v1/nothing-here"), 404, "not_found")
    resp = client.delete("/healthz")
    assert_envelope(resp, 405, "method_not_allowed")
    assert "GET" in resp.headers["Allow"]


def test_bad_query_parameters(client):
    job = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["a"]}).get_json()
    for query in ("limit=0", "limit=abc", "limit=100000", "status=done"):
        assert_envelope(client.get(f"/v1/jobs/{job['id']}/results?{query}"), 422, "invalid_request")
    assert_envelope(client.get(f"/v1/jobs/{job['id']}/results?after=req_nope"), 422, "invalid_request")


def test_client_request_id_is_echoed_when_sane(client):
    assert client.get("/healthz", headers={"X-Request-Id": "trace-42"}).headers["X-Request-Id"] == "trace-42"
    assert client.get("/healthz", headers={"X-Request-Id": "bad id; drop"}).headers["X-Request-Id"].startswith("rid_")


def test_accepted_job_is_stored_and_each_request_queued_on_its_model_queue(app, client, settings):
    resp = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["Hello", "Tell me a story"],
                                         "params": {"max_new_tokens": 4}})
    assert resp.status_code == 202
    job = resp.get_json()
    assert job["id"].startswith("job_") and job["status"] == "queued" and job["model"] == "tiny-chat"
    assert job["counts"] == {"total": 2, "queued": 2, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0,
                             "expired": 0}
    assert job["created_at"].endswith("Z") and resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert client.get(f"/v1/jobs/{job['id']}").get_json() == job

    page = client.get(f"/v1/jobs/{job['id']}/results").get_json()
    assert app.extensions["batchgen"].dispatcher.wait_idle(10)  # published by the dispatcher's thread
    assert sorted(d["id"] for d in page["data"]) == sorted(queued_request_ids(settings, "tiny-chat"))
    assert [d["index"] for d in page["data"]] == [0, 1] and page["has_more"] is False
    assert page["data"][0]["status"] == "queued" and page["data"][0]["text"] is None
    with app.extensions["batchgen"].db.read() as s:
        assert s.get(Job, job["id"]).dispatched_at is not None


def test_large_jobs_are_dispatched_in_the_background(make_settings, sqlite_url):
    from webapi import create_app

    settings = make_settings(sqlite_url, inline_dispatch_limit=2)
    app = create_app(settings)
    job = authed(app, make_key(sqlite_url)).post("/v1/jobs", json={"model": "tiny", "prompts": list("abcde")}).get_json()
    app.extensions["batchgen"].dispatcher.wait_idle()
    assert len(queued_request_ids(settings, "tiny-chat")) == 5
    with app.extensions["batchgen"].db.read() as s:
        assert s.get(Job, job["id"]).dispatched_at is not None


def test_health(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
