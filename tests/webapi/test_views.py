"""The lean reads (``webapi.views``, JSON straight from Core rows) equal the documented pydantic
models (``JobRead``, ``ResultRead``) on every field, for jobs and results in every state, on
SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from core import jobs, runs
from core.db import Database
from core.jobs import Limits
from core.runs import Outcome
from core.registry import ModelSpec
from core.schemas import ErrorInfo, JobCounts, JobRead, ResultRead, Usage, WebhookRead
from core.tables import Job, JobRequest, utcnow
from core.webhooks import AllowList
from webapi.jobs import result_line
from webapi.views import job_view, result_view, window

MODEL = ModelSpec(name="m", path="m", chat=True, context_length=256, defaults={"max_new_tokens": 16})
LIMITS = Limits(max_requests=10, max_prompt_chars=1000, webhooks=AllowList.parse("*"))


@pytest.fixture
def db(database_url: str):  # type: ignore[no-untyped-def]
    database = Database(database_url)
    yield database
    database.dispose()


NOW = utcnow()


def reference_job(job: Job, *, created: bool = False) -> dict:
    """The job as ``JobRead`` reads from the ORM object, built field by field (what the API
    answered before the lean reads)."""
    webhook = None
    if job.webhook is not None:
        webhook = WebhookRead.model_validate({**job.webhook, "secret": job.webhook_secret if created else None})
    return JobRead(
        id=job.id, model=job.model, kind=job.kind, status=job.status,  # type: ignore[arg-type]
        counts=JobCounts(total=job.total, queued=job.queued, running=job.running, succeeded=job.succeeded,
                         failed=job.failed, cancelled=job.cancelled, expired=job.expired),
        usage=Usage(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens,
                    total_tokens=job.prompt_tokens + job.completion_tokens),
        params=job.params, system=job.system, priority=job.priority, metadata=job.job_metadata, owner=job.owner,
        completion_window=window(job.completion_window_s), created_at=job.created_at, started_at=job.started_at,
        completed_at=job.completed_at, expires_at=job.expires_at, cancel_requested_at=job.cancel_requested_at,
        estimated_completion_at=jobs.estimated_completion(
            status=job.status, started_at=job.started_at, done=job.succeeded + job.failed,
            left=job.queued + job.running, now=NOW),
        webhook=webhook,
    ).model_dump(mode="json")


def reference_result(row: JobRequest) -> ResultRead:
    detail = row.detail or {}
    return ResultRead(
        id=row.id, index=row.idx, custom_id=row.custom_id, status=row.status,  # type: ignore[arg-type]
        prompt=row.prompt, messages=row.messages, prompt_ids=row.prompt_ids, text=row.text,
        finish_reason=row.finish_reason,  # type: ignore[arg-type]
        prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens, logprobs=detail.get("logprobs"),
        continuations=row.continuations, scores=detail.get("scores"), choices=detail.get("choices"),
        error=ErrorInfo(code=row.error_code, message=row.error_message or "") if row.error_code else None,
        created_at=row.created_at, completed_at=row.completed_at)


def submit(db: Database, payload: dict) -> tuple[jobs.NewJob, list[str]]:
    from core.schemas import JobCreate

    new = jobs.prepare_job(spec=JobCreate.model_validate({"model": "m", **payload}), model=MODEL, limits=LIMITS,
                           owner="alice", idempotency_key=payload.get("metadata", {}).get("key"))
    with db.write() as s:
        jobs.insert_jobs(s.connection(), [new])
    return new, new.request_ids


TOKEN = {"token": "Hi", "bytes": [72, 105], "logprob": -0.5,
         "top_logprobs": [{"token": "Hi", "bytes": [72, 105], "logprob": -0.5}]}


def test_jobs_read_lean_equal_the_pydantic_model_in_every_state(db: Database):
    made = []
    # queued, with everything a job can carry
    new, _ = submit(db, {"prompts": ["a", "b"], "system": "Be brief", "priority": 7, "completion_window": "90m",
                         "metadata": {"team": "x", "key": "k1"}, "params": {"temperature": 0.3, "stop": ["\n"]},
                         "webhook": {"url": "https://hooks.example.com/x"}})
    made.append(new)
    # the answer to its submission: the same JSON as the stored row gives, with the secret
    with db.read() as s:
        orm = s.get(Job, new.id)
        assert job_view(new.row, created=True) == reference_job(orm, created=True)
        assert job_view(new.row, created=True)["webhook"]["secret"] == new.values["webhook_secret"]
    # running (an estimated end), completed with usage, failed, cancelled, expired
    running, ids = submit(db, {"prompts": ["c", "d", "e"]})
    with db.write() as s:
        runs.claim(session=s, request_ids=ids, run_id="r1", now=utcnow() - timedelta(seconds=5))
        runs.record(session=s, outcomes=[Outcome(request_id=ids[0], job_id=running.id, text="ok", finish_reason="stop",
                                                 prompt_tokens=3, completion_tokens=2)], run_id="r1")
    done, ids = submit(db, {"prompts": ["f"]})
    with db.write() as s:
        runs.claim(session=s, request_ids=ids, run_id="r2")
        runs.record(session=s, outcomes=[Outcome(request_id=ids[0], job_id=done.id, text="fine", finish_reason="length",
                                                 prompt_tokens=4, completion_tokens=16)], run_id="r2")
    failed, ids = submit(db, {"prompts": ["g"]})
    with db.write() as s:
        runs.claim(session=s, request_ids=ids, run_id="r3")
        runs.record(session=s, outcomes=[Outcome(request_id=ids[0], job_id=failed.id, error_code="invalid_prompt",
                                                 error_message="no")], run_id="r3")
    cancelled, _ = submit(db, {"prompts": ["h"]})
    expired, _ = submit(db, {"prompts": ["i"], "kind": "score"})
    with db.write() as s:
        jobs.cancel_job(session=s, job_id=cancelled.id, owner="alice")
        s.execute(update(Job).where(Job.id == expired.id).values(expires_at=utcnow() - timedelta(seconds=1)))
        jobs.expire_due(session=s)
    made += [running, done, failed, cancelled, expired]
    ids = [m.id for m in made]
    with db.connect() as conn:
        lean = {r.id: job_view(r, now=NOW) for r in conn.execute(select(*jobs.JOB_FIELDS).where(Job.id.in_(ids)))}
        page, _ = jobs.list_jobs(session=conn, owner="alice", limit=10)
    with db.read() as s:
        orm = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
        for job_id in ids:
            assert lean[job_id] == reference_job(orm[job_id]), job_id
    statuses = {lean[m.id]["status"] for m in made}
    assert statuses == {"queued", "running", "completed", "failed", "cancelled", "expired"}
    assert lean[running.id]["estimated_completion_at"] is not None
    assert lean[made[0].id]["webhook"]["secret"] is None and lean[made[0].id]["metadata"]["team"] == "x"
    assert [job_view(r, now=NOW) for r in page] == [lean[i] for i in sorted(ids, reverse=True)]  # the list reads the same


def test_results_read_lean_equal_the_pydantic_model_in_every_state(db: Database):
    new, ids = submit(db, {"requests": [
        {"prompt": "plain", "custom_id": "c0"}, {"messages": [{"role": "user", "content": "Héllo ☃"}]},
        {"prompt_ids": [5, 6, 7]}, {"prompt": "with logprobs"}, {"prompt": "with samples"}, {"prompt": "fails"},
        {"prompt": "waits"}]})
    logprobs = {"logprobs": {"content": [TOKEN, {"token": " x", "bytes": [32, 120], "logprob": -12.25}]}}
    choices = {"choices": [{"index": 0, "text": "a", "finish_reason": "stop", "completion_tokens": 1,
                            "logprobs": None},
                           {"index": 1, "text": "b", "finish_reason": "length", "completion_tokens": 2,
                            "logprobs": {"prompt": [TOKEN], "content": [TOKEN]}}]}
    with db.write() as s:
        runs.claim(session=s, request_ids=ids[:6], run_id="r")
        runs.record(session=s, run_id="r", outcomes=[
            Outcome(request_id=ids[0], job_id=new.id, text="out", finish_reason="stop", prompt_tokens=2,
                    completion_tokens=1),
            Outcome(request_id=ids[1], job_id=new.id, text="snow ☃", finish_reason="length", prompt_tokens=9,
                    completion_tokens=3),
            Outcome(request_id=ids[2], job_id=new.id, text="", finish_reason="stop", prompt_tokens=4,
                    completion_tokens=0),
            Outcome(request_id=ids[3], job_id=new.id, text="x", finish_reason="stop", prompt_tokens=3,
                    completion_tokens=2, detail=logprobs),
            Outcome(request_id=ids[4], job_id=new.id, text="a", finish_reason="stop", prompt_tokens=3,
                    completion_tokens=3, detail=choices),
            Outcome(request_id=ids[5], job_id=new.id, error_code="context_length_exceeded", error_message="too long"),
        ])
    scored, sids = submit(db, {"kind": "score", "requests": [{"prompt": "The sky is", "continuations": [" blue"]}]})
    scores = {"scores": [{"continuation": " blue", "tokens": [TOKEN], "logprob": -0.5, "perplexity": 1.6,
                          "is_greedy": True}]}
    with db.write() as s:
        runs.claim(session=s, request_ids=sids, run_id="s")
        runs.record(session=s, run_id="s", outcomes=[Outcome(request_id=sids[0], job_id=scored.id, prompt_tokens=4,
                                                             completion_tokens=0, detail=scores)])
    with db.connect() as conn:
        rows, more = jobs.list_results(session=conn, job_id=new.id, limit=100)
        rows += jobs.list_results(session=conn, job_id=scored.id, limit=100)[0]
    assert not more and len(rows) == 8
    with db.read() as s:
        orm = {r.id: r for r in s.scalars(select(JobRequest))}
    for row in rows:
        reference = reference_result(orm[row.id])
        assert result_view(row) == reference.model_dump(mode="json"), row.id
        # a line of the results download, as the model writes it
        assert json.loads(result_line(row)) == json.loads(reference.model_dump_json()), row.id
    assert {result_view(r)["status"] for r in rows} == {"succeeded", "failed", "queued"}
