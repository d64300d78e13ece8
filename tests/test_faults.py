"""The guarantees (docs/operations.md) under faults that are not a clean kill: Redis away for the API, a
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


@pytest.fixture
def paused_postgres():
    """A throwaway PostgreSQL cluster (it is stopped and started by the test) with a migrated
    database; yields (cluster, url)."""
    from core.db import upgrade
    from tests.support import PostgresCluster, create_database

    try:
        cluster = PostgresCluster()
        admin = cluster.start()
    except Exception as exc:
        pytest.skip(f"no throwaway PostgreSQL here: {exc}")
    url, _ = create_database(admin)
    upgrade(url)
    yield cluster, url
    cluster.stop()


def _submit(db: Database, prompts: list[str], params: dict) -> tuple[str, list[str]]:
    """A job stored as the API stores it, not yet on any queue."""
    from core import jobs as job_service
    from core.registry import ModelSpec
    from core.schemas import JobCreate

    spec = ModelSpec(name="tiny-chat", path="-", chat=True, context_length=256)
    with db.write() as s:
        job, ids = job_service.create_job(session=s, spec=JobCreate.model_validate(
            {"model": "tiny-chat", "prompts": prompts, "params": params}), model=spec,
            limits=job_service.Limits(100, 10_000), owner="alice")
    return job.id, ids


@pytest.mark.postgres
def test_three_database_outages_cost_no_attempt_and_the_worker_does_not_spin(make_settings, paused_postgres):
    import time

    import redis as redis_lib

    from core import queueing
    from tests.support import WorkerProcess, wait_until
    from tests.test_recovery import assert_each_result_stored_once, finished, running

    cluster, url = paused_postgres
    # Leases far shorter than each outage (they lapse while the database is away), one attempt
    # left after the first: any outage that costs an attempt fails the request.
    settings = make_settings(url, lease_s=2.0, max_attempts=2, reconcile_interval_s=1.0, reconcile_grace_s=1.0,
                             visibility_timeout_s=300, fault_generate_s=1.5)
    worker = WorkerProcess(settings, "tiny-chat", "--max-batch-size", "2").start()
    db = Database(url)
    broker = redis_lib.Redis.from_url(settings.redis_url)
    params = {"max_new_tokens": 8, "min_new_tokens": 8}
    try:
        job_id, ids = _submit(db, [f"p{i}" for i in range(6)], params)
        late_job, late_ids = _submit(db, ["arrives during an outage"], params)
        queueing.publish(broker, settings, model="tiny-chat", request_ids=ids)
        for outage in range(3):
            wait_until(lambda: running(db, job_id), 60, 0.01, "a batch generating")
            cluster.pause()  # the batch finishes generating while the database is away
            if outage == 0:  # a message taken in while the database is away: the intake waits
                queueing.publish(broker, settings, model="tiny-chat", request_ids=late_ids)
            time.sleep(20)  # longer than any retry budget a recorder might give up after
            cluster.resume()
        wait_until(lambda: finished(db, job_id) and finished(db, late_job), 120, what="both jobs to finish")
        rows = assert_each_result_stored_once(db, job_id, 6, 8)
        assert [r.attempts for r in rows] == [1] * 6
        assert_each_result_stored_once(db, late_job, 1, 8)
        log = worker.log_path.read_text(errors="replace")
        # The intake waited out the outages (a minute in all) with pauses growing to 5 s instead
        # of handing the message back to be delivered again at once (a hot loop of thousands).
        assert 0 < log.count("intake: database unavailable") <= 25, log[-4000:]
        assert "intake failed" not in log
    finally:
        worker.stop()
        db.dispose()
        broker.close()


def test_the_reconciler_finds_lost_work_behind_a_backlog(make_settings, sqlite_url, tmp_path):
    from tests.support import WorkerProcess, wait_until
    from tests.test_recovery import FAST_RECOVERY, finished, snapshot
    from webapi import create_app

    redis = RedisServer(tmp_path).start()
    settings = make_settings(sqlite_url, redis_url=redis.url, **{**FAST_RECOVERY, "visibility_timeout_s": 300})
    app = create_app(settings)
    client = authed(app, make_key(sqlite_url))
    db = Database(sqlite_url)
    workers = []
    try:
        lost = client.post("/v1/jobs", json={"model": "tiny-chat", "prompts": [f"lost {i}" for i in range(100)],
                                             "params": {"max_new_tokens": 2}}).get_json()
        app.extensions["batchgen"].dispatcher.wait_idle(10)
        redis.stop()
        redis.start()  # same port, no data: job A's messages are gone
        backlog = client.post("/v1/jobs", json={"model": "tiny-base", "prompts": [f"backlog {i}" for i in range(2000)],
                                                "params": {"max_new_tokens": 2}}).get_json()
        app.extensions["batchgen"].dispatcher.wait_idle(10)
        # A slow worker takes the backlog's messages (unacked while they wait in its batcher)...
        workers.append(WorkerProcess(make_settings(sqlite_url, redis_url=redis.url, redis_prefix=settings.redis_prefix,
                                                   **{**FAST_RECOVERY, "visibility_timeout_s": 300},
                                                   fault_generate_s=0.5),
                                     "tiny-base", "--max-batch-size", "8").start())
        # ...and the lost job's model gets a worker of its own, whose reconciler must find job A.
        workers.append(WorkerProcess(settings, "tiny-chat").start())
        wait_until(lambda: finished(db, lost["id"]), 30, what="the lost job, re-dispatched, to finish")
        job, rows = snapshot(db, lost["id"])
        assert job.status == "completed" and [r.attempts for r in rows] == [1] * 100
        backlog_job, _ = snapshot(db, backlog["id"])
        assert backlog_job.succeeded < 1000, "the backlog drained first: the lost job waited behind it"
    finally:
        for worker in workers:
            worker.stop()
        app.extensions["batchgen"].close()
        db.dispose()
        redis.stop()


@pytest.mark.parametrize("route", ["openai", "dashscope"])
def test_a_streamed_answer_never_splices_two_runs(make_settings, sqlite_url, route):
    import json
    import threading

    from tests.support import GunicornApi, WorkerProcess, wait_until
    from tests.test_recovery import FAST_RECOVERY

    settings = make_settings(sqlite_url, **FAST_RECOVERY)
    api = GunicornApi(settings, make_key(sqlite_url)).start()
    # The first worker streams its whole answer, then dies before storing it (as a crash would).
    first = WorkerProcess(make_settings(sqlite_url, redis_prefix=settings.redis_prefix, **FAST_RECOVERY,
                                        fault_generate_s=30), "tiny-chat").start()
    second = None
    db = Database(sqlite_url)
    events: list[dict] = []
    try:
        if route == "openai":
            url, body = "/v1/chat/completions", {
                "model": "tiny-chat", "stream": True, "max_tokens": 24, "temperature": 1.5,
                "messages": [{"role": "user", "content": "Tell me anything"}]}
        else:
            url, body = "/api/v1/services/aigc/text-generation/generation", {
                "model": "tiny-chat", "input": {"prompt": "Tell me anything"},
                "parameters": {"max_tokens": 24, "temperature": 1.5, "incremental_output": True}}
        headers = {"X-DashScope-SSE": "enable"} if route == "dashscope" else {}

        def read() -> None:
            with api.http.post(api.url + url, json=body, headers=headers, stream=True, timeout=120) as resp:
                assert resp.status_code == 200, resp.text
                for line in resp.iter_lines(decode_unicode=True):
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        events.append(json.loads(line[5:]))

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: len(events) >= 2, 60, what="the first run's text to stream")
        first.kill()
        second = WorkerProcess(settings, "tiny-chat").start()
        reader.join(120)
        assert not reader.is_alive()

        def text_of(event: dict) -> str:
            if route == "openai":
                return "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices", []))
            return (event.get("output") or {}).get("text") or ""

        streamed = "".join(text_of(e) for e in events)
        with db.read() as s:
            from core.tables import JobRequest

            row = s.scalars(select(JobRequest)).one()
        last = events[-1]
        ended_with_error = "error" in last if route == "openai" else last.get("code") == "ServiceUnavailable"
        assert ended_with_error or streamed == (row.text or ""), (streamed, row.text, last)
        if ended_with_error:
            assert (last.get("error") or last)["message"].startswith("the worker running this request stopped")
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.stop()
        api.stop()
        db.dispose()


@pytest.mark.postgres
def test_a_database_that_drops_packets_is_a_503_within_seconds_never_a_hung_thread(make_settings, paused_postgres):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tests.support import GunicornApi, PacketDrop

    why = PacketDrop.available()
    if why:
        pytest.skip(f"cannot drop packets here: {why}")
    cluster, url = paused_postgres
    settings = make_settings(url)
    api = GunicornApi(settings, make_key(url)).start()
    try:
        job = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny", "prompts": ["x"]})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]

        def call(i: int) -> tuple[int, float, dict]:
            import requests

            started = time.monotonic()
            if i % 2:
                resp = requests.get(f"{api.url}/v1/jobs/{job_id}", headers=api.http.headers, timeout=60)
            else:
                resp = requests.post(f"{api.url}/v1/jobs", json={"model": "tiny", "prompts": ["y"]},
                                     headers={**api.http.headers, "Idempotency-Key": f"k{i}"}, timeout=60)
            return resp.status_code, time.monotonic() - started, resp.json()

        with PacketDrop(cluster.port):
            # More calls at once than the process has pooled connections (5 + 10 overflow): some
            # wait on a connection that never comes, the rest on the pool.
            with ThreadPoolExecutor(30) as pool:
                answers = list(pool.map(call, range(30)))
        statuses = {status for status, _, _ in answers}
        assert statuses == {503}, [(s, b) for s, _, b in answers if s != 503][:3]
        assert max(seconds for _, seconds, _ in answers) < 15, sorted(seconds for _, seconds, _ in answers)
        assert all(body["error"]["code"] == "unavailable" and body["error"]["request_id"] for _, _, body in answers)
        # The network is back: the API recovers by itself.
        deadline = time.monotonic() + 30
        while api.http.get(f"{api.url}/v1/jobs/{job_id}").status_code != 200:
            assert time.monotonic() < deadline, "the API did not recover"
            time.sleep(0.5)
    finally:
        api.stop()


def test_a_job_answered_202_survives_the_api_killed_right_after(make_settings, database_url):
    """Sixteen clients submit single-prompt jobs at once (the API stores them in groups); as soon
    as 40 have been answered 202, the API (master and workers) is SIGKILLed. Every job answered
    202 is in the database with its request: the answer is sent only after the commit that holds
    the job, whatever group it was in."""
    import os
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from core.tables import JobRequest
    from tests.support import GunicornApi, children_running, wait_until

    settings = make_settings(database_url, rate_limit_per_minute=0)
    token = make_key(database_url)
    api = GunicornApi(settings, token, workers=2).start()
    accepted: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def client(i: int) -> None:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        n = 0
        while not killed.is_set():
            n += 1
            try:
                resp = http.post(f"{api.url}/v1/jobs", json={"model": "tiny-base", "prompts": [f"client {i} job {n}"]},
                                 timeout=10)
            except requests.RequestException:
                return
            if resp.status_code == 202:
                with lock:
                    accepted.append(resp.json()["id"])

    db = Database(database_url)
    try:
        with ThreadPoolExecutor(16) as pool:
            for i in range(16):
                pool.submit(client, i)
            wait_until(lambda: len(accepted) >= 40, 60, what="40 jobs accepted")
            for pid in [*children_running(api.pid, "cli"), api.pid]:
                os.kill(pid, signal.SIGKILL)
            killed.set()
        api.kill()
        with lock:
            answered = list(accepted)
        with db.read() as s:
            stored = dict(s.execute(select(Job.id, Job.total).where(Job.id.in_(answered))).all())
            requests_stored = s.scalar(select(func.count()).select_from(JobRequest)
                                       .where(JobRequest.job_id.in_(answered)))
        assert len(answered) >= 40
        assert set(stored) == set(answered) and set(stored.values()) == {1}
        assert requests_stored == len(answered)
    finally:
        api.stop()
        db.dispose()


def test_submissions_after_a_database_restart_are_stored_at_once(make_settings, paused_postgres):
    """The API stores submissions on a connection it keeps between groups (no pool ping per
    group). PostgreSQL restarts between two submissions: the kept connection is dead, and the
    next submission is stored on a fresh one, answered 202, not 503."""
    from webapi import create_app

    cluster, url = paused_postgres
    app = create_app(make_settings(url))
    client = authed(app, make_key(url))
    db = Database(url)
    try:
        first = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["before the restart"]})
        assert first.status_code == 202, first.get_json()
        cluster.pause()
        cluster.resume()
        second = client.post("/v1/jobs", json={"model": "tiny", "prompts": ["after the restart"]})
        assert second.status_code == 202, second.get_json()
        with db.read() as s:
            assert s.scalar(select(func.count()).select_from(Job)) == 2
    finally:
        app.extensions["batchgen"].close()
        db.dispose()
