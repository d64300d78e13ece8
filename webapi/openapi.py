"""``GET /openapi.json`` and ``GET /docs``: the API described from the pydantic models that validate
and serialize it, so the description cannot drift from what the code does.

Each route is declared once below with its models; a test checks that every Flask route is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
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
from webapi.compat import DashScopeRequest, EasRequest
from webapi.errors import ApiError
from webapi.openai.protocol import (
    BatchCreateRequest,
    BatchList,
    BatchRead,
    ChatCompletionRead,
    ChatCompletionRequest,
    CompletionRead,
    CompletionRequest,
    FileDeleted,
    FileList,
    FileObjectRead,
    ModelList,
    OpenAIError,
)
from webapi.tokenizer import DetokenizeRead, DetokenizeRequest, TokenizeRead, TokenizeRequest, TokenizerInfo

bp = Blueprint("docs", __name__)


def job_events(*names: str) -> tuple[str, dict[str, Any]]:
    """A ``text/event-stream`` of job events, described (as OpenAPI 3.1 tooling reads an event
    stream's ``schema``) one event at a time: ``event`` is one of ``names`` and ``data`` is JSON,
    a JobRead (or, for ``end``, ``{"deleted": true}`` when the job was deleted while followed).
    The stream's first block only sets ``retry``; comments keep a quiet connection alive."""
    data = {"anyOf": [{"$ref": "#/components/schemas/JobRead"},
                      {"type": "object", "properties": {"deleted": {"const": True}}, "required": ["deleted"]}]}
    return ("text/event-stream", {
        "type": "object",
        "properties": {"event": {"type": "string", "enum": list(names)},
                       "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
                       "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}},
    })

ERROR_TEXT = {
    400: "The body is not JSON.",
    401: "No API key, or not a valid one.",
    404: "Not found: no such object for this key (another owner's is answered the same), or no such file.",
    409: "Not possible in the job's current state, or an Idempotency-Key reused for another request.",
    413: "The body is larger than the configured limit.",
    422: "The input is not valid; details lists every problem and where it is.",
    429: "A rate or capacity limit; retry after Retry-After seconds.",
    503: "The database or the queue is unavailable; retry shortly.",
    504: "No result within BATCHGEN_SYNC_TIMEOUT_S; the request was cancelled if it had not started.",
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
    body: Any = None  # a model, or (media type, schema) for other bodies
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = (401, 429, 503)
    public: bool = False
    description: str = ""
    error_model: type[BaseModel] = ErrorEnvelope
    tag: str = "jobs"


JOB_ID = Param("job_id", "path", "The job's id (job_...).", required=True)
FILE_ID = Param("file_id", "path", "The file's id (file_...).", required=True)
BATCH_ID = Param("batch_id", "path", "The batch's id (batch_...).", required=True)


class DashScopeError(BaseModel):
    """Errors on the DashScope route."""

    code: str
    message: str
    request_id: str | None
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
    Operation("get", "/v1/jobs/events", "jobs.all_job_events", "Follow all your jobs: server-sent events",
              description="`event: progress` with a JobRead for each job that is active or ended in the last "
                          "minute, then again whenever one of your jobs is submitted or changes status, counts "
                          "or usage. Runs until the client disconnects, or for 10 minutes (then reconnect); keep-alive "
                          "comments every 5 s. A stream holds a server thread: past the API process's limit "
                          "(BATCHGEN_MAX_LONG_CALLS) it is refused with 429 `too_many_streams`; poll instead.",
              responses={200: job_events("progress")}, errors=(401, 429, 503)),
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
                          "`event: end` with the final JobRead. Past the API process's limit of streams: 429 "
                          "`too_many_streams`; poll GET /v1/jobs/{job_id} instead.",
              responses={200: job_events("progress", "end")}, params=(JOB_ID,),
              errors=(401, 404, 429, 503)),
    Operation("post", "/v1/jobs/{job_id}/cancel", "jobs.cancel_job", "Cancel a job",
              description="Requests not started are cancelled at once; running ones finish and are kept. "
                          "The job is `cancelling` until they have, then `cancelled`.",
              responses={200: JobRead}, params=(JOB_ID,), errors=(401, 404, 409, 429, 503)),
    Operation("delete", "/v1/jobs/{job_id}", "jobs.delete_job", "Delete a job that has ended, and its results",
              responses={200: Deleted}, params=(JOB_ID,), errors=(401, 404, 409, 429, 503)),
    # --- OpenAI-compatible ---
    Operation("get", "/tokenizer_info", "tokenizer.tokenizer_info", "The served model's special tokens and context",
              tag="openai", public=True, responses={200: TokenizerInfo}, errors=(404, 503), error_model=OpenAIError,
              description="vLLM's tokenizer routes, which evaluation harnesses (lm-eval's local-completions) "
                          "look for: no key needed."),
    Operation("post", "/tokenize", "tokenizer.tokenize", "Token ids of a text (vLLM's shape)", tag="openai",
              public=True, body=TokenizeRequest, responses={200: TokenizeRead}, errors=(400, 404, 413, 503),
              error_model=OpenAIError),
    Operation("post", "/detokenize", "tokenizer.detokenize", "The text of token ids (vLLM's shape)", tag="openai",
              public=True, body=DetokenizeRequest, responses={200: DetokenizeRead}, errors=(400, 404, 413, 503),
              error_model=OpenAIError),
    Operation("get", "/v1/models", "openai.list_models", "The models this deployment serves", tag="openai",
              responses={200: ModelList}, errors=(401, 429, 503), error_model=OpenAIError,
              description="OpenAI's model list, with each model's chat flag, context length, defaults and "
                          "the number of workers serving it now."),
    Operation("post", "/v1/files", "openai.upload_file", "Upload a batch input file (JSONL)", tag="openai",
              body=("multipart/form-data", {"type": "object", "required": ["file", "purpose"], "properties": {
                  "file": {"type": "string", "format": "binary"}, "purpose": {"enum": ["batch"]}}}),
              responses={200: FileObjectRead}, errors=(400, 401, 413, 429, 503), error_model=OpenAIError),
    Operation("get", "/v1/files", "openai.list_files", "List files", tag="openai", responses={200: FileList},
              params=(Param("after", "query", "The last file id of the previous page."),
                      Param("limit", "query", "1-10000, default 100.", {**_LIMIT, "maximum": 10000}),
                      Param("order", "query", "By creation time.", {"enum": ["asc", "desc"]}),
                      Param("purpose", "query", "Only files with this purpose.")),
              errors=(400, 401, 429, 503), error_model=OpenAIError),
    Operation("get", "/v1/files/{file_id}", "openai.get_file", "A file", tag="openai", responses={200: FileObjectRead},
              params=(FILE_ID,), errors=(401, 404, 429, 503), error_model=OpenAIError),
    Operation("get", "/v1/files/{file_id}/content", "openai.file_content", "A file's content", tag="openai",
              responses={200: ("application/jsonl", {"type": "string"})}, params=(FILE_ID,),
              errors=(401, 404, 429, 503), error_model=OpenAIError),
    Operation("delete", "/v1/files/{file_id}", "openai.delete_file", "Delete a file", tag="openai",
              responses={200: FileDeleted}, params=(FILE_ID,), errors=(401, 404, 429, 503), error_model=OpenAIError),
    Operation("post", "/v1/batches", "openai.create_batch", "Create a batch from an uploaded file", tag="openai",
              body=BatchCreateRequest, responses={200: BatchRead}, errors=(400, 401, 404, 429, 503),
              error_model=OpenAIError,
              description="The file is checked line by line; a bad file gives a `failed` batch whose `errors` "
                          "list each problem with its line. A batch is a job underneath (see /v1/jobs)."),
    Operation("get", "/v1/batches", "openai.list_batches", "List batches, newest first", tag="openai",
              responses={200: BatchList}, errors=(400, 401, 429, 503), error_model=OpenAIError,
              params=(Param("after", "query", "The last batch id of the previous page."),
                      Param("limit", "query", "1-100, default 20.", {**_LIMIT, "maximum": 100}))),
    Operation("get", "/v1/batches/{batch_id}", "openai.get_batch", "A batch", tag="openai", responses={200: BatchRead},
              params=(BATCH_ID,), errors=(401, 404, 429, 503), error_model=OpenAIError),
    Operation("post", "/v1/batches/{batch_id}/cancel", "openai.cancel_batch", "Cancel a batch", tag="openai",
              responses={200: BatchRead}, params=(BATCH_ID,), errors=(401, 404, 409, 429, 503), error_model=OpenAIError),
    Operation("post", "/v1/completions", "openai.completions", "A completion (stream: true for SSE)", tag="openai",
              body=CompletionRequest, responses={200: CompletionRead}, errors=(400, 401, 404, 429, 503, 504),
              error_model=OpenAIError),
    Operation("post", "/v1/chat/completions", "openai.chat_completions", "A chat completion (stream: true for SSE)",
              tag="openai", body=ChatCompletionRequest, responses={200: ChatCompletionRead},
              errors=(400, 401, 404, 429, 503, 504), error_model=OpenAIError),
    # --- DashScope and PAI-EAS ---
    Operation("post", "/api/v1/services/aigc/text-generation/generation", "dashscope.dashscope_generation",
              "DashScope text generation (X-DashScope-SSE: enable for SSE)", tag="compat", body=DashScopeRequest,
              responses={200: ("application/json", {"type": "object", "properties": {
                  "output": {"type": "object"}, "usage": {"type": "object"}, "request_id": {"type": "string"}}})},
              errors=(400, 401, 404, 429, 503, 504), error_model=DashScopeError),
    Operation("post", "/", "eas.eas_generate", "PAI-EAS: a text/plain prompt, or the JSON form", tag="compat",
              body=("text/plain", {"type": "string"}),
              description="JSON bodies follow the EasRequest schema and are answered "
                          '`{"response", "history"}`; text/plain is answered with the generated text.',
              responses={200: ("text/plain", {"type": "string"})}, errors=(400, 401, 404, 429, 503, 504)),
    Operation("get", "/healthz", "health.healthz", "Liveness", public=True, errors=(),
              responses={200: ("application/json", {"type": "object", "properties": {"status": {"type": "string"}}})}),
    Operation("get", "/readyz", "ops.readyz", "Readiness: database, Redis, migrations at head", public=True,
              errors=(), tag="ops", responses={200: ("application/json", {"type": "object"}),
                                               503: ("application/json", {"type": "object"})}),
    Operation("get", "/metrics", "ops.metrics", "Prometheus metrics of every process", public=True, errors=(),
              tag="ops", responses={200: ("text/plain", {"type": "string"})}),
    Operation("get", "/openapi.json", "docs.openapi_json", "This description", public=True, errors=(),
              responses={200: ("application/json", {"type": "object"})}),
    Operation("get", "/docs", "docs.docs_page", "A page that renders this description", public=True, errors=(),
              responses={200: ("text/html", {"type": "string"})}),
    Operation("get", "/", "web.index", "The web page: submit and watch jobs, chat with a model", public=True,
              errors=(), tag="web", responses={200: ("text/html", {"type": "string"})}),
    Operation("get", "/ui/{name}", "web.asset", "A file of the web page (app.js, app.css, icon.svg)", public=True,
              errors=(404,), tag="web", params=(Param("name", "path", "The file's name.", required=True),),
              responses={200: ("application/octet-stream", {"type": "string"})}),
)


def build_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document."""
    inputs = [JobCreate, BatchCreateRequest, CompletionRequest, ChatCompletionRequest, DashScopeRequest, EasRequest,
              TokenizeRequest, DetokenizeRequest]
    outputs = [JobRead, JobPage, ResultRead, ResultPage, Deleted, ErrorEnvelope, FileObjectRead, FileList,
               FileDeleted, BatchRead, BatchList, ModelList, CompletionRead, ChatCompletionRead, OpenAIError, DashScopeError,
               TokenizeRead, DetokenizeRead, TokenizerInfo]
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
        entry["tags"] = [op.tag]
        if isinstance(op.body, tuple):
            media, schema = op.body
            entry["requestBody"] = {"required": True, "content": {media: {"schema": schema}}}
        elif op.body is not None:
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
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{op.error_model.__name__}"}}}}
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "batchgen", "version": "0.1.0",
                 "description": "Batch text generation for Llama-2: submit jobs of many prompts, poll or "
                                "follow them, page or download their results. Also the OpenAI Files, "
                                "Batches and completions APIs, DashScope's text generation and PAI-EAS."},
        "tags": [{"name": "jobs", "description": "The native jobs API"},
                 {"name": "openai", "description": "OpenAI-compatible (errors and times as OpenAI has them)"},
                 {"name": "compat", "description": "DashScope and PAI-EAS request shapes"},
                 {"name": "ops", "description": "Health, readiness, metrics"},
                 {"name": "web", "description": "The web page for people"}],
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                                      "description": "An API key from `batchgen keys create`."}}},
        "security": [{"apiKey": []}],
    }


_SPEC: dict[str, Any] | None = None

# The query parameters each route takes, from the declarations above.
QUERY_PARAMS: dict[str, frozenset[str]] = {
    op.endpoint: frozenset(p.name for p in op.params if p.where == "query") for op in OPERATIONS}


def init_app(app: Flask) -> None:
    """Refuse query parameters a route does not take, as unknown body fields are refused."""

    @app.before_request
    def _known_query_parameters() -> None:
        allowed = QUERY_PARAMS.get(request.endpoint or "")
        if allowed is None:
            return
        unknown = sorted(set(request.args) - allowed)
        if unknown:
            raise ApiError(422, "invalid_request", f"unrecognized query parameter {unknown[0]!r}",
                           [{"loc": f"query.{name}", "message": "unrecognized query parameter",
                             "type": "extra_forbidden"} for name in unknown])


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
