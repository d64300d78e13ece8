"""The worker's writer: claims and results waiting together are stored in one transaction, and a
write the database refuses does not take the others of its group down."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core import jobs
from core.db import Database
from core.jobs import Limits
from core.registry import ModelSpec
from core.runs import Outcome
from core.schemas import JobCreate
from core.tables import JobRequest
from worker.writer import Claim, Writer

MODEL = ModelSpec(name="m", path="m", chat=False, context_length=256)


@pytest.fixture
def db(database_url: str):  # type: ignore[no-untyped-def]
    database = Database(database_url)
    yield database
    database.dispose()


def submit(db: Database, n: int) -> tuple[str, list[str]]:
    with db.write() as s:
        job, ids = jobs.create_job(session=s, spec=JobCreate.model_validate({"model": "m", "prompts": ["p"] * n}),
                                   model=MODEL, limits=Limits(100, 100), owner="alice")
    return job.id, ids


def statuses(db: Database, ids: list[str]) -> list[str]:
    with db.read() as s:
        found = dict(s.execute(select(JobRequest.id, JobRequest.status).where(JobRequest.id.in_(ids))).all())
    return [found[i] for i in ids]


def test_claims_and_results_waiting_together_share_one_transaction(db: Database):
    job_id, ids = submit(db, 6)
    writer = Writer(db)
    a = writer.submit(Claim(ids=ids[:3], run_id="run_a", lease_s=60, max_attempts=3))
    b = writer.submit(Claim(ids=ids[3:], run_id="run_b", lease_s=60, max_attempts=3))
    writer.start()
    assert sorted(a.result(10)) == sorted(ids[:3]) and sorted(b.result(10)) == sorted(ids[3:])
    writer.stop()
    assert writer.transactions == 1
    # The results of run a, a claim of what run a holds (nothing: it ran), the results of run b:
    # handed over together (as slots do when their batches end and the next ones start), stored
    # together.
    writer = Writer(db)
    done_a = writer.record("run_a", [Outcome(request_id=i, job_id=job_id, text="t", finish_reason="stop",
                                             prompt_tokens=1, completion_tokens=1) for i in ids[:3]])
    again = writer.submit(Claim(ids=ids[:3], run_id="run_c", lease_s=60, max_attempts=3))
    done_b = writer.record("run_b", [Outcome(request_id=i, job_id=job_id, error_code="invalid_prompt",
                                             error_message="no") for i in ids[3:]])
    writer.start()
    assert sorted(done_a.result(10)) == sorted(ids[:3]) and again.result(10) == []
    assert sorted(done_b.result(10)) == sorted(ids[3:])
    writer.stop()
    assert writer.transactions == 1 and writer.writes == 3
    assert statuses(db, ids) == ["succeeded"] * 3 + ["failed"] * 3
    with db.read() as s:
        job = jobs.get_job(session=s, job_id=job_id)
    assert (job.status, job.succeeded, job.failed) == ("completed", 3, 3)


def test_a_write_the_database_refuses_fails_alone_and_the_others_of_its_group_are_stored(postgres_url):
    from tests.conftest import _truncate

    _truncate(postgres_url)
    db = Database(postgres_url)
    job_id, ids = submit(db, 3)
    writer = Writer(db).start()
    for n, request_id in enumerate(ids):
        assert writer.claim([request_id], f"run_{n}", lease_s=60, max_attempts=3) == [request_id]
    writer.stop()
    good = Outcome(request_id=ids[0], job_id=job_id, text="fine", finish_reason="stop", prompt_tokens=1,
                   completion_tokens=1)
    # PostgreSQL refuses this row (error_code is at most 64 characters): not an outage.
    refused = Outcome(request_id=ids[1], job_id=job_id, error_code="x" * 100, error_message="too long a code")
    writer = Writer(db)
    a, b = writer.record("run_0", [good]), writer.record("run_1", [refused])
    c = writer.submit(Claim(ids=ids[2:], run_id="run_x", lease_s=60, max_attempts=3))  # run_2 holds it
    writer.start()
    assert a.result(10) == [ids[0]] and b.result(10) == [ids[1]] and c.result(10) == []
    writer.stop()
    with db.read() as s:
        rows = {r.id: r for r in s.scalars(select(JobRequest).where(JobRequest.id.in_(ids)))}
    assert (rows[ids[0]].status, rows[ids[0]].text) == ("succeeded", "fine")
    assert (rows[ids[1]].status, rows[ids[1]].error_code) == ("failed", "store_failed")
    assert (rows[ids[2]].status, rows[ids[2]].run_id) == ("running", "run_2")
    db.dispose()
