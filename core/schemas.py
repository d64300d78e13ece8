"""Pydantic schemas at the API boundary: what a client may send (``*Create``) and gets (``*Read``).

Input schemas are strict: a number sent as a string, or a boolean where a number belongs, is an
error, not something to coerce. Unknown fields are errors too, so a misspelt parameter is reported
instead of silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# OpenAI takes 4; evaluation harnesses send more (lm-eval: a task's stop strings and the EOS text).
MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
MAX_SAMPLES = 16
MAX_CONTINUATIONS = 64
MAX_STOP_CHARS = 256
MAX_MESSAGES = 512
MAX_CUSTOM_ID_CHARS = 128
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
COMPLETION_WINDOW_S = (60, 7 * 86400)
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

_STRICT = ConfigDict(strict=True, extra="forbid")


def check_text(value: str) -> str:
    """Text a database can store, or ``ValueError``: no NUL (PostgreSQL cannot hold it) and no
    lone UTF-16 surrogates (a JSON escape like \\ud800 makes one; no encoding can hold it)."""
    if "\x00" in value:
        raise ValueError("text must not contain NUL (\\u0000) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


# Any text a client sends. Other control characters are kept as they are.
Text = Annotated[str, AfterValidator(check_text)]


# Accepted for the clients that always send one (OpenAI documents seed as best effort); it does not
# change the output: CTranslate2 4.x cannot seed one call (set_random_seed does not reach a loaded
# Generator), and int8 results depend on which requests share a batch.
SEED_DOC = ("Accepted, best effort, and not used: sampling is not seeded per request (CTranslate2 cannot seed "
            "one call, and int8 results depend on which requests share a batch). For the most repeatable "
            "output use temperature 0.")


class GenerationParams(BaseModel):
    """Sampling and length settings; every field is optional and falls back to model defaults."""

    model_config = _STRICT

    max_new_tokens: int | None = Field(None, ge=0, le=32768, description="Most tokens to generate; 0 only "
                                       "with echo (the prompt's log probabilities, nothing generated).")
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
    seed: int | None = Field(None, description=SEED_DOC)
    logprobs: bool | None = Field(None, description="Return each generated token with its log probability "
                                  "under the model (before temperature, top-k/top-p and repetition penalty).")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Also the most likely "
                                     "tokens at each position, up to 20, with their log probabilities; "
                                     "above 0 it implies logprobs.")
    echo: bool | None = Field(None, description="Also return the prompt's tokens with their log "
                              "probabilities; with max_new_tokens 0 nothing is generated.")
    n: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="Independent samples of the request, "
                          "generated in one call; the result's choices hold them, usage counts them all.")
    best_of: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="Generate this many samples (at "
                                "least n) and keep the n with the highest log probability per token under "
                                "the model.")

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
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    n: int = 1
    best_of: int = 1
    # What the request does: generate text, or score given texts (a scoring job).
    mode: Literal["generate", "score"] = "generate"
    # How the result reaches the client: stored only (jobs), or also announced over Redis when
    # done (synchronous calls), or streamed token by token as well (stream: true).
    delivery: Literal["store", "notify", "stream"] = "store"

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
        if merged.get("top_logprobs"):
            merged["logprobs"] = True
        return cls(**merged)

    @property
    def samples(self) -> int:
        """Sequences generated for the request: ``best_of`` of them when it exceeds ``n``."""
        return max(self.n, self.best_of)

    @property
    def scores_only(self) -> bool:
        """Nothing to generate: a scoring job's request, or an echo of the prompt with 0 new tokens."""
        return self.mode == "score" or self.max_new_tokens == 0

    def sampling_key(self) -> tuple[Any, ...]:
        """What must be equal for two requests to share one CTranslate2 call (requests that only
        score share a forward pass whatever their sampling settings)."""
        if self.scores_only:
            return ("score",)
        return (self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.min_new_tokens)


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant"]
    content: Text


class RequestCreate(BaseModel):
    """One generation request inside a job: a ``prompt`` or chat ``messages``."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}, {"required": ["prompt_ids"]}]})

    custom_id: Text | None = Field(None, min_length=1, max_length=MAX_CUSTOM_ID_CHARS)
    prompt: Text | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    prompt_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(
        None, min_length=1, max_length=32768, description="A prompt as the model's token ids, sent as they are "
        "(BOS is put in front unless they start with it; no chat template).")
    params: GenerationParams | None = None
    continuations: list[Annotated[Text, Field(min_length=1)]] | None = Field(
        None, min_length=1, max_length=MAX_CONTINUATIONS, description="Scoring jobs only: texts to score as "
        "continuations of the prompt (or of the chat's next assistant turn), each on its own; without "
        "them the prompt itself is scored.")

    @model_validator(mode="after")
    def _one_input(self) -> RequestCreate:
        if sum(x is not None for x in (self.prompt, self.messages, self.prompt_ids)) != 1:
            raise ValueError("give exactly one of 'prompt', 'messages' or 'prompt_ids'")
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


@dataclass(frozen=True, slots=True)
class PlainPrompt:
    """One entry of ``prompts``: a request with a prompt and nothing else (cheap for big jobs)."""

    prompt: str
    custom_id: None = None
    messages: None = None
    params: None = None
    continuations: None = None
    prompt_ids: None = None


class WebhookCreate(BaseModel):
    """Where to be told, once, that a job has ended."""

    model_config = _STRICT

    url: Text = Field(min_length=1, max_length=2048, description="https:// (or http://) URL that receives a "
                      "signed POST when the job ends (job.completed, job.failed, job.cancelled, job.expired). "
                      "The service's allow-list decides which hosts may be named.")
    secret: Text | None = Field(None, description="Your own signing key (whsec_ + base64 of 24-64 bytes), to "
                                "verify every job's events with one key; without one a key is made and shown "
                                "in this response only.")

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        from core.webhooks import check_secret

        return None if value is None else check_secret(value)


class WebhookRead(BaseModel):
    url: str
    secret: str | None = Field(None, description="The signing key: in the response that created the job only.")
    status: Literal["waiting", "pending", "delivered", "failed"] = Field(
        description="waiting: the job has not ended. pending: its event is being sent or retried. delivered: "
        "a 2xx came back. failed: every retry failed.")
    event_id: str | None = Field(description="The event's id (the webhook-id header), once the job has ended.")
    type: str | None = Field(description="job.completed, job.failed, job.cancelled or job.expired.")
    attempts: int
    last_attempt_at: datetime | None
    last_response_status: int | None = Field(description="The receiver's HTTP status at the last attempt.")
    last_error: str | None = Field(description="Why the last attempt did not deliver.")
    next_attempt_at: datetime | None
    delivered_at: datetime | None


class JobCreate(BaseModel):
    """``POST /v1/jobs``: a model and either ``prompts`` or ``requests``."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["prompts"]}, {"required": ["requests"]}]})

    model: Text = Field(min_length=1, max_length=200)
    kind: Literal["generate", "score"] = Field("generate", description="generate: text for each request. "
                                               "score: the log probability and perplexity of given texts, "
                                               "nothing generated.")
    prompts: list[Annotated[Text, Field(min_length=1)]] | None = Field(None, min_length=1)
    requests: list[RequestCreate] | None = Field(None, min_length=1)
    params: GenerationParams | None = None
    system: Text | None = Field(None, min_length=1, description="Default system prompt for chat models.")
    priority: int = Field(5, ge=0, le=8, description="0-8; higher runs first among waiting requests (9 is "
                          "the lane of synchronous calls, which someone waits on).")
    metadata: dict[Text, Text] | None = Field(None, description="Up to 16 string pairs, kept with the job.")
    completion_window: str = Field("24h", description="Time to run it, e.g. 30m, 24h, 7d; what has not "
                                   "run by then expires.")
    webhook: WebhookCreate | None = Field(None, description="A URL told (signed, Standard Webhooks) when "
                                          "the job ends.")

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        window_seconds(value)
        return value

    @model_validator(mode="after")
    def _one_input(self) -> JobCreate:
        if (self.prompts is None) == (self.requests is None):
            raise ValueError("give exactly one of 'prompts' or 'requests'")
        return self

    def items(self) -> list[RequestCreate] | list[PlainPrompt]:
        """The job's requests, whichever form they were sent in."""
        if self.requests is not None:
            return self.requests
        return [PlainPrompt(p) for p in self.prompts or []]

    def count(self) -> int:
        """How many requests the job holds."""
        return len(self.requests if self.requests is not None else self.prompts or [])


def check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    """Metadata within bounds, or ``ValueError``."""
    if value is None:
        return None
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs")
    for k, v in value.items():
        if not k or len(k) > MAX_METADATA_KEY_CHARS:
            raise ValueError(f"metadata keys have 1 to {MAX_METADATA_KEY_CHARS} characters")
        if len(v) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(f"metadata values have at most {MAX_METADATA_VALUE_CHARS} characters")
    return value


def window_seconds(value: str) -> int:
    """Seconds in a completion window such as ``24h``; ``ValueError`` when out of bounds."""
    match = _WINDOW.match(value)
    if not match:
        raise ValueError("completion_window is a number and a unit s, m, h or d, such as 24h")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    low, high = COMPLETION_WINDOW_S
    if not low <= seconds <= high:
        raise ValueError("completion_window must be from 1 minute to 7 days")
    return seconds


class JobCounts(BaseModel):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    expired: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


JobStatus = Literal["queued", "running", "cancelling", "completed", "failed", "cancelled", "expired"]
RequestStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
JOB_STATUSES: tuple[str, ...] = JobStatus.__args__  # type: ignore[attr-defined]
REQUEST_STATUSES: tuple[str, ...] = RequestStatus.__args__  # type: ignore[attr-defined]


class JobRead(BaseModel):
    id: str
    object: Literal["job"] = "job"
    model: str
    kind: Literal["generate", "score"]
    status: JobStatus
    counts: JobCounts
    usage: Usage
    params: dict[str, Any]
    system: str | None
    priority: int
    metadata: dict[str, str] | None
    owner: str
    completion_window: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None = Field(description="When what has not run expires (null for jobs "
                                        "made before expiry existed).")
    cancel_requested_at: datetime | None
    estimated_completion_at: datetime | None = Field(
        None, description="While running: when it should end at the rate so far.")
    webhook: WebhookRead | None = Field(None, description="The job's webhook and how its delivery goes.")


class JobPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobRead]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ErrorInfo(BaseModel):
    code: str
    message: str


class TopLogprob(BaseModel):
    token: str = Field(description="The token's text; a token that is part of a UTF-8 character shows U+FFFD.")
    bytes: list[int] = Field(description="The token's exact bytes.")
    logprob: float


class TokenLogprob(BaseModel):
    token: str
    bytes: list[int]
    logprob: float | None = Field(description="Log probability of this token after the ones before it; null "
                                              "for the first token of a sequence (nothing precedes it).")
    top_logprobs: list[TopLogprob] | None = Field(None, description="With top_logprobs: the most likely tokens "
                                                                    "at this position, most likely first.")


class Logprobs(BaseModel):
    prompt: list[TokenLogprob] | None = Field(None, description="With echo: the prompt's tokens.")
    content: list[TokenLogprob] = Field(description="The generated tokens (of one choice: as many as its "
                                                    "completion_tokens).")


class Score(BaseModel):
    continuation: str | None = Field(description="The continuation scored; null when the prompt itself was.")
    tokens: list[TokenLogprob] = Field(description="The scored tokens and their log probabilities.")
    logprob: float = Field(description="Sum of the tokens' log probabilities.")
    perplexity: float = Field(description="exp(-logprob / number of tokens).")
    is_greedy: bool = Field(description="Every scored token is the model's most likely one at its position.")


class Choice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    completion_tokens: int
    logprobs: Logprobs | None = None


class ResultRead(BaseModel):
    id: str
    object: Literal["job.result"] = "job.result"
    index: int
    custom_id: str | None
    status: RequestStatus
    prompt: str | None
    messages: list[dict[str, str]] | None
    prompt_ids: list[int] | None = None
    text: str | None
    finish_reason: Literal["stop", "length"] | None
    prompt_tokens: int | None
    completion_tokens: int | None
    logprobs: Logprobs | None = Field(None, description="With params.logprobs, top_logprobs or echo (of the "
                                                          "first choice, with n or best_of).")
    choices: list[Choice] | None = Field(None, description="With n or best_of: every sample kept, best first "
                                                           "with best_of; text and finish_reason above are the "
                                                           "first's, completion_tokens counts all generated.")
    continuations: list[str] | None = Field(None, description="Scoring jobs: the continuations sent.")
    scores: list[Score] | None = Field(None, description="Scoring jobs: one per continuation (or one for the "
                                                         "prompt), in order.")
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
        if err["type"] == "extra_forbidden":
            message = f"unrecognized field {loc!r}"
        out.append({"loc": loc or "body", "message": message, "type": err["type"]})
    return out


class ErrorDetail(BaseModel):
    loc: str = Field(description="Where the problem is, e.g. requests[3].prompt or query.limit.")
    message: str
    type: str


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_request, not_found.")
    message: str
    details: Any = Field(None, description="A list of ErrorDetail for invalid input; other context else.")
    request_id: str | None = Field(description="Quote it when reporting a problem; also X-Request-Id.")


class ErrorEnvelope(BaseModel):
    """Every native API error."""

    error: ErrorBody


class Deleted(BaseModel):
    id: str
    object: Literal["job.deleted"] = "job.deleted"
    deleted: bool
