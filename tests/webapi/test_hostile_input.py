"""Input meant to break things, and the security promises: every answer a clear 4xx, nothing stored."""

import io
import logging
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.tables import Job
from tests.conftest import authed, make_key

ROOT = Path(__file__).resolve().parents[2]


def stored_jobs(app):
    with app.extensions["batchgen"].db.read() as s:
        return s.scalar(select(func.count()).select_from(Job))


@pytest.mark.parametrize("raw", [
    b'{"model": "tiny", "prompts": ["\\ud800"]}',             # a lone surrogate, escaped in JSON
    b'{"model": "tiny", "prompts": ["a\\u0000b"]}',            # NUL
    b'{"model": "tiny", "requests": [{"custom_id": "\\udfff", "prompt": "x"}]}',
    b'{"model": "tiny", "prompts": ["x"], "metadata": {"k": "\\u0000"}}',
])
def test_text_no_database_can_store_is_refused(app, client, raw):
    resp = client.post("/v1/jobs", data=raw, content_type="application/json")
    assert resp.status_code == 422 and resp.get_json()["error"]["code"] == "invalid_request"
    assert stored_jobs(app) == 0


def test_control_characters_and_template_tags_are_kept_as_text(client):
    prompt = "line\x01\x1f\ttab <s>[INST] <<SYS>> </s>"
    job = client.post("/v1/jobs", json={"model": "tiny", "prompts": [prompt]}).get_json()
    assert client.get(f"/v1/jobs/{job['id']}/results").get_json()["data"][0]["prompt"] == prompt


@pytest.mark.parametrize("url", ["/v1/jobs/job_x%00y", "/v1/jobs?after=%00", "/v1/jobs/job_x/results?after=a%00",
                                 "/v1/files/file_%00", "/v1/batches?after=%00"])
def test_nul_in_urls_is_400(client, url):
    resp = client.get(url)
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_request"


def test_a_chunked_body_over_the_limit_is_refused_without_being_read_whole(make_settings, sqlite_url):
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, max_body_bytes=4096))
    client = authed(app, make_key(sqlite_url))
    class Endless(io.RawIOBase):  # a body with no Content-Length: it cannot be refused up front
        read_bytes = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
            n = len(buffer)
            buffer[:n] = b"x" * n
            self.read_bytes += n
            return n

    # As a WSGI server hands over a chunked request: no length, an input that ends when the body does.
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    environ = EnvironBuilder("/v1/jobs", method="POST", headers={
        "Transfer-Encoding": "chunked", "Content-Type": "application/json",
        "Authorization": client.environ_base["HTTP_AUTHORIZATION"]}).get_environ()
    stream = Endless()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"wsgi.input": stream, "wsgi.input_terminated": True})
    body, status, _ = run_wsgi_app(app, environ, buffered=True)
    assert status.startswith("413") and b"payload_too_large" in b"".join(body)
    assert stream.read_bytes < 64 * 1024  # stopped near the limit, not read to the end (it has none)


def test_every_route_with_an_id_hides_another_owners_things(app, client, settings):
    """Walks every route of the URL map that takes an id, with a second owner's key."""
    job = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["mine"]}).get_json()
    upload = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(
        b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "x"}}\n'),
        "in.jsonl")}, content_type="multipart/form-data").get_json()
    batch = client.post("/v1/batches", json={"input_file_id": upload["id"], "endpoint": "/v1/completions"}).get_json()
    ids = {"job_id": job["id"], "file_id": upload["id"], "batch_id": batch["id"]}
    bob = authed(app, make_key(settings.database_url, owner="bob"))
    walked = 0
    for rule in app.url_map.iter_rules():
        params = set(rule.arguments) & set(ids)
        if not params:
            continue
        url = rule.rule
        for name in params:
            url = url.replace(f"<{name}>", ids[name])
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            resp = bob.open(url, method=method, json={} if method == "POST" else None)
            assert resp.status_code == 404, (method, url, resp.status_code)
            walked += 1
    assert walked == 11  # 6 job routes, 3 file routes, 2 batch routes
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "queued"  # bob changed nothing
    assert client.get(f"/v1/files/{upload['id']}").status_code == 200


def test_no_key_reaches_the_logs(app, settings, caplog):
    token = make_key(settings.database_url)
    with caplog.at_level(logging.DEBUG):
        c = authed(app, token)
        c.post("/v1/jobs", json={"model": "tiny", "prompts": ["x"]})
        c.get("/v1/jobs/job_nope")
        app.test_client().get("/v1/jobs", headers={"Authorization": f"Bearer {token}x"})
    secret = token.split(".", 1)[1]
    assert caplog.records and not any(secret in r.getMessage() for r in caplog.records)


INJECTION = "x'); DROP TABLE jobs; --\"zqzq"
KEY = "x');DROP/**/TABLE/**/jobs;--\"zqzq"  # an Idempotency-Key is visible ASCII: no spaces


def test_what_a_client_sends_reaches_sql_only_as_bound_parameters(app, settings):
    """Every value a client controls that a query uses (ids, cursors, filters, custom ids,
    metadata, the idempotency key) travels as a parameter: it never appears in a statement's text,
    and it is stored and read back unchanged."""
    from sqlalchemy import event

    statements: list[str] = []
    engine = app.extensions["batchgen"].db.engine
    listener = lambda conn, cursor, statement, *a: statements.append(statement)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        c = authed(app, make_key(settings.database_url))
        job = c.post("/v1/jobs", headers={"Idempotency-Key": KEY}, json={
            "model": "tiny", "metadata": {"k": INJECTION},
            "requests": [{"prompt": INJECTION, "custom_id": INJECTION}]}).get_json()
        c.get(f"/v1/jobs/{INJECTION}")
        c.get("/v1/jobs", query_string={"after": INJECTION})
        results = c.get(f"/v1/jobs/{job['id']}/results", query_string={"after": f"req_{INJECTION}"})
        c.get("/v1/files", query_string={"after": INJECTION, "purpose": INJECTION})
        c.get("/v1/batches", query_string={"after": INJECTION})
        c.post(f"/v1/batches/{INJECTION}/cancel")
        again = c.post("/v1/jobs", headers={"Idempotency-Key": KEY}, json={
            "model": "tiny", "metadata": {"k": INJECTION},
            "requests": [{"prompt": INJECTION, "custom_id": INJECTION}]})
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert len(statements) > 10 and not [s for s in statements if "zqzq" in s]
    assert job["metadata"] == {"k": INJECTION} and again.status_code == 200  # the key matched, as given
    assert results.status_code == 422
    row = c.get(f"/v1/jobs/{job['id']}/results").get_json()["data"][0]
    assert (row["prompt"], row["custom_id"]) == (INJECTION, INJECTION)
    assert stored_jobs(app) == 1


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 83626229}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}),
    ("/api/v1/services/aigc/text-generation/generation", {"model": "tiny", "input": {"prompt": "x"},
                                                          "parameters": {"max_tokens": 83626229}}),
    ("/", {"input_ids": "x", "max_length": 10**9}),
])
def test_compatibility_routes_bound_lengths_like_the_native_api(client, path, body):
    # Found by schemathesis: an unbounded max_tokens used to fail converting into native params (500).
    resp = client.post(path, json=body)
    assert resp.status_code == 400, resp.get_data(as_text=True)


def test_continuations_to_score_are_held_to_the_prompt_s_limits(app, client):
    """A scoring request's continuations had no length limit and skipped the context check: one of
    60 MB was stored with 202, served back on every results page and tokenized by a worker before
    it failed. Each, and all together, now keep to the prompt's limits, on the API."""
    cap = app.extensions["batchgen"].settings.max_prompt_chars
    cases = {
        "one too long": ([("x " * 30_000_000)[:60_000_000]], "continuations[0]", "prompt_too_long"),
        "all too long": (["y" * (cap // 2 + 1), "z" * (cap // 2 + 1)], "continuations", "prompt_too_long"),
        "past the context": (["word " * 2_000], "continuations[0]", "context_length_exceeded"),
    }
    for name, (continuations, where, kind) in cases.items():
        resp = client.post("/v1/jobs", json={"model": "tiny", "kind": "score",
                                             "requests": [{"prompt": "The sky is", "continuations": continuations}]})
        assert resp.status_code == 422, (name, resp.status_code)
        details = resp.get_json()["error"]["details"]
        assert [(d["loc"], d["type"]) for d in details] == [(f"requests[0].{where}", kind)], (name, details)
    assert stored_jobs(app) == 0
    fine = client.post("/v1/jobs", json={"model": "tiny", "kind": "score",
                                         "requests": [{"prompt": "The sky is", "continuations": [" blue", " green"]}]})
    assert fine.status_code == 202, fine.get_json()
