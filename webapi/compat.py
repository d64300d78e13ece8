"""DashScope's text-generation call and the PAI-EAS request shape, on the synchronous path.

- ``POST /api/v1/services/aigc/text-generation/generation`` as the ``dashscope`` SDK sends it:
  ``{"model", "input": {"prompt"} | {"messages"}, "parameters": {...}}`` -> ``{"output", "usage",
  "request_id"}``; errors ``{"code", "message", "request_id"}``; SSE when asked
  (``X-DashScope-SSE: enable`` or ``Accept: text/event-stream``).
- ``POST /`` as PAI-EAS LLM services take it: a ``text/plain`` prompt answered with the generated
  text, or JSON ``{"input_ids": "<prompt text>", "temperature", "max_length", "top_p", "top_k",
  "history": [[user, assistant], ...], "system_prompt"}`` answered ``{"response", "history"}``.
  ``max_length`` is the number of new tokens. The model is ``BATCHGEN_EAS_MODEL`` (default
  ``BATCHGEN_MODEL``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from flask import Blueprint, Response, g, request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.registry import ModelSpec
from core.schemas import (
    SEED_DOC,
    ChatMessage,
    GenerationParams,
    JobCreate,
    RequestCreate,
    Text,
    check_chat_shape,
)
from webapi import sse
from webapi.auth import current_principal
from webapi.errors import ApiError, error_body, failed_call
from webapi.parsing import json_body, read_body, validated
from webapi.services import services
from webapi.sync import stream_restarted

dashscope = Blueprint("dashscope", __name__)
MAX_TOKENS = GenerationParams.model_fields["max_new_tokens"].metadata[-1].le
eas = Blueprint("eas", __name__)


class DashScopeMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


class DashScopeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = Field(None, min_length=1)
    messages: list[DashScopeMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> DashScopeInput:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of input.prompt or input.messages")
        return self


class DashScopeParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    result_format: Literal["text", "message"] = "text"
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: Text | list[Text] | None = None
    incremental_output: bool = False
    seed: int | None = Field(None, description=SEED_DOC)
    enable_search: bool = False

    @model_validator(mode="after")
    def _supported(self) -> DashScopeParameters:
        if self.enable_search:
            raise ValueError("enable_search is not supported")
        return self


class DashScopeRequest(BaseModel):
    """DashScope's text-generation request."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1, max_length=200)
    input: DashScopeInput
    parameters: DashScopeParameters = DashScopeParameters()


class EasRequest(BaseModel):
    """PAI-EAS LLM service request (JSON form)."""

    model_config = ConfigDict(extra="forbid")

    input_ids: Text = Field(min_length=1, description="The prompt text.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    max_length: int | None = Field(None, ge=1, le=MAX_TOKENS, description="New tokens to generate at most.")
    history: list[tuple[Text, Text]] = Field(default_factory=list, description="Earlier [user, assistant] turns.")
    system_prompt: Text | None = None


def _run(model: ModelSpec, request_item: RequestCreate, stream: bool = False) -> Any:
    spec = JobCreate(model=model.name, requests=[request_item])
    return services().sync.start(principal=current_principal(), spec=spec, model=model, stream=stream)


@dashscope.post("/api/v1/services/aigc/text-generation/generation")
def dashscope_generation() -> Any:
    """DashScope's text generation, answered when the request has run."""
    req = validated(DashScopeRequest, json_body(), loc_in_message=True)
    p = req.parameters
    stops = [p.stop] if isinstance(p.stop, str) else p.stop
    params = GenerationParams(max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                              repetition_penalty=p.repetition_penalty, stop=stops or None)
    svc = services()
    model = svc.submissions.resolve(req.model)
    if req.input.messages is not None:
        messages = [ChatMessage(role=m.role, content=m.content) for m in req.input.messages]
        try:
            check_chat_shape(messages)
        except ValueError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
        item = RequestCreate(messages=messages, params=params)
    elif model.chat:  # as DashScope does for its chat models, a prompt is the user's turn
        item = RequestCreate(messages=[ChatMessage(role="user", content=req.input.prompt or "")], params=params)
    else:
        item = RequestCreate(prompt=req.input.prompt, params=params)
    stream = (request.headers.get("X-DashScope-SSE", "").lower() == "enable"
              or "text/event-stream" in request.headers.get("Accept", ""))
    call = _run(model, item, stream=stream)
    request_id = g.request_id
    if stream:
        return svc.sync.respond(call, _dashscope_sse(svc.sync, call, p, request_id))
    row = svc.sync.wait(call)
    if row.status != "succeeded":
        raise failed_call(row)
    return _generation_body(row.text or "", row.finish_reason, row.prompt_tokens, row.completion_tokens, p.result_format,
                           request_id)


def _generation_body(text: str, finish: str | None, prompt_tokens: int | None, completion_tokens: int | None,
                    result_format: str, request_id: str) -> dict[str, Any]:
    finish = finish or "null"
    if result_format == "message":
        output: dict[str, Any] = {"choices": [{"finish_reason": finish,
                                               "message": {"role": "assistant", "content": text}}]}
    else:
        output = {"text": text, "finish_reason": finish}
    i, o = prompt_tokens or 0, completion_tokens or 0
    return {"output": output, "usage": {"input_tokens": i, "output_tokens": o, "total_tokens": i + o},
            "request_id": request_id}


def _dashscope_sse(sync: Any, call: Any, p: DashScopeParameters, request_id: str) -> Iterator[str]:
    """DashScope's SSE: each event carries the text so far (or only the new text with
    ``incremental_output``); the last one has the finish reason and the usage."""
    text = ""
    n = 0

    def event(body: dict[str, Any], status: int = 200) -> str:  # as DashScope sends them
        nonlocal n
        n += 1
        return sse.event(body, id=n, name="result" if status == 200 else "error", comment=f"HTTP_STATUS/{status}",
                         compact=True)

    try:
        for kind, value in sync.events(call):
            if kind == "delta":
                text += value
                yield event(_generation_body(value if p.incremental_output else text, None, None, None,
                                            p.result_format, request_id))
                continue
            row = value
            if row.status != "succeeded":
                err = failed_call(row)
                status, body = error_body("dashscope", err.status, err.code, err.message, None, request_id)
                yield event(body, status)
                return
            final = row.text or ""
            if not final.startswith(text):  # a retried run's deltas were lost: what was sent is void
                raise stream_restarted()
            rest = final[len(text):]
            yield event(_generation_body(rest if p.incremental_output else final, row.finish_reason, row.prompt_tokens,
                                        row.completion_tokens, p.result_format, request_id))
            return
    except ApiError as exc:  # timeout, restart: the headers are gone, so the error is an event
        status, body = error_body("dashscope", exc.status, exc.code, exc.message, None, request_id)
        yield event(body, status)


@eas.post("/")
def eas_generate() -> Any:
    """PAI-EAS: a text/plain prompt answered with text, or the JSON form answered with JSON."""
    svc = services()
    model_name = svc.settings.eas_model or svc.settings.model
    if request.mimetype == "application/json":
        req = validated(EasRequest, json_body(), loc_in_message=True)
        params = GenerationParams(max_new_tokens=req.max_length, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k)
        model = svc.submissions.resolve(model_name)
        if model.chat:
            turns = [ChatMessage(role="system", content=req.system_prompt)] if req.system_prompt else []
            for user, answer in req.history:
                turns += [ChatMessage(role="user", content=user), ChatMessage(role="assistant", content=answer)]
            turns.append(ChatMessage(role="user", content=req.input_ids))
            item = RequestCreate(messages=turns, params=params)
        elif req.history or req.system_prompt:
            raise ApiError(400, "invalid_request", f"{model_name} is a base model: history and system_prompt need "
                           "a chat model")
        else:
            item = RequestCreate(prompt=req.input_ids, params=params)
        call = _run(model, item)
        row = svc.sync.wait(call)
        if row.status != "succeeded":
            raise failed_call(row)
        return {"response": row.text or "", "history": [*map(list, req.history), [req.input_ids, row.text or ""]]}
    try:
        prompt = read_body().decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_request", "the prompt is not UTF-8 text") from None
    if not prompt or "\x00" in prompt:
        raise ApiError(400, "invalid_request", "send the prompt as the text/plain body (no NUL characters)")
    call = _run(svc.submissions.resolve(model_name), RequestCreate(prompt=prompt))
    row = svc.sync.wait(call)
    if row.status != "succeeded":
        raise failed_call(row)
    return Response(row.text or "", mimetype="text/plain")
