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
from tests.support import GunicornApi, clear_of_minute_boundary, wait_until

pytestmark = pytest.mark.slow


def test_the_pending_cap_holds_under_parallel_submits_on_two_processes(make_settings, database_url):
    settings = make_settings(database_url, max_pending_per_key=100, rate_limit_per_minute=0)
    token = make_key(database_url)
    api = GunicornApi(settings, token, workers=2).start()
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
    api = GunicornApi(settings, token, workers=2).start()
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
        assert sum(a.status_code == 200 for a in answers) == 5
        assert used == 5 * len(line) * (200_000 // len(line)) <= quota  # exactly the five accepted
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
        # What a process counts is read again each second: the deletion shows within that. A
        # refused submission stores nothing, so trying until it is accepted is safe.
        wait_until(lambda: submit(10).status_code == 202, 5, 0.2, "room after the deletion")
    finally:
        api.stop()


def _open_stream(url: str, token: str) -> requests.Response:
    resp = requests.get(url, headers={"Authorization": f"Bearer {token}"}, stream=True, timeout=60)
    if resp.status_code == 200:
        next(resp.iter_lines())  # the stream is open and its place taken
    return resp


def test_one_key_cannot_take_every_long_call_and_a_revoked_keys_streams_end(make_settings, sqlite_url):
    import threading

    from core.auth import revoke_key

    settings = make_settings(sqlite_url, max_long_calls_per_key=3, rate_limit_per_minute=0, stream_max_s=120)
    alice, bob = make_key(sqlite_url), make_key(sqlite_url, owner="bob")
    api = GunicornApi(settings, alice, workers=2).start()
    opened: list[requests.Response] = []
    try:
        url = f"{api.url}/v1/jobs/events"
        for _ in range(3):  # on either process: the cap is the key's, across processes
            opened.append(_open_stream(url, alice))
        assert [r.status_code for r in opened] == [200, 200, 200]
        refused = _open_stream(url, alice)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
        assert refused.headers["Retry-After"]
        job = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny-base", "prompts": ["x"]})
        assert job.status_code == 202  # short calls are not held back
        download = requests.get(f"{api.url}/v1/jobs/{job.json()['id']}/results.jsonl",
                                headers={"Authorization": f"Bearer {alice}"})
        assert download.status_code == 429  # downloads count too
        other = _open_stream(url, bob)
        assert other.status_code == 200  # another key is not affected
        opened.append(other)
        opened.pop(0).close()  # one of alice's streams ends: its place is free again
        assert wait_for(lambda: _held(_open_stream(url, alice), opened), 10)

        # Revoking alice's key ends her open streams within the key cache's window.
        ended = []

        def drain(resp: requests.Response) -> None:
            for _ in resp.iter_lines():
                pass
            ended.append(time.monotonic())

        alices = [r for r in opened if r.request.headers["Authorization"].endswith(alice)]
        readers = [threading.Thread(target=drain, args=(r,), daemon=True) for r in alices]
        for reader in readers:
            reader.start()
        db = Database(sqlite_url)
        with db.write() as s:
            revoke_key(session=s, key_id=alice.split(".")[0])
        db.dispose()
        revoked_at = time.monotonic()
        for reader in readers:
            reader.join(30)
        assert len(alices) == 3 and not any(t.is_alive() for t in readers), "a revoked key's stream is still open"
        assert max(ended) - revoked_at < 25
    finally:
        for resp in opened:
            resp.close()
        api.stop()


def _held(resp: requests.Response, opened: list[requests.Response]) -> bool:
    if resp.status_code == 200:
        opened.append(resp)
        return True
    resp.close()
    return False


def wait_for(predicate, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_flood_of_made_up_keys_is_rate_limited_before_the_database(make_settings, sqlite_url):
    from sqlalchemy import event

    from core.ids import new_id
    from webapi import create_app

    app = create_app(make_settings(sqlite_url, auth_failures_per_minute=20))
    client = app.test_client()
    key_reads = []

    def count(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        if "api_keys" in statement:
            key_reads.append(statement)

    engine = app.extensions["batchgen"].db.engine
    clear_of_minute_boundary(20)  # failed keys are counted per clock minute
    event.listen(engine, "before_cursor_execute", count)
    try:
        statuses = [client.get("/v1/jobs", headers={"Authorization": f"Bearer {new_id('key')}.{i:040d}"}).status_code
                    for i in range(300)]
    finally:
        event.remove(engine, "before_cursor_execute", count)
        app.extensions["batchgen"].close()
    assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
    assert len(key_reads) == 20  # the rest never reached the database
