"""Backpressure at the door: per-key request rate and failed keys (Redis, shared by every API
process), long calls per API process and per key (event streams and synchronous generation, each
holding a server thread), large bodies parsed at once, and file quotas. Past a limit a client gets
429 with Retry-After; if Redis cannot be reached the rate limit lets requests through rather than
fail them. The caps on pending and stored requests are checked where work is stored
(``core.capacity``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session

from core import files as file_service
from core.auth import Principal
from core.capacity import serialize
from core.queueing import redis_client
from core.settings import Settings
from webapi.errors import ApiError

log = logging.getLogger("batchgen.api")


class LongCall:
    """One held place among the process's long calls and among its key's (``release`` may be
    called more than once)."""

    def __init__(self, pool: LongCalls, keys: KeyCalls | None = None, key_id: str = "", member: str = "") -> None:
        self._pool: LongCalls | None = pool
        self._keys, self._key_id, self._member = keys, key_id, member

    def release(self) -> None:
        with LongCalls.lock:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.held -= 1
        keys, self._keys = self._keys, None
        if keys is not None:
            keys.release(self._key_id, self._member)


KEY_PLACE_TTL_S = 30.0
# Take a place for a key: drop lapsed places, refuse past the cap, else hold one until ttl.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return 1
"""


class KeyCalls:
    """Long calls per API key, across every API process (a sorted set per key in Redis, places
    scored by when they lapse): one tenant cannot take every stream or synchronous slot. A thread
    of the process renews every place it holds every ``KEY_PLACE_TTL_S / 3`` (a call blocked on a
    slow reader keeps its place); the places of a process that died lapse. Without Redis the
    cap is not enforced (as the rate limit), rather than failing the call."""

    def __init__(self, settings: Settings, client: Callable[[], Any]) -> None:
        self.settings, self._client = settings, client
        self._take: Any = None
        self._held: dict[str, str] = {}  # member -> key id
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    def _key(self, key_id: str) -> str:
        return f"{self.settings.redis_prefix}longcalls:{key_id}"

    def take(self, key_id: str) -> str | None:
        """A place for this key (its member id), None if Redis cannot be asked; 429 past the cap."""
        cap = self.settings.max_long_calls_per_key
        member = uuid.uuid4().hex
        try:
            if self._take is None:
                self._take = self._client().register_script(_TAKE)
            taken = self._take(keys=[self._key(key_id)], args=[time.time(), KEY_PLACE_TTL_S, cap, member])
        except Exception as exc:  # Redis down: do not turn it into an outage of the API
            log.warning("long calls per key not counted (redis: %s)", exc)
            return None
        if not taken:
            raise ApiError(429, "too_many_streams", f"this key already has {cap} event streams, synchronous "
                           "calls and downloads open; wait for one to end", {"retry_after": 2, "limit": cap},
                           headers={"Retry-After": "2"})
        with self._lock:
            self._held[member] = key_id
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_loop, name="long-call-places", daemon=True)
                self._renewer.start()
        return member

    def _renew_loop(self) -> None:
        while not self._stop.wait(KEY_PLACE_TTL_S / 3):
            with self._lock:
                held = list(self._held.items())
            if not held:
                continue
            try:
                pipe = self._client().pipeline(transaction=False)
                lapse = time.time() + KEY_PLACE_TTL_S
                for member, key_id in held:
                    pipe.zadd(self._key(key_id), {member: lapse}, xx=True)
                    pipe.expire(self._key(key_id), int(KEY_PLACE_TTL_S) + 1)
                pipe.execute()
            except Exception as exc:
                log.warning("could not renew long calls' places (redis: %s)", exc)

    def close(self) -> None:
        self._stop.set()

    def release(self, key_id: str, member: str) -> None:
        with self._lock:
            self._held.pop(member, None)
        try:
            self._client().zrem(self._key(key_id), member)
        except Exception as exc:
            log.warning("could not release a long call's place (redis: %s)", exc)


class LongCalls:
    """Calls that hold a server thread until they end: event streams and synchronous generation.

    A gunicorn thread serves one call at a time; if streams took every thread, no one could even
    poll a job. Past ``limit`` of them in this process a new one gets 429 at once (the web page and
    the CLI fall back or retry), and short calls always find a thread.
    """

    lock = threading.Lock()

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self) -> LongCall:
        """A place in this process; 429 past the limit."""
        with self.lock:
            if self.held >= self.limit:
                raise ApiError(429, "too_many_streams",
                               f"this API process already serves {self.limit} event streams and synchronous "
                               "calls; retry shortly, poll instead of streaming, or use the batch API",
                               {"retry_after": 2, "limit": self.limit}, headers={"Retry-After": "2"})
            self.held += 1
        return LongCall(self)


LARGE_BODY = 1024 * 1024
BODY_WAIT_S = 30.0


class BodySlots:
    """At most ``n`` large bodies (over ``LARGE_BODY``) parsed at once in this process: a JSON
    body, or a batch input file, costs several times its size in memory while it is parsed and
    validated, so 32 clients sending 60 MiB at once must queue rather than take the memory. A
    body that waits ``BODY_WAIT_S`` for its turn gets 503 ``busy``."""

    def __init__(self, n: int) -> None:
        self._free = threading.BoundedSemaphore(max(1, n))

    @contextmanager
    def slot(self, size: int | None) -> Iterator[None]:
        if not size or size < LARGE_BODY:
            yield
            return
        if not self._free.acquire(timeout=BODY_WAIT_S):
            raise ApiError(503, "busy", "this API process is parsing other large bodies; retry shortly",
                           {"retry_after": 5}, headers={"Retry-After": "5"})
        try:
            yield
        finally:
            self._free.release()


class Limits:
    """The checks views make before accepting work."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.long_calls = LongCalls(settings.long_call_limit)
        self._redis: Any = None
        self._lock = threading.Lock()
        self.key_calls = KeyCalls(settings, self._client)
        self.bodies = BodySlots(settings.large_bodies_at_once)

    def body_slot(self, size: int | None) -> Any:
        """A turn to parse a body of ``size`` bytes (see ``BodySlots``), as a context manager."""
        return self.bodies.slot(size)

    def take_long_call(self, principal: Principal) -> LongCall:
        """A place for a call that lasts (an event stream, a synchronous call, a download): one in
        this process and one among its key's; 429 ``too_many_streams`` past either limit."""
        held = self.long_calls.take()
        if not self.settings.redis_url or not self.settings.max_long_calls_per_key:
            return held
        try:
            member = self.key_calls.take(principal.key_id)
        except BaseException:
            held.release()
            raise
        if member is not None:
            held._keys, held._key_id, held._member = self.key_calls, principal.key_id, member
        return held

    def check_auth_failures(self, client: str) -> None:
        """429 once ``client`` (an address) has sent ``auth_failures_per_minute`` keys that are not
        valid this minute: a flood of made-up keys must not become a flood of database reads."""
        limit = self.settings.auth_failures_per_minute
        if not limit or not self.settings.redis_url:
            return
        try:
            failures = int(self._client().get(self._failures_key(client)) or 0)
        except Exception as exc:
            log.warning("failed keys not counted (redis: %s)", exc)
            return
        if failures >= limit:
            retry = max(1, math.ceil(60 - time.time() % 60))
            raise ApiError(429, "rate_limited", f"more than {limit} requests with keys that are not valid this "
                           "minute from this address", {"retry_after": retry}, headers={"Retry-After": str(retry)})

    def note_auth_failure(self, client: str) -> None:
        if not self.settings.auth_failures_per_minute or not self.settings.redis_url:
            return
        try:
            pipe = self._client().pipeline()
            pipe.incr(self._failures_key(client))
            pipe.expire(self._failures_key(client), 120)
            pipe.execute()
        except Exception as exc:
            log.warning("failed key not counted (redis: %s)", exc)

    def _failures_key(self, client: str) -> str:
        return f"{self.settings.redis_prefix}authfail:{client}:{int(time.time() // 60)}"

    def _client(self) -> Any:
        with self._lock:
            if self._redis is None:
                self._redis = redis_client(self.settings.redis_url, socket_timeout=1)
            return self._redis

    def check_rate(self, principal: Principal) -> None:
        """At most ``rate_limit_per_minute`` requests per key per clock minute."""
        self._count(f"ratelimit:{principal.key_id}", self.settings.rate_limit_per_minute, "for this key")

    def check_address_rate(self, client: str) -> None:
        """At most ``tokenizer_per_minute`` calls of the public tokenizer routes per client address
        (``webapi.auth.client_address``) per clock minute: they answer anyone, and tokenizing costs."""
        self._count(f"tokenizer:{client}", self.settings.tokenizer_per_minute, "of the tokenizer routes from "
                    "this address")

    def _count(self, name: str, limit: int, whose: str) -> None:
        """Count one request against ``limit`` per clock minute under ``name``; 429 past it."""
        if not limit or not self.settings.redis_url:
            return
        now = time.time()
        window = int(now // 60)
        key = f"{self.settings.redis_prefix}{name}:{window}"
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
            raise ApiError(429, "rate_limited", f"more than {limit} requests this minute {whose}",
                           {"retry_after": retry}, headers={"Retry-After": str(retry)})

    def check_upload(self, *, session: Session, principal: Principal, size: int) -> None:
        """Refuse an upload past the owner's file quotas; call it in the transaction that stores
        the file (uploads of one owner are serialized there, so parallel ones cannot overshoot).
        Called in a read transaction with the body's size before reading it, it refuses early."""
        max_bytes, max_files = self.settings.max_file_bytes_per_owner, self.settings.max_files_per_owner
        if not max_bytes and not max_files:
            return
        serialize(session, [("files", principal.owner)])
        used, count = file_service.uploaded(session=session, owner=principal.owner)
        if max_bytes and used + size > max_bytes:
            raise ApiError(413, "storage_quota_exceeded", f"this file ({size} bytes) would take this owner's files "
                           f"past {max_bytes} bytes ({used} in use); delete files to make room",
                           {"limit_bytes": max_bytes, "used_bytes": used, "file_bytes": size})
        if max_files and count + 1 > max_files:
            raise ApiError(429, "too_many_files", f"this owner has {count} files, the most it may keep; "
                           "delete files to make room", {"limit": max_files})
