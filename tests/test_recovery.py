"""Nothing lost: real processes killed, a Redis that forgets, a database that goes away, a poison
request, a launcher that replaces dead workers, graceful shutdown. Each job must finish with every
request's result stored exactly once (counters and usage not double-counted)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests
from sqlalchemy import select

from core.db import Database
from core.tables import Job, JobRequest
from tests.conftest import authed, make_key
from tests.support import (
    ApiServer,
    Launcher,
    PostgresCluster,
    RedisServer,
    WorkerProcess,
    children_running,
    create_database,
    drop_database,
    wait_until,
)
from webapi import create_app

pytestmark = pytest.mark.slow

# Short recovery times so the tests finish quickly; the defaults are minutes (docs/configuration.md).
FAST_RECOVERY = {"visibility_timeout_s": 3, "lease_s": 2.0, "reconcile_interval_s": 1.0, "reconcile_grace_s": 1.0}
LONG = {"max_new_tokens": 150, "min_new_tokens": 150}  # fixed length: every batch takes a while


def snapshot(db: Database, job_id: str) -> tuple[Job, list[JobRequest]]:
    with db.read() as s:
        job = s.get(Job, job_id)
        rows = list(s.scalars(select(JobRequest).where(JobRequest.job_id == job_id).order_by(JobRequest.idx)))
    return job, rows


def running(db: Database, job_id: str) -> list[str]:
    return [r.id for r in snapshot(db, job_id)[1] if r.status == "running"]


def finished(db: Database, job_id: str) -> Job | None:
    job, _ = snapshot(db, job_id)
    return job if job.status in ("completed", "failed", "cancelled", "expired") else None


def assert_each_result_stored_once(db: Database, job_id: str, n: int, new_tokens: int) -> list[JobRequest]:
    job, rows = snapshot(db, job_id)
    assert (job.status, job.succeeded, job.failed, job.running, job.queued) == ("completed", n, 0, 0, 0)
    assert all(r.status == "succeeded" and r.text is not None for r in rows)
    assert [r.completion_tokens for r in rows] == [new_tokens] * n
    assert job.completion_tokens == n * new_tokens  # usage counted once per request
    assert job.prompt_tokens == sum(r.prompt_tokens for r in rows)
    return rows


def test_worker_killed_mid_batch_loses_nothing(make_settings, sqlite_url, token):
    settings = make_settings(sqlite_url, **FAST_RECOVERY)
    app = create_app(settings)
    client = authed(app, make_key(sqlite_url))
    db = Database(sqlite_url)
    first = WorkerProcess(settings, "tiny-chat", "--max-batch-size", "4").start()
    second = None
    try:
        job = client.post("/v1/jobs", json={"model": "tiny", "prompts": [f"p{i}" for i in range(24)],
                                            "params": LONG}).get_json()
        wait_until(lambda: running(db, job["id"]), 30, 0.005, "a batch generating")
        first.kill()  # SIGKILL while a batch generates
        # What the dead worker held, read after its death (a batch may have been claimed, or
        # stored, between that look and the kill); nothing changes them until the second starts.
        killed_while_running = set(running(db, job["id"]))
        assert killed_while_running  # 24 requests of 150 tokens: one batch runs while the next waits
        second = WorkerProcess(settings, "tiny-chat").start()
        wait_until(lambda: finished(db, job["id"]), 90, what="the job to finish")
        rows = assert_each_result_stored_once(db, job["id"], 24, 150)
        by_id = {r.id: r for r in rows}
        assert all(by_id[i].attempts == 2 for i in killed_while_running)  # ran again, recorded once
        assert all(r.attempts == 1 for r in rows if r.id not in killed_while_running)
    finally:
        for w in (first, second):
            if w is not None:
                w.stop()
        db.dispose()
        app.extensions["batchgen"].close()


def test_redis_restarted_empty_is_reconciled(make_settings, sqlite_url, tmp_path):
    redis = RedisServer(tmp_path).start()
    settings = make_settings(sqlite_url, redis_url=redis.url, **FAST_RECOVERY)
    app = create_app(settings)
    client = authed(app, make_key(sqlite_url))
    db = Database(sqlite_url)
    worker = None
    try:
        job = client.post("/v1/jobs", json={"model": "tiny", "prompts": [f"p{i}" for i in range(8)],
                                            "params": {"max_new_tokens": 4}}).get_json()
        redis.stop()
        redis.start()  # same port, no data: every message is gone
        worker = WorkerProcess(settings, "tiny-chat").start()
        wait_until(lambda: finished(db, job["id"]), 60, what="the job to finish")
        job_row, rows = snapshot(db, job["id"])
        assert job_row.status == "completed" and job_row.succeeded == 8
        assert [r.attempts for r in rows] == [1] * 8  # re-dispatched, and nothing ran twice
        assert "no queue held" in worker.log()
    finally:
        if worker is not None:
            worker.stop()
        redis.stop()
        db.dispose()
        app.extensions["batchgen"].close()


def test_sigterm_finishes_what_runs_and_hands_back_what_waits(make_settings, sqlite_url):
    settings = make_settings(sqlite_url, **FAST_RECOVERY)
    app = create_app(settings)
    client = authed(app, make_key(sqlite_url))
    db = Database(sqlite_url)
    first = WorkerProcess(settings, "tiny-chat", "--max-batch-size", "2").start()
    second = None
    try:
        job = client.post("/v1/jobs", json={"model": "tiny", "prompts": [f"p{i}" for i in range(30)],
                                            "params": LONG}).get_json()
        wait_until(lambda: running(db, job["id"]), 30, 0.005, "a batch generating")
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(60) == 0, first.log()
        _, rows = snapshot(db, job["id"])
        assert not [r for r in rows if r.status == "running"]  # what ran was finished and stored
        assert [r for r in rows if r.status == "queued"], "some requests should have been handed back"
        full_log = first.log_path.read_text(errors="replace")
        assert "handed back to the queue" in full_log
        assert "Traceback" not in full_log  # handing back is expected: no traceback per request
        second = WorkerProcess(settings, "tiny-chat").start()
        wait_until(lambda: finished(db, job["id"]), 90, what="the job to finish")
        rows = assert_each_result_stored_once(db, job["id"], 30, 150)
        assert all(r.attempts == 1 for r in rows)  # nothing ran twice
    finally:
        for w in (first, second):
            if w is not None:
                w.stop()
        db.dispose()
        app.extensions["batchgen"].close()


def test_poison_request_fails_alone_and_the_launcher_replaces_its_dead_worker(make_settings, sqlite_url):
    settings = make_settings(sqlite_url, model="tiny-chat", max_attempts=2, **FAST_RECOVERY)
    launcher = Launcher(settings, env={"BATCHGEN_FAULT_KILL_ON": "<<poison>>"}).start()
    db = Database(sqlite_url)
    try:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {launcher.token}"
        prompts = ["fine one", "fine two", "this one is <<poison>>", "fine three"]
        job = http.post(f"{launcher.url}/v1/jobs", json={"model": "tiny", "prompts": prompts,
                                                         "params": {"max_new_tokens": 5}}).json()
        wait_until(lambda: finished(db, job["id"]), 120, what="the job to finish")
        job_row, rows = snapshot(db, job["id"])
        assert (job_row.status, job_row.succeeded, job_row.failed) == ("completed", 3, 1), launcher.output()[-3000:]
        poison = rows[2]
        assert (poison.status, poison.error_code) == ("failed", "attempts_exhausted")
        assert all(r.status == "succeeded" for i, r in enumerate(rows) if i != 2)
        assert "worker-0 exited with status -9; restarting" in launcher.output()
    finally:
        assert launcher.stop() == 0
        db.dispose()


def test_a_poison_request_in_a_big_batch_is_isolated_by_bisection(make_settings, sqlite_url):
    # One request of 64 kills its worker whenever it runs. Replaying the batch one request at a
    # time would take 64 runs with nothing else in flight; halving it takes about a dozen.
    settings = make_settings(sqlite_url, model="tiny-chat", max_attempts=2, max_batch_size=64, max_wait_ms=2000,
                             **FAST_RECOVERY)
    launcher = Launcher(settings, env={"BATCHGEN_FAULT_KILL_ON": "<<poison>>"}).start()
    db = Database(sqlite_url)
    try:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {launcher.token}"
        prompts = [f"fine {i}" for i in range(64)]
        prompts[37] = "this one is <<poison>>"
        job = http.post(f"{launcher.url}/v1/jobs", json={"model": "tiny", "prompts": prompts,
                                                         "params": {"max_new_tokens": 3}}).json()
        wait_until(lambda: finished(db, job["id"]), 240, what="the job to finish")
        job_row, rows = snapshot(db, job["id"])
        assert (job_row.status, job_row.succeeded, job_row.failed) == ("completed", 63, 1), launcher.output()[-3000:]
        assert (rows[37].status, rows[37].error_code) == ("failed", "attempts_exhausted")
        runs = {r.run_id for i, r in enumerate(rows) if i != 37}
        assert len(runs) <= 24, len(runs)  # the good ones succeeded in a score of runs, not one by one
        deaths = launcher.output().count("exited with status -9; restarting")
        assert 2 <= deaths <= 6, launcher.output()  # 64, 16, 4, 1: one restart each
    finally:
        assert launcher.stop() == 0
        db.dispose()


def test_every_worker_killed_mid_job_the_launcher_restarts_them_and_the_job_completes(make_settings, sqlite_url):
    settings = make_settings(sqlite_url, model="tiny-chat", **FAST_RECOVERY)
    launcher = Launcher(settings, "--workers", "2").start()
    db = Database(sqlite_url)
    try:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {launcher.token}"
        job = http.post(f"{launcher.url}/v1/jobs", json={"model": "tiny", "prompts": [f"p{i}" for i in range(24)],
                                                         "params": LONG}).json()
        wait_until(lambda: running(db, job["id"]), 30, 0.005, "a batch generating")
        workers = children_running(launcher.proc.pid, "-m worker")
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: finished(db, job["id"]), 120, what="the job to finish")
        rows = assert_each_result_stored_once(db, job["id"], 24, 150)
        # What was generating when the workers died ran again, once; nothing ran a third time.
        assert {r.attempts for r in rows} <= {1, 2} and max(r.attempts for r in rows) == 2
        assert launcher.output().count("exited with status -9; restarting") == 2
    finally:
        assert launcher.stop() == 0
        db.dispose()


@pytest.mark.postgres
def test_database_away_for_seconds_the_api_says_503_and_no_result_is_lost(make_settings):
    try:
        cluster = PostgresCluster()
        admin = cluster.start()
    except Exception as exc:
        pytest.skip(f"no throwaway PostgreSQL here: {exc}")
    url, _ = create_database(admin)
    from core.db import upgrade

    upgrade(url)
    settings = make_settings(url, **FAST_RECOVERY)
    app = create_app(settings)
    api = ApiServer(app, make_key(url)).start()
    worker = WorkerProcess(settings, "tiny-chat", "--max-batch-size", "4").start()
    db = Database(url)
    try:
        job = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny", "prompts": [f"p{i}" for i in range(16)],
                                                        "params": LONG}).json()
        wait_until(lambda: running(db, job["id"]), 30, 0.005, "a batch generating")
        cluster.pause()
        during = api.http.get(f"{api.url}/v1/jobs/{job['id']}")
        assert during.status_code == 503 and during.json()["error"]["code"] == "unavailable"
        assert during.headers["Retry-After"]
        time.sleep(3)
        cluster.resume()
        wait_until(lambda: api.http.get(f"{api.url}/v1/jobs/{job['id']}").status_code == 200, 30,
                   what="the API to recover by itself")
        wait_until(lambda: finished(db, job["id"]), 120, what="the job to finish")
        assert_each_result_stored_once(db, job["id"], 16, 150)
    finally:
        worker.stop()
        api.stop()
        db.dispose()
        app.extensions["batchgen"].close()
        drop_database(admin, url.rsplit("/", 1)[1])
        cluster.stop()


def test_sigterm_to_the_api_finishes_requests_in_flight(make_settings, sqlite_url):
    import threading

    from tests.support import GunicornApi

    settings = make_settings(sqlite_url, **FAST_RECOVERY)
    api = GunicornApi(settings).start()
    port = api.port
    db = Database(sqlite_url)
    worker = None
    try:
        token = make_key(sqlite_url)
        answer: dict[str, requests.Response] = {}

        def call() -> None:  # tiny-base has no worker yet: the call waits, in flight
            answer["r"] = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                        headers={"Authorization": f"Bearer {token}"},
                                        json={"model": "tiny-base", "prompt": "Once", "max_tokens": 4})

        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: snapshot_count(db), 20, what="the call to be in flight")
        api.signal(signal.SIGTERM)  # gunicorn stops taking requests, finishes the ones it has
        worker = WorkerProcess(settings, "tiny-base").start()
        caller.join(60)
        assert answer["r"].status_code == 200 and answer["r"].json()["object"] == "text_completion"
        assert api.proc is not None and api.proc.wait(40) == 0, api.log()
    finally:
        api.stop()
        if worker is not None:
            worker.stop()
        db.dispose()


def snapshot_count(db: Database) -> int:
    with db.read() as s:
        return len(list(s.scalars(select(JobRequest.id))))


def test_worker_killed_between_storing_results_and_acking_them(make_settings, sqlite_url):
    """The worker stores its first batch's results and dies before acking their messages (and
    holding others it took): Redis keeps them all as unacked, kombu's restore (run by every
    worker) brings them back after the visibility timeout, a second worker runs what was not
    stored and acks everything, and each result is stored once."""
    import redis as redis_lib

    settings = make_settings(sqlite_url, **FAST_RECOVERY)
    app = create_app(settings)
    client = authed(app, make_key(sqlite_url))
    db = Database(sqlite_url)
    broker = redis_lib.Redis.from_url(settings.redis_url)
    unacked = settings.redis_prefix + "unacked"
    first = WorkerProcess(settings.model_copy(update={"fault_kill_before_ack": True}), "tiny-chat",
                          "--max-batch-size", "4").start()
    second = None
    try:
        job = client.post("/v1/jobs", json={"model": "tiny", "prompts": [f"p{i}" for i in range(12)],
                                            "params": {"max_new_tokens": 6, "min_new_tokens": 6}}).get_json()
        wait_until(lambda: not first.running(), 60, what="the worker to kill itself before acking")
        stored_before = {r.id for r in snapshot(db, job["id"])[1] if r.status == "succeeded"}
        assert stored_before  # it died after storing results...
        assert broker.hlen(unacked) > 0  # ...whose messages (and the others it held) are still unacked
        second = WorkerProcess(settings, "tiny-chat").start()
        wait_until(lambda: finished(db, job["id"]), 60, what="the job to finish")
        rows = assert_each_result_stored_once(db, job["id"], 12, 6)
        assert {r.id for r in rows if r.id in stored_before} == stored_before
        wait_until(lambda: broker.hlen(unacked) == 0, 30, what="every message acked")
    finally:
        for process in (second, first):
            if process is not None:
                process.stop()
        app.extensions["batchgen"].close()
        broker.close()
        db.dispose()
