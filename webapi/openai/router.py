"""OpenAI-compatible routes: Files, Batches, and synchronous (streaming) completions.

Errors on these routes are OpenAI-shaped (``{"error": {message, type, param, code}}``, see
``webapi.errors``); times are Unix seconds.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request

from core import batches as batch_service
from core import files as file_service
from core.errors import InvalidRequestError
from core.schemas import JobCreate, check_metadata
from webapi import sse
from webapi.auth import current_principal
from webapi.errors import ApiError, attachment, error_body, failed_call
from webapi.openai import protocol, serving
from webapi.ops import live_workers
from webapi.parsing import choice_arg, int_arg, json_body, validated
from webapi.services import services
from webapi.sync import stream_restarted

log = logging.getLogger("batchgen.api")
bp = Blueprint("openai", __name__, url_prefix="/v1")


def _page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


# --- models --------------------------------------------------------------------------------


@bp.get("/models")
def list_models() -> dict[str, Any]:
    """The registered models, with how many workers serve each now."""
    registry = services().registry()
    workers = live_workers()
    data = []
    for spec in registry:
        try:
            created = int(registry.directory(spec).stat().st_mtime)
        except OSError:
            created = 0
        data.append(protocol.ModelRead(
            id=spec.name, created=created, chat=spec.chat, family=spec.family,
            chat_format="checkpoint" if spec.chat_template else "llama-2" if spec.chat else "none",
            system_prompt=spec.chat and spec.system_prompt, stop_token_ids=list(spec.stop_token_ids),
            context_length=spec.context_length,
            aliases=list(spec.aliases), description=spec.description, defaults=spec.defaults,
            workers=None if workers is None else len(workers.get(spec.name, [])),
            serving=None if workers is None else [protocol.ServingWorker(**w) for w in workers.get(spec.name, [])]))
    return protocol.ModelList(data=data).model_dump(mode="json")


# --- files ---------------------------------------------------------------------------------


@bp.post("/files")
def upload_file() -> dict[str, Any]:
    """Upload a JSONL file for a batch (multipart: ``file`` and ``purpose=batch``)."""
    svc = services()
    if request.content_length:  # refused before the body is read (or spooled to disk) if it cannot fit
        with svc.db.read() as session:
            svc.limits.check_upload(session=session, principal=current_principal(), size=request.content_length)
    purpose = request.form.get("purpose")
    upload = request.files.get("file")
    if purpose not in file_service.PURPOSES_ACCEPTED:
        raise ApiError(400, "invalid_request", "purpose must be 'batch'",
                       [{"loc": "purpose", "message": "unsupported purpose", "type": "invalid_value"}])
    if upload is None:
        raise ApiError(400, "invalid_request", "send the file as multipart form field 'file'",
                       [{"loc": "file", "message": "missing", "type": "missing"}])
    # Keep the name printable: control characters (NUL among them) are dropped.
    filename = "".join(c for c in (upload.filename or "") if c.isprintable())[:255] or "upload.jsonl"
    upload.stream.seek(0, 2)  # werkzeug spooled it (to disk when large): its size, without reading it
    size = upload.stream.tell()
    upload.stream.seek(0)
    with svc.db.write() as session:
        svc.limits.check_upload(session=session, principal=current_principal(), size=size)
        file = file_service.create_file(session=session, owner=current_principal().owner, purpose=purpose,
                                        filename=filename, content=upload.stream)  # a part at a time
        return serving.file_view(file)


@bp.get("/files")
def list_files() -> dict[str, Any]:
    order = choice_arg("order", ("asc", "desc"), "desc")
    with services().db.connect() as conn:
        rows, more = file_service.list_files(session=conn, owner=current_principal().owner_filter,
                                             after=request.args.get("after"), limit=int_arg("limit", 100, 1, 10_000),
                                             order=order, purpose=request.args.get("purpose"))
    return _page([serving.file_view(f) for f in rows], more)


@bp.get("/files/<file_id>")
def get_file(file_id: str) -> dict[str, Any]:
    with services().db.connect() as conn:
        file = file_service.file_row(conn, file_id=file_id, owner=current_principal().owner_filter)
    return serving.file_view(file)


@bp.get("/files/<file_id>/content")
def file_content(file_id: str) -> Response:
    svc = services()
    with svc.db.connect() as conn:
        file = file_service.file_row(conn, file_id=file_id, owner=current_principal().owner_filter)
    size, filename = file.bytes, file.filename
    held = svc.limits.take_long_call(current_principal())  # a download lasts: it counts among long calls
    try:
        response = Response(file_service.parts(svc.db, file_id), mimetype="application/jsonl",
                            headers={"Content-Disposition": attachment(filename), "Content-Length": str(size)})
    except BaseException:
        held.release()
        raise
    response.call_on_close(held.release)
    return response


@bp.delete("/files/<file_id>")
def delete_file(file_id: str) -> dict[str, Any]:
    with services().db.write() as session:
        file_service.delete_file(session=session, file_id=file_id, owner=current_principal().owner_filter)
    return {"id": file_id, "object": "file", "deleted": True}


# --- batches -------------------------------------------------------------------------------


@bp.post("/batches")
def create_batch() -> dict[str, Any]:
    """Validate the input file line by line and run it as a job; a bad file fails the batch."""
    principal = current_principal()
    req = validated(protocol.BatchCreateRequest, json_body())
    try:
        check_metadata(req.metadata)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc), [{"loc": "metadata", "message": str(exc),
                                                           "type": "invalid_value"}]) from None
    svc = services()
    svc.submissions.check_webhook(req.webhook, principal.owner)
    with svc.db.connect() as conn:
        file = file_service.file_row(conn, file_id=req.input_file_id, owner=principal.owner)
    if file.purpose != "batch":
        raise ApiError(400, "invalid_request", f"file {file.id} has purpose {file.purpose!r}, not 'batch'",
                       [{"loc": "input_file_id", "message": "not a batch input file", "type": "invalid_value"}])
    input_file_id, size = file.id, file.bytes
    with svc.limits.body_slot(size):  # parsing a big file at once costs memory: a few at a time
        spec, model, lines, errors = serving.parse_batch_input(
            file_service.lines(file_service.parts(svc.db, input_file_id)), req.endpoint, svc.registry(),
            svc.settings.max_requests_per_job)
    if not errors:
        assert spec is not None and model is not None
        try:
            batch, done = svc.submissions.submit_batch(
                owner=principal.owner, input_file_id=input_file_id, endpoint=req.endpoint,
                completion_window=req.completion_window, metadata=req.metadata, spec=spec, model=model,
                webhook=req.webhook)
        except InvalidRequestError as exc:  # what only the model can tell (a prompt too long for it)
            errors = serving.errors_from_problems(exc, lines)
        else:
            return serving.batch_view(batch_service.batch_fields(batch, done.job), created=True)
    with svc.db.write() as session:
        batch, secret = batch_service.create_failed_batch(
            session=session, owner=principal.owner, input_file_id=input_file_id, endpoint=req.endpoint,
            completion_window=req.completion_window, metadata=req.metadata, errors=errors, webhook=req.webhook)
    log.info("batch failed validation with %d errors", len(errors))
    return serving.batch_view(batch_service.batch_fields(batch, None, secret), created=True)


def _view(batch_id: str, owner: str | None) -> dict[str, Any]:
    """The batch as it is (reading never writes: the API's finalizer ends batches whose job ended)."""
    with services().db.connect() as conn:
        batch = batch_service.batch_row(conn, batch_id=batch_id, owner=owner)
    return serving.batch_view(batch)


@bp.get("/batches/<batch_id>")
def get_batch(batch_id: str) -> dict[str, Any]:
    return _view(batch_id, current_principal().owner_filter)


@bp.get("/batches")
def list_batches() -> dict[str, Any]:
    owner = current_principal().owner_filter
    with services().db.connect() as conn:  # one query: the batches with their jobs' counts
        rows, more = batch_service.list_batches(session=conn, owner=owner, after=request.args.get("after"),
                                                limit=int_arg("limit", 20, 1, 100))
    return _page([serving.batch_view(b) for b in rows], more)


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> dict[str, Any]:
    owner = current_principal().owner_filter
    with services().db.write() as session:
        batch_service.cancel_batch(session=session, batch_id=batch_id, owner=owner)
    return _view(batch_id, owner)


# --- synchronous completions ---------------------------------------------------------------


def _start(endpoint: str) -> tuple[Any, Any, Any]:
    principal = current_principal()
    req = validated(protocol.ENDPOINTS[endpoint], json_body())
    svc = services()
    model = svc.submissions.resolve(req.model)
    spec = JobCreate(model=model.name, requests=[req.to_request()])
    call = svc.sync.start(principal=principal, spec=spec, model=model, stream=bool(req.stream))
    return req, model, call


@bp.post("/completions")
def completions() -> Any:
    return _complete("/v1/completions")


@bp.post("/chat/completions")
def chat_completions() -> Any:
    return _complete("/v1/chat/completions")


def _complete(endpoint: str) -> Any:
    req, model, call = _start(endpoint)
    svc = services()
    if not req.stream:
        row = svc.sync.wait(call)
        if row.status != "succeeded":
            raise failed_call(row)
        return serving.BODY[endpoint](row, model.name, row.created_at, _fingerprint(model))
    return svc.sync.respond(call, _sse(svc.sync, endpoint, req, model, call, _fingerprint(model)))


def _fingerprint(model: Any) -> str:
    return serving.fingerprint_of(services().registry(), model.name) or ""


def _sse(sync: Any, endpoint: str, req: Any, model: Any, call: Any, fingerprint: str) -> Iterator[str]:
    """Chunks as text arrives; runs after the view returned, so it is handed what it needs."""
    chat = endpoint == "/v1/chat/completions"
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{call.request_id}"
    created = None
    base = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "model": model.name,
            "system_fingerprint": fingerprint}

    def chunk(text: str | None, finish: str | None = None, role: bool = False,
              logprobs: dict[str, Any] | None = None, index: int = 0) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return sse.event({**base, "created": created, "choices": [choice]})

    def token_chunks(row: Any, choice: dict[str, Any]) -> Iterator[str]:
        """A stream with log probabilities, an echo, or several choices: one chunk per token of
        each choice, with its log probabilities when asked for (the worker sends no text ahead for
        these: see ``worker.runner._Sequence``)."""
        index = choice["index"]
        if chat:
            text, tokens = choice["text"] or "", (choice.get("logprobs") or {}).get("content") or []
        else:
            text, tokens = serving.completion_tokens_of(row, choice)
        top = bool((row.params or {}).get("top_logprobs"))
        wanted = bool((row.params or {}).get("logprobs"))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sent = 0
        for token in tokens:
            end = min(len(text), sent + len(decoder.decode(bytes(token["bytes"]))))
            piece, sent = text[sent:end], end
            one = serving.chat_logprobs([token]) if chat else serving.completion_logprobs([token], top, sent - len(piece))
            yield chunk(piece, logprobs=one if wanted else None, index=index)
        if sent < len(text):
            yield chunk(text[sent:], index=index)
        yield chunk(None, finish=choice["finish_reason"], index=index)

    import time

    created = int(time.time())
    sent = ""
    try:
        for index in range(max(1, req.n or 1)) if chat else ():
            yield chunk(None, role=True, index=index)
        for kind, value in sync.events(call):
            if kind == "delta":
                sent += value
                yield chunk(value)
                continue
            row = value
            if row.status != "succeeded":
                err = failed_call(row)
                yield sse.event(error_body("openai", err.status, err.code, err.message)[1])
                break
            params = row.params or {}
            if params.get("logprobs") or params.get("echo") or (row.detail or {}).get("choices"):
                for choice in serving.choices_of(row):
                    yield from token_chunks(row, choice)
                if req.include_usage():
                    yield sse.event({**base, "created": created, "choices": [],
                                     "usage": serving.usage(row.prompt_tokens, row.completion_tokens)})
                break
            final = row.text or ""
            if not final.startswith(sent):  # a retried run's deltas were lost: what was sent is void
                raise stream_restarted()
            rest = final[len(sent):]
            if rest:
                yield chunk(rest)
            yield chunk(None, finish=row.finish_reason)
            if req.include_usage():
                yield sse.event({**base, "created": created, "choices": [],
                                 "usage": serving.usage(row.prompt_tokens, row.completion_tokens)})
            break
    except ApiError as exc:  # timeout, restart: the headers are gone, so the error is an event
        yield sse.event(error_body("openai", exc.status, exc.code, exc.message)[1])
    yield sse.event("[DONE]")
