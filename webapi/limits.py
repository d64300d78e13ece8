"""Backpressure: per-key request rate (Redis, shared by every API process), per-key pending
requests and per-model queue depth (the database). Past a limit a client gets 429 with
Retry-After; if Redis cannot be reached the rate limit lets requests through rather than fail them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from sqlalchemy.orm import Session

from core import jobs as job_service
from core.auth import Principal
from core.settings import Settings
from webapi.errors import ApiError

log = logging.getLogger("batchgen.api")


class Limits:
    """The checks views make before accepting work."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: Any = None
        self._lock = threading.Lock()

    def _client(self) -> Any:
        with self._lock:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=1,
                                                   socket_connect_timeout=1)
            return self._redis

    def check_rate(self, principal: Principal) -> None:
        """At most ``rate_limit_per_minute`` requests per key per clock minute."""
        limit = self.settings.rate_limit_per_minute
        if not limit or not self.settings.redis_url:
            return
        now = time.time()
        window = int(now // 60)
        key = f"{self.settings.redis_prefix}ratelimit:{principal.key_id}:{window}"
        try:
            pipe = self._client().pipeline()
            pipe.incr(key)
            pipe.expire(key, 120)
            count = pipe.execute()[0]
        except Exception as exc:  # redis down: do not turn it into an outage of the API
            log.warning("rate limit not checked (redis: %s)", exc)
            return
        if count > limit:
            retry = max(1, math.ceil((window + 1) * 60 - now))
            raise ApiError(429, "rate_limited", f"more than {limit} requests this minute for this key",
                           {"retry_after": retry}, headers={"Retry-After": str(retry)})

    def check_capacity(self, *, session: Session, principal: Principal, model: str, new: int) -> None:
        """Refuse ``new`` requests when the model's queue or the key's pending work is full."""
        cap = self.settings.max_pending_per_model
        if cap and job_service.pending_for_model(session=session, model=model) + new > cap:
            raise ApiError(429, "queue_full", f"model {model} has more than {cap} requests waiting; retry later",
                           {"retry_after": 30}, headers={"Retry-After": "30"})
        cap = self.settings.max_pending_per_key
        if cap and job_service.pending_for_owner(session=session, owner=principal.owner) + new > cap:
            raise ApiError(429, "too_many_pending", f"this owner has more than {cap} requests waiting or "
                           "running; wait for some to finish", {"retry_after": 60}, headers={"Retry-After": "60"})
