"""The README's guarantees under faults that are not a clean kill: Redis away for the API, a
database that stops answering, duplicate deliveries, outages while results wait to be stored.
Each test breaks something for real and fails on the code that had the hole."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from core.db import Database
from core.tables import Job
from tests.conftest import authed, make_key
from tests.support import RedisServer

pytestmark = pytest.mark.slow


def test_redis_down_synchronous_calls_answer_503_and_store_nothing(make_settings, sqlite_url, tmp_path):
    from webapi import create_app

    redis = RedisServer(tmp_path).start()
    settings = make_settings(sqlite_url, redis_url=redis.url, eas_model="tiny-chat")
    app = create_app(settings)
    client = authed(app, make_key(sqlite_url))
    db = Database(sqlite_url)
    try:
        redis.stop()
        calls = [
            ("/v1/completions", {"json": {"model": "tiny-base", "prompt": "Once", "max_tokens": 4}}),
            ("/v1/completions", {"json": {"model": "tiny-base", "prompt": "Once", "max_tokens": 4, "stream": True}}),
            ("/v1/chat/completions", {"json": {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}]}}),
            ("/api/v1/services/aigc/text-generation/generation",
             {"json": {"model": "tiny-chat", "input": {"prompt": "Hi"}}}),
            ("/", {"data": b"Once upon a time", "content_type": "text/plain"}),
            ("/", {"json": {"input_ids": "Once", "max_length": 8}}),
        ]
        for path, kwargs in calls:
            resp = client.post(path, **kwargs)
            assert resp.status_code == 503, (path, resp.status_code, resp.data[:300])
            assert resp.headers["Retry-After"] == "5"
            body = resp.get_json()
            if path.startswith("/v1/"):
                assert body["error"]["type"] == "server_error" and body["error"]["code"] == "unavailable", body
            elif path.startswith("/api/"):
                assert body["code"] == "ServiceUnavailable" and body["request_id"], body
            else:
                assert body["error"]["code"] == "unavailable" and body["error"]["request_id"], body
        with db.read() as s:  # nothing that could run later for nobody
            assert s.scalar(select(func.count()).select_from(Job).where(Job.status != "cancelled")) == 0
    finally:
        app.extensions["batchgen"].close()
        db.dispose()
        redis.stop()
