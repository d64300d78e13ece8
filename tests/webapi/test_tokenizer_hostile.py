"""The public tokenizer routes (``/tokenize``, ``/detokenize``) held against whoever calls them,
served by gunicorn's gevent workers as deployed: limited per client address, bounded by the
context, strict about their schema, and tokenizing off the event loop so other calls are served
meanwhile. What gunicorn itself refuses (a request line past its limit) comes in the envelope too."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.support import GunicornApi

LONG_CONTEXT = 131_072  # as Llama 3 has: the bound by the context is then the prompt's own limit
LIMIT_PER_MINUTE = 40


@pytest.fixture(scope="module")
def api(tmp_path_factory, redis_server, tiny_model, sqlite_template):  # type: ignore[no-untyped-def]
    import shutil
    import uuid

    from core.settings import Settings

    var = tmp_path_factory.mktemp("tokenizer")
    shutil.copy(sqlite_template, var / "batchgen.db")
    registry = var / "models.json"
    registry.write_text(json.dumps({"models": [
        {"name": "tiny", "path": str(tiny_model), "chat": False, "context_length": 256},
        {"name": "tiny-long", "path": str(tiny_model), "chat": False, "context_length": LONG_CONTEXT}]}))
    settings = Settings.model_validate({
        "var_dir": var, "database_url": f"sqlite:///{var / 'batchgen.db'}", "redis_url": redis_server.url,
        "redis_prefix": f"test-{uuid.uuid4().hex[:8]}:", "registry_file": registry, "model": "tiny",
        "calibrate": "off", "max_prompt_chars": 5_000_000, "max_body_bytes": 64 * 1024 * 1024,
        "tokenizer_per_minute": LIMIT_PER_MINUTE})
    server = GunicornApi(settings).start()
    yield server
    assert server.stop() == 0, server.log()


def post(api, path: str, body: object) -> requests.Response:
    return requests.post(api.url + path, json=body, timeout=60)


def test_what_the_schema_forbids_is_refused(api):
    """Schemathesis found these answered 200 (lax parsing took "x" for a bool, "7" for an int)."""
    for path, body in (("/tokenize", {"add_special_tokens": "<a string>", "prompt": ""}),
                       ("/tokenize", {"prompt": 7}), ("/detokenize", {"tokens": ["7"]}),
                       ("/detokenize", {"tokens": [True]}), ("/detokenize", {"tokens": [1.0]})):
        resp = post(api, path, body)
        assert resp.status_code == 400, (path, body, resp.status_code, resp.text[:200])
        assert resp.json()["error"]["type"] == "invalid_request_error", resp.json()
    assert post(api, "/tokenize", {"prompt": "", "add_special_tokens": False}).json()["count"] == 0


def test_input_is_bounded_by_the_context(api):
    tokens = post(api, "/tokenize", {"prompt": "hello world"}).json()["tokens"]
    too_long = post(api, "/tokenize", {"model": "tiny", "prompt": "x" * 200_000})  # a 256-token context
    assert too_long.status_code == 400 and "256 tokens" in too_long.json()["error"]["message"], too_long.text[:300]
    assert post(api, "/detokenize", {"model": "tiny", "tokens": tokens * 200}).status_code == 400
    assert post(api, "/detokenize", {"model": "tiny", "tokens": tokens}).json()["prompt"].endswith("hello world")


def test_a_long_tokenize_does_not_stall_the_other_calls_of_its_process(api):
    """Tokenizing ran on the gevent loop: while it lasted, the process served nothing else (a
    health check sent meanwhile waited for the end). It runs on a thread of its own now."""
    unit = "The quick brown fox jumps over the lazy dog, ünïcödé and 数字 1234. "
    started = time.monotonic()
    assert post(api, "/tokenize", {"model": "tiny-long", "prompt": unit * 3000}).status_code == 200
    per_unit = (time.monotonic() - started) / 3000
    text = unit * min(60_000, max(3000, int(2.0 / per_unit)))  # about 2 s of tokenizing on this machine
    window: list[float] = []

    def tokenize() -> None:
        started = time.monotonic()
        resp = post(api, "/tokenize", {"model": "tiny-long", "prompt": text})
        window.extend([started, time.monotonic()])
        assert resp.status_code == 200, resp.text[:300]

    worker = threading.Thread(target=tokenize)
    worker.start()
    served_inside: list[float] = []
    time.sleep(0.3)  # the body is on its way and the tokenizer at work
    while worker.is_alive():
        sent = time.monotonic()
        assert requests.get(api.url + "/healthz", timeout=60).status_code == 200
        answered = time.monotonic()
        if worker.is_alive():
            served_inside.append(answered - sent)
        time.sleep(0.02)
    worker.join()
    took = window[1] - window[0]
    assert took > 0.8, f"the tokenize took {took:.2f} s: too short to tell"
    assert len(served_inside) >= 2, (served_inside, took)  # answered while the tokenize still ran


def test_a_request_line_past_the_server_s_limit_gets_the_envelope(api):
    query = "&".join(f"limit={i}" for i in range(1000))
    resp = requests.get(f"{api.url}/v1/batches?{query}", timeout=30)
    assert resp.status_code == 414 and resp.headers["Content-Type"] == "application/json", resp.text[:300]
    error = resp.json()["error"]
    assert error["code"] == "uri_too_long" and error["request_id"].startswith("rid_"), error


def test_the_public_routes_are_limited_per_client_address(api):
    """Public, they answered anyone without limit; a flood from one address now gets 429."""
    statuses = [post(api, "/tokenize", {"prompt": "hi"}).status_code for _ in range(2 * LIMIT_PER_MINUTE + 2)]
    assert 429 in statuses and statuses[0] == 200, statuses
    resp = post(api, "/tokenize", {"prompt": "hi"})
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
    assert resp.json()["error"]["code"] == "rate_limited" and "address" in resp.json()["error"]["message"]
    # The rest of the API is not that limit's (it counts per key).
    assert requests.get(api.url + "/healthz", timeout=30).status_code == 200
