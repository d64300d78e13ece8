"""``GET /openapi.json`` and ``GET /docs``: the API described from the pydantic models that validate
and serialize it, so the description cannot drift from what the code does.

Each route is declared once below with its models; a test checks that every Flask route is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from core.schemas import (
    JOB_STATUSES,
    REQUEST_STATUSES,
    Deleted,
    ErrorEnvelope,
    JobCreate,
    JobPage,
    JobRead,
    ResultPage,
    ResultRead,
)

bp = Blueprint("docs", __name__)

ERROR_TEXT = {
    400: "The body is not JSON.",
    401: "No API key, or not a valid one.",
    404: "No such job for this key.",
    409: "Not possible in the job's current state, or an Idempotency-Key reused for another request.",
    413: "The body is larger than the configured limit.",
    422: "The input is not valid; details lists every problem and where it is.",
    429: "A rate or capacity limit; retry after Retry-After seconds.",
    503: "The database is unavailable; retry shortly.",
}


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "query", "path" or "header"
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # OpenAPI style: /v1/jobs/{job_id}
    endpoint: str  # Flask endpoint name
    summary: str
    responses: dict[int, Any]  # status -> model, (media type, model/schema), or None
    body: type[BaseModel] | None = None
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = (401, 429, 503)
    public: bool = False
    description: str = ""


JOB_ID = Param("job_id", "path", "The job's id (job_...).", required=True)
_LIMIT = {"type": "integer", "minimum": 1}

OPERATIONS: tuple[Operation, ...] = (
    Operation("post", "/v1/jobs", "jobs.create_job", "Submit a job", body=JobCreate,
              responses={202: JobRead, 200: JobRead},
              params=(Param("Idempotency-Key", "header", "Retrying with the same key returns the job the "
                            "first request created (200) instead of a new one."),),
              errors=(400, 401, 409, 413, 422, 429, 503),
              description="Validates every request, stores the job in one transaction and queues its "
                          "requests. 202 with the new job; 200 when an Idempotency-Key replays."),
    Operation("get", "/v1/jobs", "jobs.list_jobs", "List your jobs, newest first", responses={200: JobPage},
              params=(Param("after", "query", "The last job id of the previous page."),
                      Param("limit", "query", "1-100, default 20.", {**_LIMIT, "maximum": 100}),
                      Param("status", "query", "Only jobs in this status.", {"enum": list(JOB_STATUSES)})),
              errors=(401, 422, 429, 503)),
    Operation("get", "/v1/jobs/{job_id}", "jobs.get_job", "A job: status, counts, usage, times",
              responses={200: JobRead}, params=(JOB_ID,), errors=(401, 404, 429, 503)),
    Operation("get", "/v1/jobs/{job_id}/results", "jobs.list_results", "A page of results in request order",
              responses={200: ResultPage}, errors=(401, 404, 422, 429, 503),
              params=(JOB_ID, Param("after", "query", "The last request id of the previous page."),
                      Param("limit", "query", "1-1000, default 100.", {**_LIMIT, "maximum": 1000}),
                      Param("status", "query", "Only requests in this status.",
                            {"enum": list(REQUEST_STATUSES)}))),
    Operation("get", "/v1/jobs/{job_id}/results.jsonl", "jobs.download_results",
              "Every result, one JSON object (a ResultRead) per line, streamed",
              responses={200: ("application/jsonl", {"type": "string"})}, errors=(401, 404, 422, 429, 503),
              params=(JOB_ID, Param("status", "query", "Only requests in this status.",
                                    {"enum": list(REQUEST_STATUSES)}))),
    Operation("get", "/v1/jobs/{job_id}/events", "jobs.job_events",
              "Follow a job: server-sent events until it ends",
              description="`event: progress` with a JobRead each time status, counts or usage change; "
                          "`event: end` with the final JobRead.",
              responses={200: ("text/event-stream", {"type": "string"})}, params=(JOB_ID,),
              errors=(401, 404, 429, 503)),
    Operation("post", "/v1/jobs/{job_id}/cancel", "jobs.cancel_job", "Cancel a job",
              description="Requests not started are cancelled at once; running ones finish and are kept. "
                          "The job is `cancelling` until they have, then `cancelled`.",
              responses={200: JobRead}, params=(JOB_ID,), errors=(401, 404, 409, 429, 503)),
    Operation("delete", "/v1/jobs/{job_id}", "jobs.delete_job", "Delete a job that has ended, and its results",
              responses={200: Deleted}, params=(JOB_ID,), errors=(401, 404, 409, 429, 503)),
    Operation("get", "/healthz", "health.healthz", "Liveness", public=True, errors=(),
              responses={200: ("application/json", {"type": "object", "properties": {"status": {"type": "string"}}})}),
    Operation("get", "/openapi.json", "docs.openapi_json", "This description", public=True, errors=(),
              responses={200: ("application/json", {"type": "object"})}),
    Operation("get", "/docs", "docs.docs_page", "A page that renders this description", public=True, errors=(),
              responses={200: ("text/html", {"type": "string"})}),
)


def build_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document."""
    inputs = [JobCreate]
    outputs = [JobRead, JobPage, ResultRead, ResultPage, Deleted, ErrorEnvelope]
    _, defs = models_json_schema([(m, "validation") for m in inputs] + [(m, "serialization") for m in outputs],
                                 ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        entry: dict[str, Any] = {"operationId": op.endpoint.split(".")[-1], "summary": op.summary,
                                 "responses": {}}
        if op.description:
            entry["description"] = op.description
        if op.public:
            entry["security"] = []
        if op.params:
            entry["parameters"] = [{"name": p.name, "in": p.where, "description": p.description,
                                    "required": p.required or p.where == "path", "schema": p.schema}
                                   for p in op.params]
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{op.body.__name__}"}}}}
        for status, model in op.responses.items():
            if isinstance(model, tuple):
                media, schema = model
                content = {media: {"schema": schema}}
            else:
                content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
            entry["responses"][str(status)] = {"description": "OK" if status < 300 else str(status),
                                               "content": content}
        for status in op.errors:
            entry["responses"][str(status)] = {
                "description": ERROR_TEXT[status],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "batchgen", "version": "0.1.0",
                 "description": "Batch text generation for Llama-2: submit jobs of many prompts, poll or "
                                "follow them, page or download their results."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                                      "description": "An API key from `batchgen keys create`."}}},
        "security": [{"apiKey": []}],
    }


_SPEC: dict[str, Any] | None = None


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """The OpenAPI document (built once per process)."""
    global _SPEC
    if _SPEC is None:
        _SPEC = build_spec()
    return jsonify(_SPEC)


@bp.get("/docs")
def docs_page() -> Response:
    """A self-contained page (no CDN) that renders /openapi.json."""
    html = resources.files("webapi").joinpath("static/docs.html").read_text(encoding="utf-8")
    return Response(html, mimetype="text/html")
