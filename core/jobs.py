"""The job service, as clients use it: submitting (validation, rows), reading, cancelling,
deleting and expiring jobs. The worker's side (claiming and recording runs) is ``core.runs``.

Views and tasks parse, call one function here, and serialize. Each function takes the caller's
unit of work (an ORM session, or a Core connection where a read must cost next to nothing) and
keyword-only arguments.

Request life: ``queued`` -> ``running`` (claimed by one generation run) -> ``succeeded`` or
``failed``; or ``queued`` -> ``cancelled`` (the job was cancelled) or ``expired`` (its completion
window passed). A job ends (``finalize``) in the transaction that leaves it with nothing queued
or running.

``owner`` arguments restrict what a caller can reach: a job of another owner is "not found".
``owner=None`` (an admin) reaches every job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, Row, bindparam, case, delete, func, or_, select, update
from sqlalchemy.orm import Session

from core.db import connection_of
from core.errors import ConflictError, InvalidRequestError, NotFoundError
from core.ids import new_id, new_ids
from core.prompts import Segment, render, with_continuation
from core.registry import ModelSpec
from core.schemas import JobCreate, ResolvedParams, window_seconds
from core.tables import ACTIVE_JOB_STATUSES, Job, JobRequest, UTCDateTime, WebhookEvent, utcnow
from core.templates import ChatTemplateError, Rendered
from core.tokens import TokenCounter, token_upper_bound
from core.webhooks import AllowList, check_url, enqueue_job_events, initial_state, new_secret

FINISHED_JOB_STATUSES = ("completed", "failed", "cancelled", "expired")


def request_fingerprint(body: Any) -> str:
    """A hash of a request body, to tell a retried request from a different one (idempotency)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Limits:
    """Bounds on what one job may ask for (from settings)."""

    max_requests: int
    max_prompt_chars: int
    webhooks: AllowList = AllowList()  # where webhooks may go (empty: nowhere)
    # One request's samples x max_new_tokens, at most (n or best_of 16 of 32,768 tokens each would
    # otherwise be one request to every cap).
    max_request_new_tokens: int = 32768
    # A request counts against the caps once per sample (or scored continuation) and per this many
    # prompt + new tokens: what it asks the device to do, not one whatever it asks.
    weight_tokens: int = 4096


def request_weight(*, item: Any, params: ResolvedParams, system: str | None, spec: ModelSpec,
                   limits: Limits) -> int:
    """What one request counts against the caps: rows x ceil((prompt + new tokens) / weight_tokens),
    rows being its samples (or its scored continuations). The prompt's tokens are estimated from
    its length (a quarter of its UTF-8 bytes, at most the context): the API does not tokenize
    every prompt, and the estimate only sizes a share of a cap."""
    if item.prompt_ids is not None:
        prompt = len(item.prompt_ids)
    else:
        text = (item.prompt or "") + "".join(m.content for m in item.messages or ()) + (system or "")
        prompt = len(text.encode("utf-8")) // 4 + 1
    continuations = getattr(item, "continuations", None)
    rows = len(continuations) if continuations else params.samples
    if continuations:
        prompt += max(len(c.encode("utf-8")) for c in continuations) // 4 + 1
    tokens = min(prompt, spec.context_length) + params.max_new_tokens
    return rows * max(1, -(-tokens // max(1, limits.weight_tokens)))


def not_valid(problems: list[dict[str, str]]) -> str:
    """The message of a job refused for ``problems``: the first one's own words in it, since
    OpenAI's and DashScope's error shapes carry a message and no details."""
    first = problems[0]
    more = f" (and {len(problems) - 1} more problems in details)" if len(problems) > 1 else ""
    return f"the job is not valid: {first['loc']}: {first['message']}{more}"


def _problem(loc: str, message: str, type_: str) -> dict[str, str]:
    return {"loc": loc, "message": message, "type": type_}


def _resolve(*, loc: str, spec: ModelSpec, job_params: Any, item_params: Any,
             problems: list[dict[str, str]], delivery: str = "store") -> ResolvedParams | None:
    """The parameters a request runs with; problems found in them are appended."""
    # The built-in default length must fit any model; registry defaults and the client override it.
    base = {"max_new_tokens": min(ResolvedParams().max_new_tokens, spec.context_length // 2),
            "delivery": delivery}
    try:
        params = ResolvedParams.resolve(base, spec.defaults, job_params, item_params)
    except ValueError as exc:  # defaults of a registry entry may be out of bounds
        problems.append(_problem(f"{loc}.params", str(exc), "invalid_params"))
        return None

    def param_loc(name: str) -> str:
        """Point at the layer the offending value came from: the request's, the job's, the model's."""
        if item_params is not None and getattr(item_params, name) is not None:
            return f"{loc}.params.{name}"
        if job_params is not None and getattr(job_params, name) is not None:
            return f"params.{name}"
        return "model"

    ok = True
    if params.max_new_tokens == 0 and not params.echo:
        ok = False
        problems.append(_problem(param_loc("max_new_tokens"), "max_new_tokens must be at least 1 (0 only with "
                                 "echo, to score the prompt)", "invalid_params"))
    if params.best_of > 1 and params.best_of < params.n:
        ok = False
        problems.append(_problem(param_loc("best_of"), "best_of must be at least n", "invalid_params"))
    if params.samples > 1 and params.max_new_tokens == 0:
        ok = False
        problems.append(_problem(param_loc("n" if params.n > 1 else "best_of"), "n and best_of sample "
                                 "generations: with max_new_tokens 0 there is nothing to sample", "invalid_params"))
    if params.max_new_tokens >= spec.context_length:
        ok = False
        problems.append(_problem(param_loc("max_new_tokens"),
                                 f"max_new_tokens must be below the model's context length "
                                 f"({spec.context_length})", "context_length_exceeded"))
    if params.min_new_tokens > params.max_new_tokens:
        ok = False
        problems.append(_problem(param_loc("min_new_tokens"),
                                 "min_new_tokens must not exceed max_new_tokens", "invalid_params"))
    return params if ok else None


# What a scoring request may set: nothing is sampled or generated (logprobs: scores are that anyway).
_SCORE_PARAMS = {"top_logprobs", "logprobs"}


def _resolve_score(*, loc: str, job_params: Any, item_params: Any, problems: list[dict[str, str]],
                   delivery: str = "store") -> ResolvedParams | None:
    """The parameters of a scoring request: only ``top_logprobs`` means anything there."""
    ok = True
    # The job's own params are reported once, by the call that resolves them alone.
    layers = ((f"{loc}.params", item_params),) if item_params is not None else (("params", job_params),)
    for where, layer in layers:
        for name in sorted(set(layer.model_dump(exclude_none=True)) - _SCORE_PARAMS if layer else ()):
            ok = False
            problems.append(_problem(f"{where}.{name}", f"a scoring job generates nothing: {name} does not "
                                     "apply (only top_logprobs does)", "invalid_params"))
    if not ok or (item_params is not None and _score_refusals(job_params)):
        return None
    return ResolvedParams.resolve({"max_new_tokens": 0, "mode": "score", "logprobs": True, "delivery": delivery},
                                  job_params, item_params)


def _score_refusals(params: Any) -> bool:
    return bool(params is not None and set(params.model_dump(exclude_none=True)) - _SCORE_PARAMS)


def _check_request(
    *, loc: str, item: Any, spec: ModelSpec, params: ResolvedParams | None, limits: Limits,
    problems: list[dict[str, str]], system: str | None, counter: TokenCounter | None,
) -> None:
    """Settings- and model-dependent checks of one request (``RequestCreate`` or ``PlainPrompt``)."""
    plain = loc.startswith("prompts[")  # the `prompts` form: the item is the string itself
    before = len(problems)
    if item.prompt is not None and len(item.prompt) > limits.max_prompt_chars:
        problems.append(_problem(loc if plain else f"{loc}.prompt",
                                 f"prompt is longer than {limits.max_prompt_chars} characters",
                                 "prompt_too_long"))
    if item.messages is not None:
        if not spec.chat:
            problems.append(_problem(f"{loc}.messages", f"model {spec.name!r} is a base model; "
                                     "send a 'prompt' instead of chat 'messages'", "not_a_chat_model"))
        chars = sum(len(m.content) for m in item.messages)
        if chars > limits.max_prompt_chars:
            problems.append(_problem(f"{loc}.messages", "messages are longer than "
                                     f"{limits.max_prompt_chars} characters in all", "prompt_too_long"))
    if item.prompt_ids is not None:
        if system is not None:
            problems.append(_problem(f"{loc}.prompt_ids", "a prompt of token ids goes to the model as it is: "
                                     "the job's system prompt cannot apply to it", "invalid_request"))
        # BOS goes in front unless the ids start with it (the worker knows which id it is, and checks exactly).
        if params is not None and len(item.prompt_ids) + params.max_new_tokens > spec.context_length:
            problems.append(_problem(f"{loc}.prompt_ids", f"the prompt has {len(item.prompt_ids)} tokens; "
                                     f"with max_new_tokens={params.max_new_tokens} it exceeds the context of "
                                     f"{spec.name} ({spec.context_length} tokens)", "context_length_exceeded"))
        return
    if not plain and item.continuations is not None:
        _check_continuations(loc=loc, item=item, spec=spec, limits=limits, system=system, counter=counter,
                             problems=problems)
    if params is not None and len(problems) == before:
        _check_context(loc=loc, item=item, spec=spec, params=params, system=system, counter=counter,
                       problems=problems, plain=plain)


# Tokens a continuation joined to its prompt may count more or fewer than the two apart (a token
# merging across the seam, a space the chat template puts before an answer).
SEAM_TOKENS = 4


def _check_continuations(*, loc: str, item: Any, spec: ModelSpec, limits: Limits, system: str | None,
                         counter: TokenCounter | None, problems: list[dict[str, str]]) -> None:
    """Continuations to score are held to the prompt's limits: each, and all of them together, to
    ``max_prompt_chars``; each, joined to the prompt, to the model's context (as the worker will
    read it). Unchecked, one request could store (and serve back, and make a worker tokenize) a
    text of any size."""
    cap = limits.max_prompt_chars
    long = [n for n, continuation in enumerate(item.continuations) if len(continuation) > cap]
    for n in long:
        problems.append(_problem(f"{loc}.continuations[{n}]", f"a continuation is longer than {cap} characters",
                                 "prompt_too_long"))
    if long:
        return
    if sum(len(c) for c in item.continuations) > cap:
        problems.append(_problem(f"{loc}.continuations", f"the continuations are longer than {cap} characters "
                                 "in all", "prompt_too_long"))
        return
    segments = _rendered(loc=loc, item=item, spec=spec, system=system, counter=counter, problems=problems)
    if segments is None:
        return
    control = counter.control(spec.chat_template) if counter is not None else ()  # compiled by _rendered
    chat = isinstance(segments[-1], Rendered)  # a typed control token in a continuation changes its pieces
    room = spec.context_length
    prompt_bound = token_upper_bound(segments)
    prompt_tokens: int | None = None
    for n, continuation in enumerate(item.continuations):
        if prompt_bound + len(continuation.encode("utf-8")) + 1 <= room or counter is None:
            continue  # fits for sure; or no tokenizer here, and the worker checks it exactly
        # The prompt is tokenized once, each continuation alone: joined, a token may merge across
        # the seam (a few tokens either way), so only a sum near the context is counted joined.
        # Tokenizing the prompt again with each of 64 continuations cost 64 prompts' work.
        if prompt_tokens is None:
            prompt_tokens = counter.count(segments)
        alone = prompt_tokens + counter.count([continuation])
        if alone + SEAM_TOKENS <= room and not chat:
            continue
        try:
            tokens = (alone if alone - SEAM_TOKENS > room and not chat
                      else counter.count(with_continuation(segments, continuation, control)))
        except ChatTemplateError as exc:
            problems.append(_problem(f"{loc}.continuations[{n}]", str(exc), "invalid_prompt"))
            continue
        if tokens > room:
            problems.append(_problem(f"{loc}.continuations[{n}]", f"the prompt with this continuation has {tokens} "
                                     f"tokens; it exceeds the context of {spec.name} ({spec.context_length} tokens)",
                                     "context_length_exceeded"))


def _rendered(*, loc: str, item: Any, spec: ModelSpec, system: str | None, counter: TokenCounter | None,
              problems: list[dict[str, str]]) -> list[Segment] | None:
    """The request's segments, or None where they cannot be made: a checkpoint's chat template
    that refuses the chat is a problem of this request; other shape problems are reported by the
    schemas."""
    try:
        control = counter.control(spec.chat_template) if counter is not None else ()
        segments = render(spec, prompt=item.prompt, messages=item.messages, system=system, control=control)
        if counter is not None and any(isinstance(s, Rendered) and s.typed for s in segments):
            counter.count(segments)  # a typed control token the vocabulary spells as itself is refused here
        return segments
    except ChatTemplateError as exc:
        problems.append(_problem(f"{loc}.messages" if item.messages is not None else loc, str(exc),
                                 "invalid_prompt"))
    except ValueError:
        pass
    return None


def _check_context(*, loc: str, item: Any, spec: ModelSpec, params: ResolvedParams,
                   system: str | None, counter: TokenCounter | None, problems: list[dict[str, str]],
                   plain: bool) -> None:
    """Refuse a prompt that, with its ``max_new_tokens``, does not fit the model's context."""
    segments = _rendered(loc=loc, item=item, spec=spec, system=system, counter=counter, problems=problems)
    if segments is None:
        return
    room = spec.context_length - params.max_new_tokens
    if token_upper_bound(segments) <= room or counter is None:
        return  # fits for sure; or no tokenizer here, and the worker checks it exactly
    tokens = counter.count(segments)
    if tokens > room:
        where = loc if plain else f"{loc}.{'messages' if item.messages is not None else 'prompt'}"
        problems.append(_problem(
            where, f"the prompt has {tokens} tokens; with max_new_tokens={params.max_new_tokens} it "
            f"exceeds the context of {spec.name} ({spec.context_length} tokens)", "context_length_exceeded"))


_INSERT_JOB = Job.__table__.insert()
_INSERT_REQUEST = JobRequest.__table__.insert()


def idempotency_conflict(job_id: str) -> ConflictError:
    """The error for an Idempotency-Key that an earlier, different request used."""
    return ConflictError("this Idempotency-Key was used for a different request",
                         details=[{"loc": "header.Idempotency-Key", "message": f"already used by {job_id}",
                                   "type": "idempotency_key_reused"}])


def existing_jobs(*, session: Session | Connection, job_ids: Sequence[str]) -> set[str]:
    """Which of these job ids are stored."""
    if not job_ids:
        return set()
    return set(session.execute(_EXISTING, {"ids": list(job_ids)}).scalars())


def find_idempotent(*, session: Session | Connection, owner: str, idempotency_key: str,
                    fingerprint: str) -> Row[Any] | None:
    """The row of the job an earlier request with this key created, or None; ``ConflictError``
    if that request was a different one."""
    job = find_idempotent_many(session=session, keys=[(owner, idempotency_key)]).get((owner, idempotency_key))
    if job is not None and job.request_hash != fingerprint:
        raise idempotency_conflict(job.id)
    return job


def find_idempotent_many(*, session: Session | Connection,
                         keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Row[Any]]:
    """The rows of the jobs stored under these (owner, Idempotency-Key) pairs, in one statement."""
    if not keys:
        return {}
    rows = session.execute(_BY_IDEMPOTENCY_KEY, {"keys": sorted({k for _, k in keys}),
                                                 "owners": sorted({o for o, _ in keys})})
    wanted = set(keys)
    return {(r.owner, r.idempotency_key): r for r in rows if (r.owner, r.idempotency_key) in wanted}


@dataclass(frozen=True)
class NewJob:
    """A validated job, ready to store: its row (ORM attribute names) and its requests' rows."""

    values: dict[str, Any]
    requests: list[dict[str, Any]]

    @property
    def id(self) -> str:
        return str(self.values["id"])

    @property
    def request_ids(self) -> list[str]:
        return [r["id"] for r in self.requests]

    @property
    def units(self) -> int:
        """What the job counts against the caps: its requests' weights (``request_weight``)."""
        return int(self.values["units"])

    def stamp(self) -> None:
        """A fresh job id and creation time, given when it is stored (its requests follow)."""
        now = utcnow()
        job_id = new_id("job")
        window = self.values["completion_window_s"]
        self.values.update(id=job_id, created_at=now, expires_at=now + timedelta(seconds=window),
                           dispatched_at=now if self.values["dispatched_at"] is not None else None)
        for row in self.requests:
            row["job_id"], row["created_at"] = job_id, now

    @property
    def row(self) -> Any:
        """The job as its stored row reads (attribute access, as a ``Job``)."""
        return SimpleNamespace(**self.values)


def create_job(*, session: Session, spec: JobCreate, model: ModelSpec, limits: Limits, owner: str,
               counter: TokenCounter | None = None, idempotency_key: str | None = None,
               fingerprint: str | None = None, delivery: str = "store",
               dispatching: bool = False) -> tuple[Job, list[str]]:
    """``prepare_job`` and ``insert_jobs`` in the caller's transaction: the job (not attached to
    the session) and its request ids in order."""
    new = prepare_job(spec=spec, model=model, limits=limits, owner=owner, counter=counter,
                      idempotency_key=idempotency_key, fingerprint=fingerprint, delivery=delivery,
                      dispatching=dispatching)
    insert_jobs(session.connection(), [new])
    return Job(**new.values), new.request_ids


def insert_jobs(conn: Any, jobs: Sequence[NewJob]) -> None:
    """Insert jobs and their requests: one statement for the jobs, one for all their requests.
    Core inserts: the ORM's unit of work costs more per row (and a flush per job) and buys
    nothing here."""
    if not jobs:
        return
    conn.execute(_INSERT_JOB, [{("metadata" if k == "job_metadata" else k): v for k, v in new.values.items()}
                               for new in jobs])
    conn.execute(_INSERT_REQUEST, [row for new in jobs for row in new.requests])


def prepare_job(*, spec: JobCreate, model: ModelSpec, limits: Limits, owner: str,
                counter: TokenCounter | None = None, idempotency_key: str | None = None,
                fingerprint: str | None = None, delivery: str = "store",
                dispatching: bool = False) -> NewJob:
    """Validate ``spec`` against the model and limits, and build the rows of the job and its
    requests (nothing is stored: ``insert_jobs`` does, in the caller's transaction).

    ``dispatching``: the caller publishes the requests right after the transaction commits, so
    the job is stored as dispatched (``undispatched`` clears that if publishing fails).

    ``counter`` counts prompt tokens with the model's tokenizer, to refuse prompts too long for the
    context now; without one, a worker fails such a request alone. ``delivery`` is how results
    reach the client (see ``ResolvedParams.delivery``). Raises ``InvalidRequestError`` listing
    every problem (with the request index).
    """
    items = spec.items()
    problems: list[dict[str, str]] = []
    if len(items) > limits.max_requests:
        field_name = "prompts" if spec.prompts is not None else "requests"
        problems.append(_problem(field_name, f"a job may hold at most {limits.max_requests} requests, "
                                 f"not {len(items)}", "too_many_requests"))
        raise InvalidRequestError(not_valid(problems), details=problems)
    if spec.system is not None and not model.chat:
        problems.append(_problem("system", f"model {model.name!r} is a base model and takes no "
                                 "system prompt", "not_a_chat_model"))
    elif spec.system is not None and not model.system_prompt:
        problems.append(_problem("system", f"the chat format of {model.name!r} takes no system prompt",
                                 "invalid_prompt"))
    if spec.system is not None and len(spec.system) > limits.max_prompt_chars:
        problems.append(_problem("system", f"system prompt is longer than {limits.max_prompt_chars} "
                                 "characters", "prompt_too_long"))

    if spec.webhook is not None:
        refused = check_url(spec.webhook.url, limits.webhooks)
        if refused is not None:
            problems.append(_problem("webhook.url", refused, "webhook_url_not_allowed"))

    scoring = spec.kind == "score"

    def resolve(loc: str, item_params: Any) -> ResolvedParams | None:
        if scoring:
            return _resolve_score(loc=loc, job_params=spec.params, item_params=item_params, problems=problems,
                                  delivery=delivery)
        return _resolve(loc=loc, spec=model, job_params=spec.params, item_params=item_params, problems=problems,
                        delivery=delivery)

    # Requests without params of their own share the job's: resolved, checked and stored once.
    shared = resolve("params", None)
    shared_json = shared.model_dump(mode="json") if shared is not None else None
    form = "prompts" if spec.prompts is not None else "requests"
    seen_custom_ids: dict[str, int] = {}
    resolved: list[tuple[ResolvedParams | None, dict[str, Any] | None]] = []
    units = 0  # what the whole job counts against the caps (its requests' weights)
    ceiling_told = False
    for i, item in enumerate(items):
        loc = f"{form}[{i}]"
        if item.params is None:
            params, params_json = shared, shared_json
        else:
            params = resolve(loc, item.params)
            params_json = params.model_dump(mode="json") if params is not None else None
        if item.continuations is not None and item.prompt_ids is not None:
            problems.append(_problem(f"{loc}.continuations", "continuations follow a text prompt, not prompt_ids",
                                     "invalid_request"))
        if item.continuations is not None and not scoring:
            problems.append(_problem(f"{loc}.continuations", "continuations are scored by a scoring job "
                                     "(kind: score); a generation job takes none", "invalid_request"))
        resolved.append((params, params_json))
        if params is not None:
            own = item.params is not None
            if (own or not ceiling_told) and params.samples * params.max_new_tokens > limits.max_request_new_tokens:
                ceiling_told = ceiling_told or not own  # the job's own params: told once
                problems.append(_problem(
                    f"{loc}.params" if item.params is not None else "params",
                    f"{params.samples} samples of up to {params.max_new_tokens} new tokens ask for more than "
                    f"{limits.max_request_new_tokens} tokens in one request; ask for fewer samples or tokens",
                    "too_much_work"))
            units += request_weight(item=item, params=params, system=spec.system, spec=model, limits=limits)
        _check_request(loc=loc, item=item, spec=model, params=params, limits=limits, problems=problems,
                       system=spec.system, counter=counter)
        if item.custom_id is not None:
            if item.custom_id in seen_custom_ids:
                problems.append(_problem(f"{loc}.custom_id", f"custom_id {item.custom_id!r} is already "
                                         f"used by requests[{seen_custom_ids[item.custom_id]}]",
                                         "duplicate_custom_id"))
            else:
                seen_custom_ids[item.custom_id] = i
    if problems:
        raise InvalidRequestError(not_valid(problems), details=problems)

    now = utcnow()
    window = window_seconds(spec.completion_window)
    values = dict(
        id=new_id("job"), owner=owner, model=model.name, kind=spec.kind, status="queued",
        params=spec.params.model_dump(exclude_none=True) if spec.params else {},
        system=spec.system, total=len(items), queued=len(items), running=0, succeeded=0, failed=0,
        cancelled=0, expired=0, prompt_tokens=0, completion_tokens=0, created_at=now,
        job_metadata=spec.metadata, priority=spec.priority, units=max(units, len(items)),
        idempotency_key=idempotency_key,
        request_hash=fingerprint, completion_window_s=window, expires_at=now + timedelta(seconds=window),
        dispatched_at=now if dispatching else None, started_at=None, completed_at=None, cancel_requested_at=None,
        webhook=initial_state(spec.webhook.url) if spec.webhook is not None else None,
        webhook_secret=(spec.webhook.secret or new_secret()) if spec.webhook is not None else None,
    )
    ids = new_ids("req", len(items))
    rows = [
        {"id": request_id, "job_id": values["id"], "idx": i, "custom_id": item.custom_id, "prompt": item.prompt,
         "prompt_ids": item.prompt_ids, "messages": [m.model_dump() for m in item.messages] if item.messages is not None else None,
         "params": params_json, "continuations": item.continuations, "status": "queued", "attempts": 0,
         "created_at": now}
        for i, (request_id, item, (_, params_json)) in enumerate(zip(ids, items, resolved, strict=True))
    ]
    return NewJob(values, rows)


# --- what clients read: Core rows, no ORM objects (a poll must cost next to nothing) ----------
#
# Rows carry the ORM's attribute names (the jobs' "metadata" column reads as ``job_metadata``),
# so code that formats them takes a row or a ``Job`` alike. Statements are built once: building
# a SQLAlchemy statement costs more than running a cached one.

# What clients read of a job (not its idempotency key, request hash, dispatch time or webhook key).
JOB_FIELDS = tuple(c.label("job_metadata") if c.name == "metadata" else c for c in Job.__table__.c
                   if c.name not in ("idempotency_key", "request_hash", "dispatched_at", "webhook_secret"))
# What results pages and batch output files read (the request's params: a batch line answers as
# the request asked, logprobs or echo).
RESULT_FIELDS = tuple(JobRequest.__table__.c[name] for name in (
    "id", "job_id", "idx", "custom_id", "status", "prompt", "messages", "prompt_ids", "continuations", "params",
    "text", "detail", "finish_reason", "prompt_tokens", "completion_tokens", "error_code", "error_message",
    "created_at", "completed_at"))
_JOB_BY_ID = select(*JOB_FIELDS).where(Job.__table__.c.id == bindparam("id"))
_JOB_PAGES: dict[tuple[bool, bool, bool], Any] = {}
_RESULT_PAGES: dict[bool, Any] = {}
_EXISTING = select(Job.__table__.c.id).where(Job.__table__.c.id.in_(bindparam("ids", expanding=True)))
_BY_IDEMPOTENCY_KEY = select(*JOB_FIELDS, Job.__table__.c.idempotency_key, Job.__table__.c.request_hash).where(
    Job.__table__.c.idempotency_key.in_(bindparam("keys", expanding=True)),
    Job.__table__.c.owner.in_(bindparam("owners", expanding=True)))
_REQUEST_IDX = select(JobRequest.__table__.c.idx).where(JobRequest.__table__.c.job_id == bindparam("job"),
                                                         JobRequest.__table__.c.id == bindparam("id"))


def get_job(*, session: Session | Connection, job_id: str, owner: str | None = None) -> Row[Any]:
    """The job's row, or ``NotFoundError`` (also when it belongs to another owner)."""
    job = session.execute(_JOB_BY_ID, {"id": job_id}).first()
    if job is None or (owner is not None and job.owner != owner):
        raise NotFoundError(f"no job {job_id!r}")
    return job


def mark_dispatched(*, session: Session, job_id: str) -> None:
    """Note that every request of the job has been put on its queue."""
    session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))


def mark_undispatched(*, session: Session, job_id: str) -> None:
    """Publishing a job stored as dispatched failed: it waits for the reconciler."""
    session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=None))


def _job_page(owner: bool, after: bool, status: bool) -> Any:
    key = (owner, after, status)
    if key not in _JOB_PAGES:
        c = Job.__table__.c
        query = select(*JOB_FIELDS)
        if owner:
            query = query.where(c.owner == bindparam("owner"))
        if status:
            query = query.where(c.status == bindparam("status"))
        if after:
            query = query.where(c.id < bindparam("after"))
        _JOB_PAGES[key] = query.order_by(c.id.desc()).limit(bindparam("limit"))
    return _JOB_PAGES[key]


def list_jobs(*, session: Session | Connection, owner: str | None, after: str | None = None, limit: int = 20,
              status: str | None = None) -> tuple[list[Row[Any]], bool]:
    """The owner's jobs, newest first, after the job ``after``; and whether more follow.

    Ids are time-ordered, so "newest first" is id order and the cursor is the last id seen.
    """
    query = _job_page(owner is not None, after is not None, status is not None)
    rows = session.execute(query, {"owner": owner, "after": after, "status": status, "limit": limit + 1}).all()
    return rows[:limit], len(rows) > limit


def jobs_in_motion(*, session: Session | Connection, owner: str | None, since: datetime,
                   limit: int = 200) -> list[Row[Any]]:
    """The owner's jobs that may be changing: active ones, and those created or ended since
    ``since``; newest first, at most ``limit``."""
    c = Job.__table__.c
    query = select(*JOB_FIELDS).where(or_(c.status.in_(ACTIVE_JOB_STATUSES), c.created_at >= since,
                                          c.completed_at >= since))
    if owner is not None:
        query = query.where(c.owner == owner)
    return list(session.execute(query.order_by(c.id.desc()).limit(limit)).all())


def list_results(
    *, session: Session | Connection, job_id: str, owner: str | None = None, after: str | None = None,
    limit: int = 100, status: str | None = None,
) -> tuple[list[Row[Any]], bool]:
    """A page of the job's requests in request order, and whether more follow.

    ``after`` is the id of the last request of the previous page.
    """
    get_job(session=session, job_id=job_id, owner=owner)
    after_idx = -1
    if after is not None:
        found = session.execute(_REQUEST_IDX, {"job": job_id, "id": after}).scalar()
        if found is None:
            raise InvalidRequestError(
                f"'after' is not a request of job {job_id!r}",
                details=[_problem("after", "unknown request id for this job", "invalid_cursor")],
            )
        after_idx = found
    rows = results_after(session=session, job_id=job_id, after_idx=after_idx, limit=limit + 1, status=status)
    return rows[:limit], len(rows) > limit


def results_after(*, session: Session | Connection, job_id: str, after_idx: int, limit: int,
                  status: str | None = None) -> list[Row[Any]]:
    """Up to ``limit`` requests of a job with index above ``after_idx``, in order (keyset paging)."""
    key = status is not None
    if key not in _RESULT_PAGES:
        c = JobRequest.__table__.c
        query = select(*RESULT_FIELDS).where(c.job_id == bindparam("job"), c.idx > bindparam("after"))
        if key:
            query = query.where(c.status == bindparam("status"))
        _RESULT_PAGES[key] = query.order_by(c.idx).limit(bindparam("limit"))
    return list(session.execute(_RESULT_PAGES[key], {"job": job_id, "after": after_idx, "status": status,
                                                     "limit": limit}).all())


def estimated_completion(*, status: str, started_at: datetime | None, done: int, left: int,
                         now: datetime | None = None) -> datetime | None:
    """While a job runs: when it should end, at the rate its ``done`` requests have finished so
    far (``left``: those queued or running)."""
    if status != "running" or started_at is None or done == 0:
        return None
    now = now or utcnow()
    return now + (now - started_at) / done * left


# The capacity caps' reads (``core.capacity``), built once: they run in every submission group.
_C = Job.__table__.c
_ACTIVE = _C.status.in_(ACTIVE_JOB_STATUSES)


def _share(count: Any) -> Any:
    """A job's units for ``count`` of its requests: its units in proportion, rounded up (exact
    when its requests weigh alike, as nearly all jobs' do)."""
    return (_C.units * count + _C.total - 1) / _C.total


# The caps count requests by their weight (``request_weight``: samples and tokens), a job's
# waiting or running part in proportion to its units.
_PENDING_FOR_MODEL = select(func.coalesce(func.sum(_share(_C.queued)), 0)).where(_C.model == bindparam("v"), _ACTIVE)
_PENDING_FOR_OWNER = select(func.coalesce(func.sum(_share(_C.queued + _C.running)), 0)).where(
    _C.owner == bindparam("v"), _ACTIVE)
_STORED_FOR_OWNER = select(func.coalesce(func.sum(_C.units), 0)).where(_C.owner == bindparam("v"))
_SUBMITTED_SINCE = {
    column: select(func.coalesce(func.sum(_C.units), 0)).where(_C[column] == bindparam("v"),
                                                               _C.id >= bindparam("since"))
    for column in ("model", "owner")}


def pending_for_model(*, session: Session | Connection, model: str) -> int:
    """Requests of a model waiting to run."""
    return int(session.execute(_PENDING_FOR_MODEL, {"v": model}).scalar() or 0)


def submitted_since(*, session: Session | Connection, since_id: str, model: str | None = None,
                    owner: str | None = None) -> int:
    """Requests of the jobs of a model (or an owner) whose ids sort at or after ``since_id``:
    what was submitted since that id was current (an index range scan)."""
    column, value = ("model", model) if model is not None else ("owner", owner)
    return int(session.execute(_SUBMITTED_SINCE[column], {"v": value, "since": since_id}).scalar() or 0)


def stored_for_owner(*, session: Session | Connection, owner: str) -> int:
    """Requests an owner's jobs hold, in any status (until the jobs are deleted)."""
    return int(session.execute(_STORED_FOR_OWNER, {"v": owner}).scalar() or 0)


def pending_for_owner(*, session: Session | Connection, owner: str) -> int:
    """An owner's requests waiting or running."""
    return int(session.execute(_PENDING_FOR_OWNER, {"v": owner}).scalar() or 0)


# --- changes a client asks for ---------------------------------------------------------------


def unindexed_status() -> Any:
    """A request's status, compared so that no index on it is used: a statement that names its
    requests by job or by id must find them that way. With bound parameters and no statistics,
    SQLite otherwise reads every request of the database in that status through the status index."""
    return func.coalesce(JobRequest.__table__.c.status, "")


def cancel_job(*, session: Session, job_id: str, owner: str | None, now: datetime | None = None) -> Row[Any]:
    """Cancel what has not started; running requests finish and are kept.

    The job is ``cancelling`` while some still run and ``cancelled`` once none do. Cancelling a
    cancelled job changes nothing; a job that already ended otherwise is a ``ConflictError``.
    """
    now = now or utcnow()
    job = get_job(session=session, job_id=job_id, owner=owner)
    if job.status in ("cancelled", "cancelling"):
        return job
    if job.status in FINISHED_JOB_STATUSES:
        raise ConflictError(f"job {job_id} has already ended ({job.status})")
    n = session.execute(
        update(JobRequest).where(JobRequest.job_id == job_id, unindexed_status() == "queued")
        .values(status="cancelled", completed_at=now)
    ).rowcount
    session.execute(update(Job).where(Job.id == job_id).values(
        queued=Job.queued - n, cancelled=Job.cancelled + n, cancel_requested_at=now,
        status=case((Job.running > 0, "cancelling"), else_=Job.status)))
    finalize(session, [job_id], now)
    return get_job(session=session, job_id=job_id)


def delete_job(*, session: Session, job_id: str, owner: str | None) -> None:
    """Remove a finished job and all its requests and results."""
    job = get_job(session=session, job_id=job_id, owner=owner)
    if job.status not in FINISHED_JOB_STATUSES:
        raise ConflictError(f"job {job_id} is {job.status}; cancel it and wait for it to end before deleting it")
    session.execute(delete(JobRequest).where(JobRequest.job_id == job_id))
    # Its webhook event goes too (sent or not): it names the job and carries the job's key.
    session.execute(delete(WebhookEvent).where(WebhookEvent.subject_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id))


def expire_due(*, session: Session, now: datetime | None = None, limit: int = 100) -> list[str]:
    """Expire what has not started in jobs whose completion window has passed; returns their ids.

    Requests that are running finish and are kept.
    """
    now = now or utcnow()
    due = list(session.scalars(select(Job.id).where(Job.status.in_(ACTIVE_JOB_STATUSES), Job.expires_at <= now)
                               .order_by(Job.expires_at).limit(limit)))
    for job_id in due:
        n = session.execute(
            update(JobRequest).where(JobRequest.job_id == job_id, unindexed_status() == "queued")
            .values(status="expired", completed_at=now)
        ).rowcount
        session.execute(update(Job).where(Job.id == job_id).values(queued=Job.queued - n, expired=Job.expired + n))
    finalize(session, due, now)
    return due


def finalize(session: Session | Connection, job_ids: Sequence[str], now: datetime) -> None:
    """End the jobs that have nothing queued or running, with the status their requests earned;
    those with a webhook get their event in the same transaction (the outbox, ``core.webhooks``).
    Called in every transaction that can leave a job with nothing queued or running: this is
    the only place a job ends."""
    if job_ids:
        ended = connection_of(session).execute(_FINALIZE, {"jids": list(job_ids), "now": now}).all()
        hooked = [row.id for row in ended if row.webhook is not None]
        if hooked:
            enqueue_job_events(session, hooked, now)


_JOBS = Job.__table__.c
_NOW = bindparam("now", type_=UTCDateTime())
_FINALIZE = (
    update(Job.__table__)
    .where(_JOBS.id.in_(bindparam("jids", expanding=True)), _JOBS.status.in_(ACTIVE_JOB_STATUSES),
           _JOBS.queued == 0, _JOBS.running == 0)
    .values(status=case((_JOBS.cancel_requested_at.is_not(None), "cancelled"), (_JOBS.expired > 0, "expired"),
                        (_JOBS.succeeded == 0, "failed"), else_="completed"),
            completed_at=_NOW)
    .returning(_JOBS.id, _JOBS.webhook)
)
