"""Pydantic schemas at the API boundary: what a client may send (``*Create``) and gets (``*Read``).

Input schemas are strict: a number sent as a string, or a boolean where a number belongs, is an
error, not something to coerce. Unknown fields are errors too, so a misspelt parameter is reported
instead of silently ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 512
MAX_CUSTOM_ID_CHARS = 128

_STRICT = ConfigDict(strict=True, extra="forbid")


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("text must not contain NUL (\\u0000) characters")
    return value


# Any text a client sends. NUL is refused: PostgreSQL cannot store it, and no prompt needs it.
Text = Annotated[str, AfterValidator(_no_nul)]


class GenerationParams(BaseModel):
    """Sampling and length settings; every field is optional and falls back to model defaults."""

    model_config = _STRICT

    max_new_tokens: int | None = Field(None, ge=1, le=32768, description="Most tokens to generate.")
    min_new_tokens: int | None = Field(
        None, ge=0, le=32768, description="Fewest tokens to generate before the end token may stop."
    )
    temperature: float | None = Field(None, ge=0, le=2, description="0 means greedy decoding.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000, description="0 means no top-k limit.")
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: list[Text] | None = Field(
        None, max_length=MAX_STOP_SEQUENCES, description="Strings that end generation; not returned."
    )

    @model_validator(mode="after")
    def _check_stop(self) -> GenerationParams:
        for i, s in enumerate(self.stop or []):
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop[{i}] must have 1 to {MAX_STOP_CHARS} characters")
        return self


class ResolvedParams(BaseModel):
    """Parameters with every default applied: what a request actually runs with."""

    model_config = ConfigDict(frozen=True)

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    @classmethod
    def resolve(cls, *layers: GenerationParams | dict[str, Any] | None) -> ResolvedParams:
        """Apply layers in order (model defaults, job params, request params); later wins."""
        merged: dict[str, Any] = {}
        for layer in layers:
            if layer is None:
                continue
            data = layer.model_dump(exclude_none=True) if isinstance(layer, BaseModel) else layer
            merged.update({k: v for k, v in data.items() if v is not None})
        if "stop" in merged:
            merged["stop"] = tuple(merged["stop"])
        return cls(**merged)

    def sampling_key(self) -> tuple[Any, ...]:
        """What must be equal for two requests to share one CTranslate2 call."""
        return (self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.min_new_tokens)


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant"]
    content: Text


class RequestCreate(BaseModel):
    """One generation request inside a job: a ``prompt`` or chat ``messages``."""

    model_config = _STRICT

    custom_id: Text | None = Field(None, min_length=1, max_length=MAX_CUSTOM_ID_CHARS)
    prompt: Text | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    params: GenerationParams | None = None

    @model_validator(mode="after")
    def _one_input(self) -> RequestCreate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None:
            check_chat_shape(self.messages)
        return self


def check_chat_shape(messages: list[ChatMessage]) -> None:
    """Raise ``ValueError`` unless messages are [system] user (assistant user)*."""
    turns = messages[1:] if messages[0].role == "system" else messages
    if not turns:
        raise ValueError("messages need at least one user message")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise ValueError(
                "messages must be an optional system message, then user and assistant turns "
                f"alternating and ending with a user turn (found {m.role!r} where {want!r} belongs)"
            )
    if turns[-1].role != "user":
        raise ValueError("the last message must come from the user")


class JobCreate(BaseModel):
    """``POST /v1/jobs``: a model and either ``prompts`` or ``requests``."""

    model_config = _STRICT

    model: Text = Field(min_length=1, max_length=200)
    prompts: list[Annotated[Text, Field(min_length=1)]] | None = Field(None, min_length=1)
    requests: list[RequestCreate] | None = Field(None, min_length=1)
    params: GenerationParams | None = None
    system: Text | None = Field(None, min_length=1, description="Default system prompt for chat models.")

    @model_validator(mode="after")
    def _one_input(self) -> JobCreate:
        if (self.prompts is None) == (self.requests is None):
            raise ValueError("give exactly one of 'prompts' or 'requests'")
        return self

    def items(self) -> list[RequestCreate]:
        """The job's requests, whichever form they were sent in."""
        if self.requests is not None:
            return self.requests
        return [RequestCreate.model_construct(prompt=p, custom_id=None, messages=None, params=None)
                for p in self.prompts or []]


class JobCounts(BaseModel):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


JobStatus = Literal["queued", "running", "completed", "failed"]
RequestStatus = Literal["queued", "running", "succeeded", "failed"]


class JobRead(BaseModel):
    id: str
    object: Literal["job"] = "job"
    model: str
    status: JobStatus
    counts: JobCounts
    usage: Usage
    params: dict[str, Any]
    system: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class ErrorInfo(BaseModel):
    code: str
    message: str


class ResultRead(BaseModel):
    id: str
    object: Literal["job.result"] = "job.result"
    index: int
    custom_id: str | None
    status: RequestStatus
    prompt: str | None
    messages: list[dict[str, str]] | None
    text: str | None
    finish_reason: Literal["stop", "length"] | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error: ErrorInfo | None
    created_at: datetime
    completed_at: datetime | None


class ResultPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[ResultRead]
    first_id: str | None
    last_id: str | None
    has_more: bool


def error_details(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as ``[{"loc": "requests[3].prompt", "message", "type"}]``."""
    out = []
    for err in exc.errors(include_url=False):
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        message = err["msg"].removeprefix("Value error, ")
        out.append({"loc": loc or "body", "message": message, "type": err["type"]})
    return out
