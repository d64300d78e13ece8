"""The job service on SQLite and PostgreSQL: writes, claims, exactly-once recording, paging."""

from datetime import datetime

import pytest
from sqlalchemy import func, select

from core import jobs, runs
from core.db import Database
from core.errors import InvalidRequestError
from core.jobs import Limits
from core.registry import ModelSpec
from core.runs import Outcome
from core.schemas import JobCreate
from core.tables import Job, JobRequest

CHAT = ModelSpec(name="m", path="m", chat=True, context_length=128, defaults={"max_new_tokens": 16})
BASE = ModelSpec(name="b", path="b", chat=False, context_length=128)
LIMITS = Limits(max_requests=10, max_prompt_chars=100)


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    yield database
    database.dispose()


def submit(db, payload, model=CHAT, limits=LIMITS, owner="alice"):
    with db.write() as s:
        return jobs.create_job(session=s, spec=JobCreate.model_validate(payload), model=model, limits=limits,
                               owner=owner)


def counts(db):
    with db.read() as s:
        return s.scalar(select(func.count()).select_from(Job)), s.scalar(select(func.count()).select_from(JobRequest))


def test_create_writes_job_and_requests_in_order(db):
    job, ids = submit(db, {"model": "m", "prompts": ["a", "b", "c"], "params": {"temperature": 0.5}})
    assert job.id.startswith("job_") and len(ids) == 3 and all(i.startswith("req_") for i in ids)
    with db.read() as s:
        rows = s.scalars(select(JobRequest).order_by(JobRequest.idx)).all()
        stored = s.get(Job, job.id)
    assert [r.prompt for r in rows] == ["a", "b", "c"] and [r.id for r in rows] == ids
    assert rows[0].params["temperature"] == 0.5 and rows[0].params["max_new_tokens"] == 16
    assert (stored.status, stored.total, stored.queued, stored.created_at.tzinfo is not None) == ("queued", 3, 3, True)


def test_invalid_job_reports_every_problem_and_writes_nothing(db):
    payload = {"model": "m", "requests": [
        {"prompt": "x" * 101}, {"prompt": "ok", "custom_id": "a"}, {"prompt": "ok", "custom_id": "a"},
        {"prompt": "ok", "params": {"max_new_tokens": 500}},
        {"prompt": "ok", "params": {"min_new_tokens": 20, "max_new_tokens": 10}},
    ]}
    with pytest.raises(InvalidRequestError) as err:
        submit(db, payload)
    assert [d["loc"] for d in err.value.details] == [
        "requests[0].prompt", "requests[2].custom_id", "requests[3].params.max_new_tokens",
        "requests[4].params.min_new_tokens"]
    assert counts(db) == (0, 0)


def test_too_many_requests_and_chat_input_for_base_model_are_refused(db):
    with pytest.raises(InvalidRequestError, match="not valid") as err:
        submit(db, {"model": "m", "prompts": ["a"] * 11})
    assert err.value.details[0]["type"] == "too_many_requests"
    with pytest.raises(InvalidRequestError) as err:
        submit(db, {"model": "b", "requests": [{"messages": [{"role": "user", "content": "hi"}]}],
                    "system": "s"}, model=BASE)
    assert {d["type"] for d in err.value.details} == {"not_a_chat_model"}
    assert counts(db) == (0, 0)


def test_claim_then_record_moves_counts_once(db):
    job, ids = submit(db, {"model": "m", "prompts": ["a", "b", "c"]})
    with db.write() as s:
        assert sorted(runs.claim(session=s, request_ids=ids[:2], run_id="run_1")) == sorted(ids[:2])
    with db.write() as s:  # a second run cannot take what the first holds
        assert runs.claim(session=s, request_ids=ids, run_id="run_2") == [ids[2]]
    with db.read() as s:
        j = s.get(Job, job.id)
        assert (j.status, j.queued, j.running) == ("running", 0, 3) and j.started_at is not None
    ok = Outcome(request_id=ids[0], job_id=job.id, text="x", finish_reason="length", prompt_tokens=3,
                 completion_tokens=5)
    with db.write() as s:  # a run that does not hold the claim records nothing
        assert runs.record(session=s, outcomes=[ok], run_id="run_2") == []
    with db.write() as s:
        assert runs.record(session=s, outcomes=[ok], run_id="run_1") == [ids[0]]
    with db.write() as s:  # the same request ran twice: its second result is not recorded
        assert runs.record(session=s, outcomes=[ok], run_id="run_1") == []
    with db.read() as s:
        j = s.get(Job, job.id)
        assert (j.running, j.succeeded, j.prompt_tokens, j.completion_tokens) == (2, 1, 3, 5)


def test_last_result_completes_the_job_and_all_failed_fails_it(db):
    job, ids = submit(db, {"model": "m", "prompts": ["a", "b"]})
    with db.write() as s:
        runs.claim(session=s, request_ids=ids, run_id="run_1")
        runs.record(session=s, outcomes=[Outcome(request_id=ids[0], job_id=job.id, error_code="x", error_message="m")],
                    run_id="run_1")
    with db.read() as s:
        assert s.get(Job, job.id).status == "running"
    with db.write() as s:
        runs.record(session=s, outcomes=[Outcome(request_id=ids[1], job_id=job.id, text="t", finish_reason="stop",
                                                 prompt_tokens=1, completion_tokens=1)], run_id="run_1")
    with db.read() as s:
        j = s.get(Job, job.id)
        assert (j.status, j.succeeded, j.failed) == ("completed", 1, 1) and j.completed_at is not None

    job2, ids2 = submit(db, {"model": "m", "prompts": ["a"]})
    with db.write() as s:
        runs.fail_queued(session=s, outcomes=[Outcome(request_id=ids2[0], job_id=job2.id, error_code="too_long",
                                                      error_message="m")], run_id="run_2")
    with db.read() as s:
        assert s.get(Job, job2.id).status == "failed"
        assert s.get(JobRequest, ids2[0]).error_code == "too_long"


def test_counters_always_match_the_rows(db):
    job, ids = submit(db, {"model": "m", "prompts": list("abcdefgh")})
    with db.write() as s:
        runs.claim(session=s, request_ids=ids[:6], run_id="r")
        runs.record(session=s, outcomes=[Outcome(request_id=i, job_id=job.id, text="", finish_reason="stop",
                                                 prompt_tokens=1, completion_tokens=0) for i in ids[:4]],
                    run_id="r")
    with db.read() as s:
        by_status = dict(s.execute(select(JobRequest.status, func.count()).group_by(JobRequest.status)).all())
        j = s.get(Job, job.id)
    assert by_status == {"queued": j.queued, "running": j.running, "succeeded": j.succeeded}
    assert (j.queued, j.running, j.succeeded) == (2, 2, 4)


def test_results_page_in_request_order_with_cursor_and_status_filter(db):
    job, ids = submit(db, {"model": "m", "prompts": [str(i) for i in range(7)]})
    with db.write() as s:
        runs.claim(session=s, request_ids=[ids[1], ids[4]], run_id="r")
    with db.read() as s:
        page, more = jobs.list_results(session=s, job_id=job.id, limit=3)
        assert [r.idx for r in page] == [0, 1, 2] and more
        page, more = jobs.list_results(session=s, job_id=job.id, after=page[-1].id, limit=3)
        assert [r.idx for r in page] == [3, 4, 5] and more
        page, more = jobs.list_results(session=s, job_id=job.id, after=page[-1].id, limit=3)
        assert [r.idx for r in page] == [6] and not more
        running, _ = jobs.list_results(session=s, job_id=job.id, status="running")
        assert [r.idx for r in running] == [1, 4]
        with pytest.raises(InvalidRequestError):
            jobs.list_results(session=s, job_id=job.id, after="req_unknown")


def test_prompts_too_long_for_the_context_are_refused_at_submit(db, tiny_model):
    from core.tokens import TokenCounter

    counter = TokenCounter(tiny_model / "tokenizer.json")
    payload = {"model": "m", "requests": [{"prompt": "short"}, {"prompt": "word " * 40},
                                          {"messages": [{"role": "user", "content": "word " * 40}]}],
               "params": {"max_new_tokens": 16}}
    with db.write() as s, pytest.raises(InvalidRequestError) as err:
        jobs.create_job(session=s, spec=JobCreate.model_validate(payload), model=CHAT,
                        limits=Limits(10, 10_000), counter=counter, owner="alice")
    problems = {d["loc"]: d for d in err.value.details}
    assert set(problems) == {"requests[1].prompt", "requests[2].messages"}
    assert problems["requests[1].prompt"]["type"] == "context_length_exceeded"
    assert "exceeds the context of m (128 tokens)" in problems["requests[1].prompt"]["message"]
    assert counts(db) == (0, 0)
    # Fits once fewer new tokens are asked for; and without a tokenizer here the worker decides.
    roomy = Limits(10, 10_000)
    submit(db, {"model": "m", "prompts": ["word " * 20], "params": {"max_new_tokens": 8}}, limits=roomy)
    with db.write() as s:
        jobs.create_job(session=s, spec=JobCreate.model_validate({"model": "m", "prompts": ["word " * 100]}),
                        model=CHAT, limits=roomy, counter=None, owner="alice")
    assert counts(db) == (2, 2)


def test_nul_in_generated_text_is_stored_on_every_backend(db):
    job, ids = submit(db, {"model": "m", "prompts": ["a"]})
    with db.write() as s:
        runs.claim(session=s, request_ids=ids, run_id="r")
        assert runs.record(session=s, outcomes=[Outcome(request_id=ids[0], job_id=job.id, text="x\x00y",
                                                        finish_reason="stop", prompt_tokens=1,
                                                        completion_tokens=3)], run_id="r") == ids
    with db.read() as s:
        assert s.get(JobRequest, ids[0]).text == "x\ufffdy"


def finished(job_id, request_id, text="t"):
    return Outcome(request_id=request_id, job_id=job_id, text=text, finish_reason="stop", prompt_tokens=1,
                   completion_tokens=1)


def test_cancel_keeps_running_requests_and_ends_when_they_do(db):
    job, ids = submit(db, {"model": "m", "prompts": ["a", "b", "c"]})
    with db.write() as s:
        runs.claim(session=s, request_ids=ids[:1], run_id="r")
        j = jobs.cancel_job(session=s, job_id=job.id, owner="alice")
        assert (j.status, j.queued, j.running, j.cancelled) == ("cancelling", 0, 1, 2)
    with db.write() as s:  # a worker that took the cancelled ones now cannot claim them
        assert runs.claim(session=s, request_ids=ids, run_id="r2") == []
        runs.record(session=s, outcomes=[finished(job.id, ids[0])], run_id="r")
    with db.read() as s:
        j = s.get(Job, job.id)
        assert (j.status, j.succeeded, j.cancelled) == ("cancelled", 1, 2) and j.completed_at is not None
    job2, ids2 = submit(db, {"model": "m", "prompts": ["x"]})
    with db.write() as s:
        runs.claim(session=s, request_ids=ids2, run_id="r3")
        runs.record(session=s, outcomes=[finished(job2.id, ids2[0])], run_id="r3")
    with db.write() as s, pytest.raises(jobs.ConflictError):
        jobs.cancel_job(session=s, job_id=job2.id, owner="alice")  # completed: too late


def test_expiry_stops_what_has_not_started_and_keeps_what_ran(db):
    from datetime import timedelta

    from core.tables import utcnow

    job, ids = submit(db, {"model": "m", "prompts": ["a", "b", "c"], "completion_window": "1h"})
    with db.write() as s:
        runs.claim(session=s, request_ids=ids[:1], run_id="r")
        runs.record(session=s, outcomes=[finished(job.id, ids[0])], run_id="r")
    later = utcnow() + timedelta(hours=2)
    with db.write() as s:
        assert runs.claim(session=s, request_ids=ids[1:2], run_id="r", now=later) == []  # too late to start
        assert jobs.expire_due(session=s, now=utcnow()) == []  # not yet
        assert jobs.expire_due(session=s, now=later) == [job.id]
        assert jobs.expire_due(session=s, now=later) == []  # once
    with db.read() as s:
        j = s.get(Job, job.id)
        rows = {r.id: r.status for r in s.scalars(select(JobRequest).where(JobRequest.job_id == job.id))}
    assert (j.status, j.succeeded, j.expired, j.queued) == ("expired", 1, 2, 0)
    assert [rows[i] for i in ids] == ["succeeded", "expired", "expired"]


def test_janitor_expires_due_jobs(db):
    from core.tables import utcnow
    from worker.janitor import Janitor

    job, _ = submit(db, {"model": "m", "prompts": ["a"]})
    with db.write() as s:
        s.execute(jobs.update(Job).where(Job.id == job.id).values(expires_at=utcnow()))
    assert Janitor(db).run_once() == [job.id]


def test_estimated_completion_follows_the_rate_so_far():
    from datetime import UTC, timedelta

    start = datetime(2026, 1, 1, tzinfo=UTC)
    # 4 done in 40 s, 8 left: 80 s more
    assert jobs.estimated_completion(status="running", started_at=start, done=4, left=8,
                                     now=start + timedelta(seconds=40)) == start + timedelta(seconds=120)
    assert jobs.estimated_completion(status="queued", started_at=None, done=0, left=4) is None


def test_requests_named_by_id_or_job_are_found_that_way_not_through_the_status_index(sqlite_url):
    """Claims, lease renewals, cancels and expiry name their requests (by id, run or job): their
    plans must find them that way. With bound parameters SQLite chose the status index instead,
    reading every queued request of the database at every claim (the cost of a claim grew with
    the backlog)."""
    import sqlite3

    from sqlalchemy import event

    db = Database(sqlite_url)
    job, ids = submit(db, {"model": "m", "prompts": ["a", "b", "c", "d"]})
    other, _ = submit(db, {"model": "m", "prompts": ["e"]})
    seen: list[tuple[str, tuple]] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def _capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith(("UPDATE JOB_REQUESTS", "SELECT JOB_REQUESTS.ID")) and not executemany:
            seen.append((statement, tuple(parameters)))

    with db.write() as s:
        runs.claim(session=s, request_ids=ids[:2], run_id="r")
        runs.renew_leases(session=s, run_ids=["r"], lease_s=60)
        jobs.cancel_job(session=s, job_id=other.id, owner="alice")
    assert len(seen) >= 3
    path = sqlite_url.removeprefix("sqlite:///")
    raw = sqlite3.connect(path)
    for statement, parameters in seen:
        plan = " ; ".join(row[3] for row in raw.execute("EXPLAIN QUERY PLAN " + statement, parameters))
        assert "ix_job_requests_status" not in plan, (statement, plan)
    raw.close()
    db.dispose()


def test_a_claim_tried_again_by_its_own_run_gets_what_the_run_holds(db):
    """A claim's commit went through but its answer was lost: the writer tries the same claim
    again. The run gets its requests back (not nothing, which would leave them running under a
    run that lets go of them), and nothing is counted twice."""
    job, ids = submit(db, {"model": "m", "prompts": ["a", "b"]})
    with db.write() as s:
        assert sorted(runs.claim(session=s, request_ids=ids, run_id="r1")) == sorted(ids)
    with db.write() as s:
        assert sorted(runs.claim(session=s, request_ids=ids, run_id="r1")) == sorted(ids)
        assert runs.claim(session=s, request_ids=ids, run_id="r2") == []  # another live run gets nothing
    with db.read() as s:
        j = s.get(Job, job.id)
        assert (j.queued, j.running) == (0, 2)
        assert {r.attempts for r in s.scalars(select(JobRequest).where(JobRequest.job_id == job.id))} == {1}
