"""The one way work enters the service.

Every interface (the native jobs API, OpenAI batches and completions, DashScope, PAI-EAS) turns
its own request shape into a ``JobCreate`` and calls one method here. What they share happens
once, here: model lookup, validation against the model and the limits, idempotency, the capacity
caps, storing the job and its requests in one transaction, and dispatch. Problems are raised as
domain errors (``core.errors``); each interface answers them in its own shape.

- ``submit_job``: a native job, answered at once; its requests are published by the dispatcher's
  thread (a big job is marked dispatched once all of it is on the queue).
- ``submit_batch``: the job of an OpenAI batch, with the batch around it.
- ``submit_call``: one request that a caller waits on (completions, DashScope, PAI-EAS), at the
  highest priority, published in the request itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from core import batches as batch_service
from core import jobs as job_service
from core.capacity import Capacity
from core.db import Database
from core.dispatch import Dispatcher
from core.errors import InvalidRequestError, LimitError, UnavailableError, UnknownModelError
from core.group_commit import Entry, GroupCommit
from core.registry import ModelSpec, Registry
from core.schemas import JobCreate, WebhookCreate, error_details
from core.settings import Settings
from core.tables import Batch
from core.tokens import TokenCounter
from core.webhooks import AllowList, check_url, pending_events

log = logging.getLogger("batchgen.submit")

CALL_PRIORITY = 9  # a caller is waiting: ahead of batch work, in the same batches


@dataclass(frozen=True)
class Submitted:
    """A stored job: its row (attribute access, as a ``Job``), its request ids in order, and
    whether it was stored by an earlier request with the same idempotency key (``replayed``:
    nothing new was stored, and ``request_ids`` is empty)."""

    job: Any
    request_ids: list[str] = field(default_factory=list)
    replayed: bool = False


class Submissions:
    """Stores and dispatches work for every interface."""

    def __init__(self, *, settings: Settings, db: Database, registry: Callable[[], Registry],
                 dispatcher: Dispatcher, token_counter: Callable[[ModelSpec], TokenCounter | None]) -> None:
        self.settings = settings
        self.db = db
        self.registry = registry
        self.dispatcher = dispatcher
        self.capacity = Capacity(settings)
        self.token_counter = token_counter
        self.webhooks = AllowList.of(settings)
        self.group_commit = GroupCommit(db, self.capacity, on_stored=self._dispatch_group)

    def resolve(self, name: str) -> ModelSpec:
        """The model called ``name`` (or an alias of it); ``UnknownModelError`` otherwise."""
        try:
            return self.registry().resolve(name)
        except UnknownModelError as exc:
            raise UnknownModelError(exc.message, details=[{"loc": "model", "message": exc.message,
                                                           "type": "model_not_found"}]) from None

    def limits(self, max_requests: int | None = None) -> job_service.Limits:
        return job_service.Limits(max_requests=max_requests or self.settings.max_requests_per_job,
                                  max_prompt_chars=self.settings.max_prompt_chars, webhooks=self.webhooks,
                                  max_request_new_tokens=self.settings.max_request_new_tokens,
                                  weight_tokens=self.settings.request_weight_tokens)

    def dispatches_inline(self, count: int) -> bool:
        """Whether a job of ``count`` requests is stored as dispatched: small jobs are published
        within milliseconds of their commit; a big one is marked once all of it is on the queue."""
        return count <= self.settings.inline_dispatch_limit

    # --- native jobs ---------------------------------------------------------------------------

    def submit_job(self, *, owner: str, body: Any, idempotency_key: str | None = None) -> Submitted:
        """Validate ``body`` (parsed JSON) as a job, store it and hand it to the dispatcher.

        With ``idempotency_key``, a retry of the same body returns the job the first one stored
        (``replayed``); the same key with a different body raises ``ConflictError``.
        """
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object",
                                      details=[{"loc": "body", "message": "expected an object", "type": "object_type"}])
        fingerprint = job_service.request_fingerprint(body) if idempotency_key else None
        if idempotency_key is not None:
            replay = self._replay(owner, idempotency_key, fingerprint)  # type: ignore[arg-type]
            if replay is not None:
                return replay
        try:
            spec = JobCreate.model_validate(body)
        except ValidationError as exc:
            raise InvalidRequestError("the job is not valid", details=error_details(exc)) from None
        model = self.resolve(spec.model)
        if spec.webhook is not None:
            self.check_webhook(spec.webhook, owner)
        new = job_service.prepare_job(
            spec=spec, model=model, limits=self.limits(), owner=owner, counter=self.token_counter(model),
            idempotency_key=idempotency_key, fingerprint=fingerprint,
            dispatching=self.dispatches_inline(spec.count()))
        entry = self.group_commit.store(Entry(new, owner=owner, model=model.name, idempotency_key=idempotency_key,
                                              fingerprint=fingerprint))
        if entry.job is not None:  # a job stored earlier under this key
            return Submitted(entry.job, replayed=True)
        log.debug("job accepted: %d requests for %s", len(new.requests), model.name, extra={"job_id": new.id})
        return Submitted(new.row, new.request_ids)

    def check_webhook(self, webhook: WebhookCreate | None, owner: str | None = None) -> None:
        """``InvalidRequestError`` if the service may not call this webhook (the allow-list);
        ``LimitError`` (``webhook_backlog``) if the owner's events waiting to be sent are at the
        cap (``webhook_max_pending``): their receivers do not keep up, and more would only wait."""
        refused = None if webhook is None else check_url(webhook.url, self.webhooks)
        if refused is not None:
            raise InvalidRequestError(refused, details=[{"loc": "webhook.url", "message": refused,
                                                         "type": "webhook_url_not_allowed"}])
        cap = self.settings.webhook_max_pending
        if webhook is None or owner is None or not cap:
            return
        with self.db.connect() as conn:
            waiting = pending_events(conn, owner)
        if waiting >= cap:
            raise LimitError("webhook_backlog", f"{waiting} webhook events of yours wait to be sent (at most {cap}); "
                             "submit without a webhook and poll, or retry once your receivers caught up",
                             retry_after=60)

    def _replay(self, owner: str, key: str, fingerprint: str | None) -> Submitted | None:
        with self.db.connect() as conn:
            job = job_service.find_idempotent(session=conn, owner=owner, idempotency_key=key,
                                              fingerprint=fingerprint or "")
        return None if job is None else Submitted(job, replayed=True)

    # --- OpenAI batches ------------------------------------------------------------------------

    def submit_batch(self, *, owner: str, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None, spec: JobCreate, model: ModelSpec,
                     webhook: WebhookCreate | None = None) -> tuple[Batch, Submitted]:
        """Store a validated batch input as a job with its batch, and hand it to the dispatcher.
        ``InvalidRequestError`` (problems by request index) if the model refuses some of it."""
        prepared = job_service.prepare_job(spec=spec, model=model, limits=self.limits(), owner=owner,
                                           counter=self.token_counter(model),
                                           dispatching=self.dispatches_inline(spec.count()))
        with self.db.write() as session:
            self.capacity.check(session=session, owner=owner, model=model.name, new=prepared.units)
            prepared.stamp()  # its id and time from inside the transaction, as the group commit does
            batch, job, request_ids = batch_service.create_batch(
                session=session, owner=owner, input_file_id=input_file_id, endpoint=endpoint,
                completion_window=completion_window, metadata=metadata, spec=spec, model=model,
                limits=self.limits(), webhook=webhook, prepared=prepared)
        log.info("batch accepted: %d requests", len(request_ids), extra={"job_id": job.id})
        self._dispatch_later(job, request_ids)
        return batch, Submitted(job, request_ids)

    def _dispatch_group(self, entries: list[Entry]) -> None:
        """After a group commit: the native jobs it stored go to the publishing thread together
        (synchronous calls publish themselves, in the request)."""
        for entry in entries:
            if entry.dispatch:
                self._dispatch_later(entry.new.row, entry.new.request_ids)

    def _dispatch_later(self, job: Any, request_ids: list[str]) -> None:
        """Hand a committed job's requests to the publishing thread. If the broker refuses them the
        job stays stored and queued, not lost: the workers' reconciler dispatches it."""

        def mark_done(job_id: str) -> None:
            with self.db.write() as session:
                job_service.mark_dispatched(session=session, job_id=job_id)

        def mark_failed(job_id: str) -> None:
            with self.db.write() as session:
                job_service.mark_undispatched(session=session, job_id=job_id)

        inline = self.dispatches_inline(len(request_ids))
        self.dispatcher.dispatch_later(job_id=job.id, model=job.model, request_ids=request_ids,
                                       priority=job.priority, on_done=None if inline else mark_done,
                                       on_failed=mark_failed)

    # --- synchronous calls ---------------------------------------------------------------------

    def submit_call(self, *, owner: str, spec: JobCreate, model: ModelSpec, delivery: str,
                    before_dispatch: Callable[[str], None]) -> Submitted:
        """Store one request a caller waits on, at ``CALL_PRIORITY``, and publish it now.

        ``before_dispatch(request_id)`` runs between the two (a subscription to the request's
        announcements must exist before a worker can make them). With the queue unreachable this
        raises ``UnavailableError`` and leaves nothing behind to run later for nobody: the queue is
        reached before anything is stored, and a request stored but not published is cancelled.
        """
        spec = spec.model_copy(update={"priority": CALL_PRIORITY, "completion_window": "1h"})
        try:
            self.dispatcher.ping()
        except Exception as exc:
            log.warning("synchronous call refused: the queue is unavailable (%s)", exc)
            raise UnavailableError("the queue is unavailable; retry shortly") from None
        new = job_service.prepare_job(spec=spec, model=model, limits=self.limits(max_requests=1), owner=owner,
                                      counter=self.token_counter(model), delivery=delivery, dispatching=True)
        self.group_commit.store(Entry(new, owner=owner, model=model.name, stored_quota=False, dispatch=False))
        try:
            before_dispatch(new.request_ids[0])
            self.dispatcher.dispatch(model=model.name, request_ids=new.request_ids, priority=CALL_PRIORITY)
        except Exception as exc:  # Redis went away in between: the stored request is cancelled
            self.cancel_quietly(new.id)
            log.warning("synchronous call refused: the queue is unavailable (%s)", exc, extra={"job_id": new.id})
            raise UnavailableError("the queue is unavailable; retry shortly") from None
        return Submitted(new.row, new.request_ids)

    def cancel_quietly(self, job_id: str) -> None:
        """Cancel a job nobody waits for any more, if it can still be cancelled."""
        try:
            with self.db.write() as session:
                job_service.cancel_job(session=session, job_id=job_id, owner=None)
        except Exception:  # it ended meanwhile, or the database is away: nothing more to do
            log.info("could not cancel an abandoned synchronous request", extra={"job_id": job_id})
