"""Tenants sharing one service: caps that hold under parallel load on several API processes,
storage quotas, long calls that one key cannot monopolise. Served by gunicorn as deployed."""

from __future__ import annotations

import time
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


def test_storage_quotas_hold_for_uploads_in_a_loop_and_in_parallel(make_settings, database_url):
    from core.tables import File

    quota = 1024 * 1024
    settings = make_settings(database_url, max_file_bytes_per_owner=quota, max_files_per_owner=6,
                             rate_limit_per_minute=0)
    token, other = make_key(database_url), make_key(database_url, owner="bob")
    api = GunicornApi(settings, token, workers=2, threads=8).start()
    db = Database(database_url)
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny-base", "prompt": "x"}}\n'
    try:
        def upload(size: int, key: str = token) -> requests.Response:
            body = line * (size // len(line))
            return requests.post(f"{api.url}/v1/files", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 data={"purpose": "batch"}, files={"file": ("in.jsonl", body)})

        with ThreadPoolExecutor(8) as pool:  # 8 x 200 kB at once against 1 MiB
            answers = list(pool.map(lambda _: upload(200_000), range(8)))
        assert {a.status_code for a in answers} == {200, 413}, [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 413).json()["error"]
        assert refused["code"] == "storage_quota_exceeded" and str(quota) in refused["message"]
        big = upload(8 * quota)  # refused from its Content-Length, before the body is stored anywhere
        assert big.status_code == 413 and big.json()["error"]["code"] == "storage_quota_exceeded"
        with db.read() as s:
            used = s.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(File.purpose == "batch"))
        assert sum(a.status_code == 200 for a in answers) == 5 and used <= quota
        # The count quota, with small files; another owner is not affected by alice's usage.
        assert upload(100).status_code == 200
        assert (r := upload(100)).status_code == 429 and r.json()["error"]["code"] == "too_many_files"
        assert upload(200_000, other).status_code == 200
        # Deleting makes room again.
        first = requests.get(f"{api.url}/v1/files", headers={"Authorization": f"Bearer {token}"}).json()["data"][0]
        assert requests.delete(f"{api.url}/v1/files/{first['id']}",
                               headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert upload(100).status_code == 200
    finally:
        api.stop()
        db.dispose()


def test_stored_requests_have_a_quota_until_jobs_are_deleted(make_settings, database_url):
    settings = make_settings(database_url, max_stored_requests_per_owner=30, rate_limit_per_minute=0)
    token = make_key(database_url)
    api = GunicornApi(settings, token).start()
    try:
        def submit(n: int) -> requests.Response:
            return api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny-base", "prompts": ["x"] * n})

        jobs = [submit(10) for _ in range(3)]
        assert [j.status_code for j in jobs] == [202, 202, 202]
        refused = submit(1)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "storage_quota_exceeded"
        job_id = jobs[0].json()["id"]
        assert api.http.post(f"{api.url}/v1/jobs/{job_id}/cancel").status_code == 200
        assert api.http.delete(f"{api.url}/v1/jobs/{job_id}").status_code == 200
        time.sleep(1.1)  # what a process counts is read again each second: deletions show by then
        assert submit(10).status_code == 202
    finally:
        api.stop()
