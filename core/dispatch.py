"""Putting requests on their model's queue, by task *name*: the API never imports the worker.

Used by ``core.submission``, the one way work enters the service. Small messages of request ids (up to ``BATCHGEN_REQUESTS_PER_MESSAGE`` each, so a big job costs
the broker and the worker a fraction of a message per request), written to Redis directly in the
format Celery workers consume (``core.queueing.publish``). A committed job is handed to a
publishing thread, so the client gets its ``202`` without waiting on Redis, and jobs submitted
together share messages. Synchronous calls (completions) publish at once, in the request.
A job whose publishing fails stays stored and queued; the workers' reconciler dispatches it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from core.queueing import publish, redis_client
from core.settings import Settings

log = logging.getLogger("batchgen.dispatch")

# The publishing thread waits this long after the first job it takes, then publishes everything
# handed over meanwhile (up to COALESCE_MAX request ids) together.
LINGER_S = 0.002
COALESCE_MAX = 5000


class Handover(NamedTuple):
    """A committed job's requests, handed to the publishing thread."""

    job_id: str
    model: str
    request_ids: list[str]
    priority: int
    on_done: Callable[[str], None] | None
    on_failed: Callable[[str], None] | None


class DispatchError(RuntimeError):
    """The broker could not take the messages."""


class Dispatcher:
    """Publishes ``batchgen.generate`` messages to per-model queues."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: Any = None
        self._lock = threading.Lock()
        self._backlog: queue.Queue[Handover] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._unfinished = 0  # handed over, not yet published (or given up on)

    def _client(self) -> Any:
        with self._lock:
            if self._redis is None:
                if not self.settings.redis_url:
                    raise DispatchError("BATCHGEN_REDIS_URL is not set: there is no broker to dispatch to")
                self._redis = redis_client(self.settings.redis_url)
            return self._redis

    def ping(self) -> None:
        """Raise if the broker cannot be reached now."""
        self._client().ping()

    def dispatch(self, *, model: str, request_ids: Sequence[str], priority: int = 5,
                 per_message: int | None = None) -> None:
        """Publish the request ids now; raises ``DispatchError`` if the broker fails."""
        try:
            publish(self._client(), self.settings, model=model, request_ids=request_ids, priority=priority,
                    per_message=per_message or self.settings.requests_per_message)
        except DispatchError:
            raise
        except Exception as exc:  # redis-py raises many kinds; the caller needs one
            raise DispatchError(f"could not publish to {self.settings.queue_for(model)}: {exc}") from exc

    def dispatch_later(self, *, job_id: str, model: str, request_ids: Sequence[str], priority: int,
                       on_done: Callable[[str], None] | None = None,
                       on_failed: Callable[[str], None] | None = None) -> None:
        """Hand a committed job's requests to the publishing thread; ``on_done(job_id)`` runs once
        they are on the queue, ``on_failed(job_id)`` if the broker refused them (the reconciler
        then dispatches them)."""
        with self._lock:
            self._unfinished += 1
        self._backlog.put(Handover(job_id, model, list(request_ids), priority, on_done, on_failed))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._drain, name="dispatcher", daemon=True)
                self._thread.start()

    def _drain(self) -> None:
        """Publish what is handed over, many jobs' requests at a time: jobs submitted at the same
        moment (a burst of single-prompt jobs) share messages, so a worker pays Celery's cost per
        message once for several of them."""
        while True:
            taken = [self._backlog.get()]
            time.sleep(LINGER_S)  # let the other submissions of a burst catch up
            held = len(taken[0].request_ids)
            while held < COALESCE_MAX:
                try:
                    taken.append(self._backlog.get_nowait())
                except queue.Empty:
                    break
                held += len(taken[-1].request_ids)
            groups: dict[tuple[str, int], list[Handover]] = {}
            for handover in taken:
                groups.setdefault((handover.model, handover.priority), []).append(handover)
            for (model, priority), jobs in groups.items():
                try:
                    self.dispatch(model=model, request_ids=[i for job in jobs for i in job.request_ids],
                                  priority=priority)
                except Exception:
                    log.exception("dispatch failed; %d jobs stay stored for the reconciler", len(jobs))
                    for job in jobs:
                        self._call(job.on_failed, job.job_id)
                    continue
                for job in jobs:
                    self._call(job.on_done, job.job_id)
                    if len(job.request_ids) > COALESCE_MAX:
                        log.info("dispatched %d requests in the background", len(job.request_ids),
                                 extra={"job_id": job.job_id})
            with self._lock:
                self._unfinished -= len(taken)

    @staticmethod
    def _call(callback: Callable[[str], None] | None, job_id: str) -> None:
        if callback is None:
            return
        try:
            callback(job_id)
        except Exception:
            log.exception("dispatch bookkeeping failed", extra={"job_id": job_id})

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until everything handed over is published (tests, shutdown); False if
        ``timeout`` passed first. (Polls a count rather than ``Queue.join``: under gunicorn's
        gevent workers the queue is gevent's, which has no timeout on join.)"""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._unfinished:
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
