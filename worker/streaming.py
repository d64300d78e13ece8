"""Announcing progress of synchronous requests over Redis pub/sub.

A request whose delivery is ``stream`` gets a ``delta`` message per piece of new text while it
generates, tagged with the run that generated it (a request retried elsewhere streams again
under another run, and the API must not splice two runs' texts); every request whose delivery is not ``store`` gets a ``done`` message once its result
is stored (the API then reads the result from the database, which stays the authority). Messages
are sent by a thread of their own, so CTranslate2's callback never waits on the network.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any

from core.queueing import stream_channel
from core.settings import Settings

log = logging.getLogger("batchgen.streaming")


class Publisher:
    """Fire-and-forget publishing; a lost message only makes the API fall back to polling."""

    def __init__(self, settings: Settings, client: Any = None) -> None:
        import redis

        self.settings = settings
        self._client = client or redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        self._queue: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="publisher", daemon=True)
        self._thread.start()

    def delta(self, request_id: str, text: str, run_id: str) -> None:
        self._queue.put((request_id, {"type": "delta", "text": text, "run": run_id}))

    def done(self, request_id: str) -> None:
        self._queue.put((request_id, {"type": "done"}))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request_id, message = item
            try:
                self._client.publish(stream_channel(self.settings, request_id), json.dumps(message))
            except Exception as exc:
                log.warning("could not publish progress (%s)", exc, extra={"request_id": request_id})
