"""The native jobs API: submit a job, read it, page through its results."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import ValidationError

from core import jobs as job_service
from core.errors import UnknownModelError
from core.schemas import (
    ErrorInfo,
    JobCounts,
    JobCreate,
    JobRead,
    ResultPage,
    ResultRead,
    Usage,
    error_details,
)
from core.tables import Job, JobRequest
from webapi.dispatch import DispatchError
from webapi.errors import ApiError
from webapi.services import services

log = logging.getLogger("batchgen.api")
bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

MAX_PAGE = 1000
RESULT_STATUSES = ("queued", "running", "succeeded", "failed")


def json_body() -> Any:
    """The request body parsed as JSON, whatever its content type; 400 if it is not JSON."""
    raw = request.get_data(cache=False)
    if not raw:
        raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None


def job_read(job: Job) -> JobRead:
    """The API view of a job row."""
    return JobRead(
        id=job.id, model=job.model, status=job.status,  # type: ignore[arg-type]
        counts=JobCounts(total=job.total, queued=job.queued, running=job.running,
                         succeeded=job.succeeded, failed=job.failed),
        usage=Usage(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens,
                    total_tokens=job.prompt_tokens + job.completion_tokens),
        params=job.params, system=job.system, created_at=job.created_at,
        started_at=job.started_at, completed_at=job.completed_at,
    )


def result_read(row: JobRequest) -> ResultRead:
    """The API view of one request and its result."""
    return ResultRead(
        id=row.id, index=row.idx, custom_id=row.custom_id, status=row.status,  # type: ignore[arg-type]
        prompt=row.prompt, messages=row.messages, text=row.text,
        finish_reason=row.finish_reason,  # type: ignore[arg-type]
        prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
        error=ErrorInfo(code=row.error_code, message=row.error_message or "") if row.error_code else None,
        created_at=row.created_at, completed_at=row.completed_at,
    )


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(422, "invalid_request", f"'{name}' must be an integer from {low} to {high}",
                       [{"loc": f"query.{name}", "message": f"must be an integer from {low} to {high}",
                         "type": "invalid_query"}])
    return value


@bp.post("")
def create_job() -> tuple[Response, int, dict[str, str]]:
    """Validate and store a job in one transaction, dispatch its requests, answer 202."""
    body = json_body()
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the request body must be a JSON object",
                       [{"loc": "body", "message": "expected an object", "type": "object_type"}])
    try:
        spec = JobCreate.model_validate(body)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", "the job is not valid", error_details(exc)) from None
    svc = services()
    try:
        model = svc.registry().resolve(spec.model)
    except UnknownModelError as exc:
        raise ApiError(422, exc.code, exc.message,
                       [{"loc": "model", "message": exc.message, "type": exc.code}]) from None
    limits = job_service.Limits(max_requests=svc.settings.max_requests_per_job,
                                max_prompt_chars=svc.settings.max_prompt_chars)
    with svc.db.write() as session:
        job, request_ids = job_service.create_job(session=session, spec=spec, model=model, limits=limits,
                                                  counter=svc.token_counter(model))
    log.info("job accepted: %d requests for %s", job.total, job.model, extra={"job_id": job.id})
    _dispatch(job, request_ids)
    location = url_for("jobs.get_job", job_id=job.id)
    return jsonify(job_read(job).model_dump(mode="json")), 202, {"Location": location}


def _dispatch(job: Job, request_ids: list[str]) -> None:
    svc = services()

    def mark_done(job_id: str) -> None:
        with svc.db.write() as session:
            job_service.mark_dispatched(session=session, job_id=job_id)

    if len(request_ids) > svc.settings.inline_dispatch_limit:
        svc.dispatcher.dispatch_later(job_id=job.id, model=job.model, request_ids=request_ids,
                                      on_done=mark_done)
        return
    try:
        svc.dispatcher.dispatch(model=job.model, request_ids=request_ids)
    except DispatchError:
        # The job is stored and stays queued; it is not lost. It is answered 202 all the same.
        log.exception("dispatch failed; job stored but not yet on a queue", extra={"job_id": job.id})
        return
    mark_done(job.id)


@bp.get("/<job_id>")
def get_job(job_id: str) -> dict[str, Any]:
    """Status, counts, usage and timestamps of one job."""
    with services().db.read() as session:
        job = job_service.get_job(session=session, job_id=job_id)
        return job_read(job).model_dump(mode="json")


@bp.get("/<job_id>/results")
def list_results(job_id: str) -> dict[str, Any]:
    """A page of results in request order: ``after`` (a request id), ``limit``, ``status``."""
    limit = _int_arg("limit", 100, 1, MAX_PAGE)
    status = request.args.get("status")
    if status is not None and status not in RESULT_STATUSES:
        raise ApiError(422, "invalid_request", f"'status' must be one of {', '.join(RESULT_STATUSES)}",
                       [{"loc": "query.status", "message": "unknown status", "type": "invalid_query"}])
    with services().db.read() as session:
        rows, has_more = job_service.list_results(session=session, job_id=job_id,
                                                  after=request.args.get("after"), limit=limit,
                                                  status=status)
        data = [result_read(r) for r in rows]
    page = ResultPage(data=data, first_id=data[0].id if data else None,
                      last_id=data[-1].id if data else None, has_more=has_more)
    return page.model_dump(mode="json")
