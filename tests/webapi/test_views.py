"""The lean reads (``webapi.views``, JSON straight from Core rows) equal the documented pydantic
models (``JobRead``, ``ResultRead``) on every field, for jobs and results in every state, on
SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from core import batches, files, jobs, runs
from core.db import Database
from core.errors import NotFoundError
from core.jobs import Limits
from core.registry import ModelSpec
from core.runs import Outcome
from core.schemas import (
    ErrorInfo,
    JobCounts,
    JobCreate,
    JobRead,
    ResultRead,
    Usage,
    WebhookCreate,
    WebhookRead,
)
from core.tables import Batch, File, Job, JobRequest, utcnow
from core.webhooks import AllowList
from core.webhooks import initial_state as hook_state
from webapi.jobs import result_line
from webapi.openai.protocol import BatchRead, FileObjectRead
from webapi.openai.serving import batch_view, file_view, unix
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


# --- OpenAI batches and files ---------------------------------------------------------------


def reference_batch(batch: Batch, job: Job | None, *, created: bool = False, secret: str | None = None) -> dict:
    """The batch as ``BatchRead`` from the ORM objects (what the API answered before the lean reads)."""
    counts = {"total": 0, "completed": 0, "failed": 0}
    tokens = None
    if job is not None:
        counts = {"total": job.total, "completed": job.succeeded, "failed": job.failed}
        tokens = {"input_tokens": job.prompt_tokens, "output_tokens": job.completion_tokens,
                  "total_tokens": job.prompt_tokens + job.completion_tokens,
                  "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
    webhook = None
    if batch.webhook is not None:
        webhook = {**batch.webhook, "secret": (secret or batch.webhook_secret) if created else None}
        for name in ("last_attempt_at", "next_attempt_at", "delivered_at"):
            if webhook.get(name) is not None:
                webhook[name] = int(datetime.fromisoformat(webhook[name]).timestamp())
    return BatchRead.model_validate({
        "id": batch.id, "endpoint": batch.endpoint, "model": batch.model,
        "errors": {"data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.status, "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
        "created_at": unix(batch.created_at), "in_progress_at": unix(batch.in_progress_at),
        "expires_at": unix(batch.expires_at), "finalizing_at": unix(batch.finalizing_at),
        "completed_at": unix(batch.completed_at), "failed_at": unix(batch.failed_at),
        "expired_at": unix(batch.expired_at), "cancelling_at": unix(batch.cancelling_at),
        "cancelled_at": unix(batch.cancelled_at), "request_counts": counts, "usage": tokens,
        "metadata": batch.batch_metadata, "webhook": webhook,
    }).model_dump(mode="json")


def test_batches_and_files_read_lean_equal_the_pydantic_models(db: Database):
    import uuid

    owner = f"views-{uuid.uuid4().hex[:8]}"  # the list reads one owner's: the database may hold others'
    spec = JobCreate.model_validate({"model": "m", "prompts": ["a", "b", "c"]})
    hook = WebhookCreate(url="https://hooks.example.com/b")
    with db.write() as s:
        upload = files.create_file(session=s, owner=owner, purpose="batch", filename="in.jsonl", content=b"{}\n")
        running, job, _ = batches.create_batch(
            session=s, owner=owner, input_file_id=upload.id, endpoint="/v1/chat/completions",
            completion_window="24h", metadata={"team": "x"}, spec=spec, model=MODEL, limits=LIMITS, webhook=hook)
        created = (batches.batch_fields(running, job), reference_batch(running, job, created=True))
        failed, secret = batches.create_failed_batch(
            session=s, owner=owner, input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h",
            metadata=None, errors=[{"code": "invalid_json", "line": 2, "message": "not JSON", "param": None}],
            webhook=hook)
        assert failed.webhook_secret is None and secret.startswith("whsec_")  # the key went to its event
        failed_created = (batches.batch_fields(failed, None, secret),
                          reference_batch(failed, None, created=True, secret=secret))
        done, done_job, done_ids = batches.create_batch(
            session=s, owner=owner, input_file_id=upload.id, endpoint="/v1/completions", completion_window="1h",
            metadata=None, spec=spec, model=MODEL, limits=LIMITS)
        gone, _, _ = batches.create_batch(
            session=s, owner=owner, input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h",
            metadata=None, spec=spec, model=MODEL, limits=LIMITS)
        output = files.create_file(session=s, owner=owner, purpose="batch_output", filename="out.jsonl",
                                   content=b"x" * 10)
        ids = [running.id, failed.id, done.id, gone.id]
        file_ids = [upload.id, output.id]
    with db.write() as s:  # one with usage, done and delivered; one whose job is gone; one cancelling
        runs.claim(session=s, request_ids=done_ids, run_id="r")
        runs.record(session=s, run_id="r", outcomes=[
            Outcome(request_id=i, job_id=done_job.id, text="t", finish_reason="stop", prompt_tokens=3,
                    completion_tokens=2) for i in done_ids[:2]] + [
            Outcome(request_id=done_ids[2], job_id=done_job.id, error_code="invalid_prompt", error_message="no")])
        at = (utcnow() - timedelta(minutes=3)).isoformat().replace("+00:00", "Z")
        s.execute(update(Batch).where(Batch.id == failed.id).values(webhook={
            **hook_state(hook.url), "status": "delivered", "attempts": 2, "event_id": "evt_1", "type": "batch.failed",
            "last_attempt_at": at, "delivered_at": at, "last_response_status": 200}))
        s.execute(update(Batch).where(Batch.id == done.id).values(
            status="completed", finalizing_at=utcnow(), completed_at=utcnow(), output_file_id=output.id))
        s.execute(update(Batch).where(Batch.id == gone.id).values(job_id=None))
        batches.cancel_batch(session=s, batch_id=running.id, owner=owner)
    # the answers to their creation: the same JSON, secrets shown
    for values, reference in (created, failed_created):
        assert batch_view(values, created=True) == reference
        assert reference["webhook"]["secret"] is not None
    with db.connect() as conn:
        lean = {r.id: batch_view(r) for r in (batches.batch_row(conn, batch_id=i, owner=owner) for i in ids)}
        page, more = batches.list_batches(session=conn, owner=owner, limit=10)
        lean_files = {r.id: file_view(r) for r in (files.file_row(conn, file_id=i, owner=None) for i in file_ids)}
        file_page, _ = files.list_files(session=conn, owner=owner)
        with pytest.raises(NotFoundError):
            batches.batch_row(conn, batch_id=running.id, owner="mallory")
        with pytest.raises(NotFoundError):
            files.file_row(conn, file_id=upload.id, owner="mallory")
    with db.read() as s:
        for batch_id in ids:
            batch = s.get(Batch, batch_id)
            job_row = s.get(Job, batch.job_id) if batch.job_id else None
            assert lean[batch_id] == reference_batch(batch, job_row), batch_id
        for file_id in file_ids:
            f = s.get(File, file_id)
            assert lean_files[file_id] == FileObjectRead(
                id=f.id, bytes=f.bytes, created_at=unix(f.created_at) or 0, filename=f.filename,
                purpose=f.purpose).model_dump(mode="json")  # type: ignore[arg-type]
    assert {v["status"] for v in lean.values()} == {"cancelling", "failed", "completed", "in_progress"}
    assert lean[done.id]["usage"]["total_tokens"] == 10 and lean[done.id]["request_counts"]["failed"] == 1
    assert lean[gone.id]["usage"] is None and lean[failed.id]["webhook"]["delivered_at"] is not None
    assert [batch_view(r) for r in page] == [lean[i] for i in sorted(ids, reverse=True)] and not more
    assert [file_view(r) for r in file_page] == [lean_files[i] for i in reversed(file_ids)]  # newest first
