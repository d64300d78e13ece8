"""OpenAI shapes: the objects batchgen answers with, batch input validation, batch output files."""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterable
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.errors import InvalidRequestError, UnknownModelError
from core.registry import ModelSpec, Registry
from core.schemas import JobCreate, RequestCreate, check_text, error_details
from core.tables import JobRequest
from webapi.errors import error_body
from webapi.openai.protocol import (
    ENDPOINTS,
    AssistantMessage,
    BatchWebhookRead,
    ChatChoice,
    ChatCompletionRead,
    CompletionChoice,
    CompletionRead,
)
from webapi.parsing import parse_json
from webapi.views import fields

MAX_REPORTED_ERRORS = 1000


def unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def usage(prompt: int | None, completion: int | None) -> dict[str, int]:
    prompt, completion = prompt or 0, completion or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def system_fingerprint(model: str, model_dir: Path) -> str:
    """What OpenAI calls the backend configuration behind an answer: this batchgen's version and the
    model's weights (their file's size and time). It changes when something that can change the
    output does; equal fingerprints with ``seed`` still promise nothing (see ``SEED_DOC``)."""
    try:
        stat = (model_dir / "model.bin").stat()
        weights = f"{stat.st_size}:{int(stat.st_mtime)}"
    except OSError:
        weights = "not on this machine"
    return "fp_" + hashlib.sha256(f"{_VERSION}:{model}:{weights}".encode()).hexdigest()[:12]


def fingerprint_of(registry: Registry, model: str) -> str | None:
    """The ``system_fingerprint`` of a model's answers; None for a model no longer registered."""
    try:
        spec = registry.resolve(model)
    except Exception:  # noqa: BLE001 - UnknownModelError, or a registry file that cannot be read now
        return None
    return system_fingerprint(spec.name, registry.directory(spec))


def _version() -> str:
    try:
        return metadata.version("batchgen")
    except metadata.PackageNotFoundError:
        return "source"


_VERSION = _version()


def choices_of(row: JobRequest) -> list[dict[str, Any]]:
    """A finished request's choices: ``{index, text, finish_reason, logprobs}``, one unless it
    asked for n or best_of (then as the worker stored them, best first with best_of)."""
    detail = row.detail or {}
    if detail.get("choices"):
        return list(detail["choices"])
    return [{"index": 0, "text": row.text or "", "finish_reason": row.finish_reason, "logprobs": detail.get("logprobs")}]


def completion_tokens_of(row: JobRequest, choice: dict[str, Any] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A completion's text as OpenAI returns it (the prompt first with ``echo``) and the tokens
    its ``logprobs`` list (echoed prompt tokens first), as the worker stored them; of ``choice``
    (default: the first)."""
    choice = choice or choices_of(row)[0]
    params, logprobs = row.params or {}, choice.get("logprobs") or {}
    text = choice.get("text") or ""
    if params.get("echo"):
        prompt_tokens = logprobs.get("prompt") or []
        prompt = row.prompt
        if prompt is None:  # sent as token ids: the text they spell
            prompt = b"".join(bytes(t["bytes"]) for t in prompt_tokens).decode("utf-8", errors="replace")
        return prompt + text, prompt_tokens + (logprobs.get("content") or [])
    return text, logprobs.get("content") or []


def completion_logprobs(tokens: list[dict[str, Any]], top: bool, offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` object: tokens, their log probabilities, the alternatives as
    ``{token: logprob}`` and each token's character offset in the text (from ``offset``)."""
    offsets = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    position = offset
    for t in tokens:
        offsets.append(position)
        position += len(decoder.decode(bytes(t["bytes"])))
    return {"tokens": [_legacy_name(t) for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{_legacy_name(a): a["logprob"] for a in t.get("top_logprobs") or []}
                             if t["logprob"] is not None else None for t in tokens] if top else None,
            "text_offset": offsets}


def _legacy_name(token: dict[str, Any]) -> str:
    """A token as the legacy completions format names it: its text, or for part of a character
    ``bytes:\\xNN`` (as OpenAI writes them), so that no two alternatives share a name."""
    raw = bytes(token["bytes"])
    try:
        return raw.decode("utf-8") if raw else str(token["token"])
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def chat_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    return {"content": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"],
                         "top_logprobs": [{"token": a["token"], "logprob": a["logprob"], "bytes": a["bytes"]}
                                          for a in t.get("top_logprobs") or []]} for t in tokens],
            "refusal": None}


def completion_body(row: JobRequest, model: str, created: datetime, fingerprint: str | None = None) -> dict[str, Any]:
    """A ``text_completion`` for a finished request."""
    params = row.params or {}
    choices = []
    for choice in choices_of(row):
        text, tokens = completion_tokens_of(row, choice)
        logprobs = completion_logprobs(tokens, bool(params.get("top_logprobs"))) if params.get("logprobs") else None
        choices.append(CompletionChoice(text=text, index=choice["index"], finish_reason=choice["finish_reason"],
                                        logprobs=logprobs))  # type: ignore[arg-type]
    return CompletionRead(
        id=f"cmpl-{row.id}", created=unix(created) or 0, model=model, system_fingerprint=fingerprint,
        usage=usage(row.prompt_tokens, row.completion_tokens), choices=choices,
    ).model_dump(mode="json")


def chat_body(row: JobRequest, model: str, created: datetime, fingerprint: str | None = None) -> dict[str, Any]:
    """A ``chat.completion`` for a finished request."""
    return ChatCompletionRead(
        id=f"chatcmpl-{row.id}", created=unix(created) or 0, model=model, system_fingerprint=fingerprint,
        usage=usage(row.prompt_tokens, row.completion_tokens),
        choices=[ChatChoice(index=c["index"], message=AssistantMessage(content=c["text"] or ""),
                            finish_reason=c["finish_reason"],
                            logprobs=chat_logprobs(c["logprobs"]["content"]) if c.get("logprobs") else None)  # type: ignore[arg-type]
                 for c in choices_of(row)],
    ).model_dump(mode="json")


BODY = {"/v1/completions": completion_body, "/v1/chat/completions": chat_body}


def file_view(file: Any) -> dict[str, Any]:
    """A file as ``FileObjectRead``, from a row of ``core.files.FILE_FIELDS`` or a ``File``."""
    f = fields(file)
    return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": unix(f["created_at"]) or 0,
            "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def batch_view(batch: Any, *, created: bool = False) -> dict[str, Any]:
    """A batch as OpenAI shows it (``BatchRead``), from a row of ``core.batches.BATCH_FIELDS`` or
    the values ``batch_fields`` gives (``created``: the answer to its creation, the only one that
    shows its webhook's secret). Built without pydantic, as the native reads are; a test compares
    it with ``BatchRead`` on every field."""
    b = fields(batch)
    counts = {"total": 0, "completed": 0, "failed": 0}
    tokens = None
    if b["job_total"] is not None:
        counts = {"total": b["job_total"], "completed": b["job_succeeded"], "failed": b["job_failed"]}
        prompt, completion = b["job_prompt_tokens"], b["job_completion_tokens"]
        tokens = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
                  "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
    errors = b["errors"]
    return {
        "id": b["id"], "object": "batch", "endpoint": b["endpoint"], "model": b["model"],
        "errors": {"object": "list", "data": [_error(e.get("line"), e["code"], e["message"], e.get("param"))
                                              for e in errors]} if errors else None,
        "input_file_id": b["input_file_id"], "completion_window": b["completion_window"],
        "status": b["status"], "output_file_id": b["output_file_id"], "error_file_id": b["error_file_id"],
        "created_at": unix(b["created_at"]), "in_progress_at": unix(b["in_progress_at"]),
        "expires_at": unix(b["expires_at"]), "finalizing_at": unix(b["finalizing_at"]),
        "completed_at": unix(b["completed_at"]), "failed_at": unix(b["failed_at"]),
        "expired_at": unix(b["expired_at"]), "cancelling_at": unix(b["cancelling_at"]),
        "cancelled_at": unix(b["cancelled_at"]), "request_counts": counts, "usage": tokens,
        "metadata": b["batch_metadata"],
        "webhook": _webhook_view(b["webhook"], b.get("webhook_secret") if created else None),
    }


def _webhook_view(webhook: dict[str, Any] | None, secret: str | None) -> dict[str, Any] | None:
    if webhook is None:
        return None
    view = {**webhook, "secret": secret}
    for name in ("last_attempt_at", "next_attempt_at", "delivered_at"):
        if view.get(name) is not None:
            view[name] = int(datetime.fromisoformat(view[name]).timestamp())
    return BatchWebhookRead.model_validate(view).model_dump(mode="json")  # rare: through its model


def _error(line: int | None, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


def parse_batch_input(source: Iterable[bytes], endpoint: str, registry: Registry,
                      max_requests: int) -> tuple[JobCreate | None, ModelSpec | None, list[int], list[dict[str, Any]]]:
    """Validate an input file line by line, as its lines come (``core.files.lines``).

    Returns the job to run, its model, the file line of each request, and the errors
    (``{code, line, message, param}``, lines counted from 1); a file with any error runs nothing.
    """
    errors: list[dict[str, Any]] = []
    schema = ENDPOINTS[endpoint]
    requests: list[RequestCreate] = []
    lines: list[int] = []
    seen: dict[str, int] = {}
    model_name: str | None = None
    for number, raw_bytes in enumerate(source, start=1):
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(_error(number, "invalid_file", f"the line is not UTF-8: {exc}"))
            continue
        if not raw.strip():
            continue
        if len(requests) >= max_requests:
            errors.append(_error(None, "too_many_requests", f"a batch may hold at most {max_requests} requests"))
            break
        try:
            entry = parse_json(raw)
        except ValueError as exc:
            errors.append(_error(number, "invalid_json_line", f"not valid JSON: {exc}"))
            continue
        if not isinstance(entry, dict):
            errors.append(_error(number, "invalid_json_line", "each line must be a JSON object"))
            continue
        custom_id = entry.get("custom_id")
        if isinstance(custom_id, str):
            try:
                check_text(custom_id)
            except ValueError as exc:
                errors.append(_error(number, "invalid_request", str(exc), "custom_id"))
                continue
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 128:
            errors.append(_error(number, "missing_custom_id", "custom_id must be a string of 1 to 128 characters",
                                 "custom_id"))
            continue
        if custom_id in seen:
            errors.append(_error(number, "duplicate_custom_id", f"custom_id {custom_id!r} is already used on line "
                                 f"{seen[custom_id]}", "custom_id"))
            continue
        seen[custom_id] = number
        if entry.get("method") != "POST":
            errors.append(_error(number, "invalid_method", "method must be POST", "method"))
            continue
        if entry.get("url") != endpoint:
            errors.append(_error(number, "invalid_url", f"url must be the batch's endpoint, {endpoint}", "url"))
            continue
        extra = set(entry) - {"custom_id", "method", "url", "body"}
        if extra:
            errors.append(_error(number, "invalid_request", f"unknown field {sorted(extra)[0]!r}", sorted(extra)[0]))
            continue
        try:
            body = schema.model_validate(entry.get("body"))
        except ValidationError as exc:
            first = error_details(exc)[0]
            param = "body" if first["loc"] == "body" else f"body.{first['loc']}"
            errors.append(_error(number, "invalid_request", first["message"], param))
            continue
        if body.stream:
            errors.append(_error(number, "invalid_request", "stream is not allowed in a batch", "body.stream"))
            continue
        if model_name is None:
            model_name = body.model
        elif body.model != model_name:
            errors.append(_error(number, "mismatched_model", f"every request of a batch must use one model "
                                 f"(the first uses {model_name!r})", "body.model"))
            continue
        try:
            requests.append(body.to_request(custom_id))
        except ValidationError as exc:
            first = error_details(exc)[0]
            errors.append(_error(number, "invalid_request", first["message"], f"body.{first['loc']}"))
            continue
        lines.append(number)
    if not errors and not requests:
        errors.append(_error(None, "empty_file", "the file holds no requests"))
    model = None
    if not errors:
        try:
            model = registry.resolve(model_name or "")
        except UnknownModelError as exc:
            errors.append(_error(lines[0], "model_not_found", exc.message, "body.model"))
    if errors:
        return None, None, [], errors
    return JobCreate(model=model_name, requests=requests), model, lines, []


def errors_from_problems(exc: InvalidRequestError, lines: list[int]) -> list[dict[str, Any]]:
    """The job service's problems (``requests[i].prompt``) as batch errors on file lines."""
    out = []
    for problem in exc.details or []:
        loc = problem["loc"]
        line = None
        if loc.startswith("requests["):
            index = int(loc[len("requests["):loc.index("]")])
            line = lines[index] if index < len(lines) else None
            rest = loc[loc.index("]") + 1:].lstrip(".")
            param = f"body.{rest}" if rest else "body"
        else:
            param = None
        out.append(_error(line, problem.get("type", "invalid_request"), problem["message"], param))
    return out[:MAX_REPORTED_ERRORS]


def batch_line(row: JobRequest, endpoint: str, model: str, fingerprint: str | None = None) -> tuple[bool, bytes]:
    """One request's line of a batch's files: (True, its output file line) if it succeeded, else
    (False, its error file line), newline included."""
    line: dict[str, Any] = {"id": f"batch_req_{row.id.removeprefix('req_')}", "custom_id": row.custom_id}
    ok = row.status == "succeeded"
    if ok:
        line["response"] = {"status_code": 200, "request_id": row.id,
                            "body": BODY[endpoint](row, model, row.completed_at or row.created_at, fingerprint)}
        line["error"] = None
    elif row.status == "failed":
        status, body = error_body("openai", None, row.error_code or "generation_failed", row.error_message or "")
        line["response"] = {"status_code": status, "request_id": row.id, "body": body}
        line["error"] = None
    else:  # cancelled, expired: never ran
        code = {"cancelled": "batch_cancelled", "expired": "batch_expired"}.get(row.status, "not_run")
        message = {"batch_cancelled": "The batch was cancelled before this request ran.",
                   "batch_expired": "This request could not be run before the completion window expired."}
        line["response"] = None
        line["error"] = {"code": code, "message": message.get(code, f"The request did not run ({row.status}).")}
    return ok, (json.dumps(line) + "\n").encode()
