"""Putting requests on their model's queue, by task *name*: the API never imports the worker.

Small messages of request ids (up to ``BATCHGEN_REQUESTS_PER_MESSAGE`` each, so a big job costs
the broker and the worker a fraction of a message per request), written to Redis directly in the
format Celery workers consume (``core.queueing.publish``). Small jobs are dispatched inside the
HTTP request after the job is committed; large ones by a background thread so the client gets
its ``202`` at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from core.queueing import publish
from core.settings import Settings

log = logging.getLogger("batchgen.dispatch")


class DispatchError(RuntimeError):
    """The broker could not take the messages."""


class Dispatcher:
    """Publishes ``batchgen.generate`` messages to per-model queues."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: Any = None
        self._lock = threading.Lock()
        self._backlog: queue.Queue[tuple[str, str, list[str], int, Callable[[str], None]]] = queue.Queue()
        self._thread: threading.Thread | None = None

    def _client(self) -> Any:
        with self._lock:
            if self._redis is None:
                if not self.settings.redis_url:
                    raise DispatchError("BATCHGEN_REDIS_URL is not set: there is no broker to dispatch to")
                import redis

                self._redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5,
                                                   socket_connect_timeout=2)
            return self._redis

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
                       on_done: Callable[[str], None]) -> None:
        """Queue a job for the background dispatcher; ``on_done(job_id)`` runs when published."""
        self._backlog.put((job_id, model, list(request_ids), priority, on_done))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._drain, name="dispatcher", daemon=True)
                self._thread.start()

    def _drain(self) -> None:
        while True:
            job_id, model, ids, priority, on_done = self._backlog.get()
            try:
                self.dispatch(model=model, request_ids=ids, priority=priority)
                on_done(job_id)
                log.info("dispatched %d requests in the background", len(ids), extra={"job_id": job_id})
            except Exception:
                log.exception("background dispatch failed; the job stays undispatched",
                              extra={"job_id": job_id})
            finally:
                self._backlog.task_done()

    def wait_idle(self) -> None:
        """Block until the background backlog is published (tests, shutdown)."""
        self._backlog.join()
