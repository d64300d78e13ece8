"""A worker cut off, not killed: the failure that separates a distributed system from one process.

Redis and PostgreSQL run on this machine; two workers run on hosts of their own (network
namespaces joined by veth pairs). One worker's link is cut while it generates a batch: it lives
on, its connections go silent. Its requests must be taken over by the other worker once its
lease lapses; when the link comes back, its late results must not be recorded a second time,
its stale acks must do no harm, usage must be counted once, and it must rejoin and serve.
"""

from __future__ import annotations

import time

import pytest
import redis as redis_lib
from sqlalchemy import select

from core import queueing
from core.db import Database, upgrade
from core.tables import Job, JobRequest
from tests.support import Host, PostgresCluster, RedisServer, WorkerProcess, create_database, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

NEW = 8


def rows(db: Database, job_id: str) -> list[JobRequest]:
    with db.read() as s:
        return list(s.scalars(select(JobRequest).where(JobRequest.job_id == job_id).order_by(JobRequest.idx)))


def job_row(db: Database, job_id: str) -> Job:
    with db.read() as s:
        return s.get(Job, job_id)


@pytest.fixture
def hosts(tmp_path):  # type: ignore[no-untyped-def]
    why = Host.available()
    if why:
        pytest.skip(f"cannot make hosts here: {why}")
    made = []
    try:
        for name, subnet in (("a", 71), ("b", 72)):
            made.append(Host(name, subnet).make())
        yield made
    finally:
        for host in made:
            host.remove()


def test_a_worker_cut_off_mid_batch_is_taken_over_and_its_late_results_do_no_harm(make_settings, hosts, tmp_path):
    from tests.test_faults import _submit

    a, b = hosts
    cluster = PostgresCluster(listen=("127.0.0.1", a.gateway, b.gateway), trust=("10.213.0.0/16",))
    try:
        admin = cluster.start()
    except Exception as exc:
        pytest.skip(f"no throwaway PostgreSQL here: {exc}")
    redis = RedisServer(tmp_path, bind=("127.0.0.1", a.gateway, b.gateway)).start()
    url, _ = create_database(admin)
    upgrade(url)
    db = Database(url)
    broker = redis_lib.Redis.from_url(redis.url)
    recovery = {"lease_s": 3.0, "visibility_timeout_s": 6, "reconcile_interval_s": 1.0, "reconcile_grace_s": 1.0}
    base = make_settings(url, redis_url=redis.url, **recovery)

    def on(host: Host, **extra: object):  # type: ignore[no-untyped-def]
        """The settings of a worker on ``host``: the same services, reached through its link."""
        return make_settings(url.replace("127.0.0.1", host.gateway), redis_prefix=base.redis_prefix,
                             redis_url=redis.url.replace("127.0.0.1", host.gateway), **recovery, **extra)

    params = {"max_new_tokens": NEW, "min_new_tokens": NEW}
    first = WorkerProcess(on(a, fault_generate_s=4.0), "tiny-chat", "--max-batch-size", "8", prefix=a.run)
    second = WorkerProcess(on(b), "tiny-chat", prefix=b.run)
    try:
        first.start()
        job_id, ids = _submit(db, [f"p{i}" for i in range(8)], params)
        queueing.publish(broker, base, model="tiny-chat", request_ids=ids)
        wait_until(lambda: all(r.status == "running" for r in rows(db, job_id)), 30, 0.02, "the batch generating on a")
        cut_run = rows(db, job_id)[0].run_id
        a.cut()  # mid-batch: the worker on a lives on, cut off from Redis and PostgreSQL
        second.start()
        wait_until(lambda: job_row(db, job_id).status == "completed", 90, what="b to take the job over")
        taken = rows(db, job_id)
        assert {r.status for r in taken} == {"succeeded"} and cut_run not in {r.run_id for r in taken}
        assert all(r.attempts == 2 for r in taken)  # a's run, then b's: each stored once
        before = [(r.id, r.run_id, r.text, r.completion_tokens, r.completed_at) for r in taken]
        usage = (job_row(db, job_id).succeeded, job_row(db, job_id).completion_tokens)
        assert usage == (8, 8 * NEW)

        a.heal()  # a's late results reach the database, its acks reach Redis
        time.sleep(15)  # a's recorder retries with pauses of up to 5 s; its consumer reconnects
        assert [(r.id, r.run_id, r.text, r.completion_tokens, r.completed_at) for r in rows(db, job_id)] == before
        assert (job_row(db, job_id).succeeded, job_row(db, job_id).completion_tokens) == usage
        assert first.proc is not None and first.proc.poll() is None, first.log()

        # a rejoins and serves: with b stopped, a new job runs on a alone.
        second.stop()
        later, later_ids = _submit(db, [f"q{i}" for i in range(4)], params)
        queueing.publish(broker, base, model="tiny-chat", request_ids=later_ids)
        wait_until(lambda: job_row(db, later).status == "completed", 120, what="a to serve again")
        assert {r.status for r in rows(db, later)} == {"succeeded"}
    finally:
        a.heal()
        for worker in (first, second):
            worker.stop()
        db.dispose()
        broker.close()
        redis.stop()
        cluster.stop()
