"""Tenants sharing one service: caps that hold under parallel load on several API processes,
storage quotas, long calls that one key cannot monopolise. Served by gunicorn as deployed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from core.db import Database
from core.tables import Job
from tests.conftest import make_key
from tests.support import GunicornApi

pytestmark = pytest.mark.slow


def test_the_pending_cap_holds_under_parallel_submits_on_two_processes(make_settings, database_url):
    settings = make_settings(database_url, max_pending_per_key=100, rate_limit_per_minute=0)
    token = make_key(database_url)
    api = GunicornApi(settings, token, workers=2, threads=16).start()
    db = Database(database_url)
    try:
        def submit(i: int) -> int:
            resp = requests.post(f"{api.url}/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=60,
                                 json={"model": "tiny-base", "prompts": [f"p{i}-{j}" for j in range(10)]})
            assert resp.status_code in (202, 429), resp.text
            if resp.status_code == 429:
                assert resp.json()["error"]["code"] == "too_many_pending" and resp.headers["Retry-After"]
            return resp.status_code

        with ThreadPoolExecutor(24) as pool:  # no worker runs: every accepted request stays pending
            statuses = list(pool.map(submit, range(60)))
        with db.read() as s:
            pending = s.scalar(select(func.coalesce(func.sum(Job.queued + Job.running), 0)))
        assert pending == 10 * statuses.count(202)
        assert pending == 100, statuses  # the cap exactly: nothing over it, and it was reached
    finally:
        api.stop()
        db.dispose()
