"""OpenAI request bodies (completions, chat completions) and their mapping onto batchgen requests.

Fields batchgen can honour are taken; fields it cannot are refused by name when set to anything but
their neutral value, never silently ignored (penalties, logit_bias, tools, ...): each
one refused is its own problem, with the field as its ``loc`` (OpenAI's ``param``), so a request
learns every unsupported field at once. ``seed`` is accepted as OpenAI documents it, best effort
(here: not used; see ``core.schemas.SEED_DOC``), and answers carry a ``system_fingerprint``.
Unknown fields are refused, as OpenAI does. Extensions as in vLLM: ``top_k``,
``repetition_penalty``, ``min_tokens``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from core.schemas import (
    MAX_SAMPLES,
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
    SEED_DOC,
    ChatMessage,
    GenerationParams,
    RequestCreate,
    Text,
    WebhookCreate,
    check_chat_shape,
)

NOT_SUPPORTED = "is not supported by batchgen"
# The values of fields batchgen cannot honour that mean "not used": anything else is refused.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


def _neutral_only(value: Any, info: ValidationInfo) -> Any:
    if value not in NEUTRAL[str(info.field_name)]:
        raise ValueError(f"{info.field_name} {NOT_SUPPORTED}")
    return value
MAX_TOKENS = GenerationParams.model_fields["max_new_tokens"].metadata[-1].le  # the native bound


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1, max_length=200)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="Independent samples, in one call.")
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: Text | list[Text] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, description=SEED_DOC)
    user: Text | None = None
    # Extensions (as vLLM names them).
    top_k: int | None = Field(None, ge=0, le=1000)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(value, info)

    @model_validator(mode="after")
    def _check_stop(self) -> _Common:
        if isinstance(self.stop, list) and (len(self.stop) > MAX_STOP_SEQUENCES or any(not s for s in self.stop)):
            raise ValueError(f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings")
        return self

    def stops(self) -> list[str] | None:
        if self.stop is None or self.stop == "":
            return None
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: Text | list[Text] | list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | list[
        list[Annotated[int, Field(ge=0, le=2**31 - 1)]]]
    # OpenAI's default for completions; 0 only with echo (the prompt's log probabilities).
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Log probabilities of the "
                                 "tokens, and this many most likely tokens at each position.")
    best_of: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="Generate this many samples and return "
                                "the n with the highest log probability per token.")
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _refuse_unsupported_here(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(value, info)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_count(cls, value: Any) -> Any:
        if value is False:  # some clients send false for "off"
            return None
        if value is True:  # would pass as 1 otherwise
            raise ValueError("logprobs on completions is a number of alternatives, 0 to 20")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], int):
            return value  # one prompt of token ids
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("prompt must be one string or one list of token ids (several prompts are a batch: "
                             "use /v1/batches or /v1/jobs)")
        if isinstance(value, list) and isinstance(value[0], list) and not value[0]:
            raise ValueError("a prompt of token ids holds at least one id")
        return value

    @model_validator(mode="after")
    def _zero_tokens_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only meaningful with echo (the prompt's log probabilities)")
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise ValueError("best_of must be at least n")
        return self

    def prompt_ids(self) -> list[int] | None:
        """The prompt's token ids, when it was sent as ids."""
        value = self.prompt
        if isinstance(value, list) and value and isinstance(value[0], list):
            value = value[0]
        return value if isinstance(value, list) and value and isinstance(value[0], int) else None  # type: ignore[return-value]

    def to_request(self, custom_id: str | None = None) -> RequestCreate:
        params = _params(self, self.max_tokens)
        if self.logprobs is not None or self.echo:
            params = params.model_copy(update={"logprobs": self.logprobs is not None,
                                               "top_logprobs": self.logprobs or None, "echo": bool(self.echo)})
        ids = self.prompt_ids()
        if ids is not None:
            return RequestCreate(custom_id=custom_id, prompt_ids=ids, params=params)
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        return RequestCreate(custom_id=custom_id, prompt=prompt, params=params)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    logprobs: bool | None = Field(None, description="Log probabilities of the generated tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: this many "
                                     "most likely tokens at each position.")

    @field_validator("tools", "tool_choice", "response_format")
    @classmethod
    def _refuse_unsupported_here(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(value, info)

    @model_validator(mode="after")
    def _shape(self) -> ChatCompletionRequest:
        check_chat_shape(self.native_messages())  # type: ignore[arg-type]
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def native_messages(self) -> list[Any]:
        return [ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
                for m in self.messages]

    def to_request(self, custom_id: str | None = None) -> RequestCreate:
        params = _params(self, self.max_completion_tokens or self.max_tokens)
        if self.logprobs:
            params = params.model_copy(update={"logprobs": True, "top_logprobs": self.top_logprobs or None})
        return RequestCreate(custom_id=custom_id, messages=self.native_messages(), params=params)


def _params(req: _Common, max_tokens: int | None) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_tokens, min_new_tokens=req.min_tokens, temperature=req.temperature,
                            top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty,
                            stop=req.stops(), n=req.n, best_of=getattr(req, "best_of", None))


ENDPOINTS: dict[str, type[CompletionRequest] | type[ChatCompletionRequest]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}


class BatchCreateRequest(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: Text = Field(min_length=1, max_length=64)
    endpoint: Literal["/v1/completions", "/v1/chat/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[Text, Text] | None = None
    output_expires_after: dict[str, Any] | None = None
    webhook: WebhookCreate | None = Field(None, description="batchgen extension: a URL told when the batch ends "
                                          "(batch.completed, batch.failed, batch.cancelled, batch.expired; OpenAI's "
                                          "event shape, signed as OpenAI signs its webhooks).")

    @model_validator(mode="after")
    def _no_file_expiry(self) -> BatchCreateRequest:
        if self.output_expires_after is not None:
            raise ValueError("output_expires_after is not supported: output files stay until deleted")
        return self


# --- what batchgen answers (the serving code builds its answers through these) ------------------


class FileObjectRead(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class ServingWorker(BaseModel):
    """One worker serving a model, with the batch limits it has in force now."""

    worker: str = Field(description="The worker process: worker:<host>:<pid>.")
    device: str = Field(description="cpu0, cuda0, cuda1, ...")
    compute_type: str
    inter_threads: int
    intra_threads: int
    max_batch_tokens: int | None = Field(description="Prompt + new tokens per batch, as the worker's "
                                                     "calibration chose and its own measurements moved it.")
    max_batch_size: int | None = Field(description="Requests per batch.")
    slots: int | None = Field(description="Batches the device runs at once.")
    source: str = Field(description="Where the limits came from: measured (calibrated at start), cached "
                                    "(an earlier calibration on this device) or defaults (calibration off).")
    calibration_ratio: float | None = Field(description="Tokens/s seen over what the calibration expects.")


class ModelRead(BaseModel):
    """A model this deployment serves (OpenAI's Model, with what a client needs to choose one)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the model's files were written where the API can see "
                                     "them; 0 when they are only on the workers' machines.")
    owned_by: str = "batchgen"
    chat: bool = Field(description="Chat messages (and a system prompt) are rendered in the model's chat format.")
    family: str = Field(description="The checkpoint's model_type (llama, mistral, qwen2, qwen3, gemma2, phi3, ...).")
    chat_format: Literal["checkpoint", "llama-2", "none"] = Field(
        description="How chats are rendered: the checkpoint's own template, Llama-2's reference format, or "
                    "not at all (a base model).")
    system_prompt: bool = Field(description="The chat format takes a system prompt (a system message or a "
                                            "job's system); if not, one is refused with 422.")
    stop_token_ids: list[int] = Field(description="Token ids that end a generation (the checkpoint's "
                                                  "end-of-turn ids); empty: the tokenizer's end-of-sequence.")
    context_length: int
    aliases: list[str]
    description: str
    defaults: dict[str, Any] = Field(description="Parameters used when a request does not set them.")
    workers: int | None = Field(description="Workers serving it now (from their heartbeats); null when "
                                            "the queue cannot be asked.")
    serving: list[ServingWorker] | None = Field(default=None, description="Those workers and the batch limits "
                                                                          "each has in force.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelRead]


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObjectRead]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchErrorRead(BaseModel):
    code: str
    line: int | None
    message: str
    param: str | None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorRead]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens_details: dict[str, int]


class BatchWebhookRead(BaseModel):
    """batchgen extension: the batch's webhook and how its delivery goes (times in Unix seconds)."""

    url: str
    secret: str | None = None
    status: Literal["waiting", "pending", "delivered", "failed"]
    event_id: str | None
    type: str | None
    attempts: int
    last_attempt_at: int | None
    last_response_status: int | None
    last_error: str | None
    next_attempt_at: int | None
    delivered_at: int | None


class BatchRead(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    usage: BatchUsage | None
    metadata: dict[str, str] | None
    webhook: BatchWebhookRead | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchRead]
    first_id: str | None
    last_id: str | None
    has_more: bool


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionRead(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: CompletionUsage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionRead(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: CompletionUsage


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """Every error on the OpenAI-compatible routes."""

    error: OpenAIErrorBody
