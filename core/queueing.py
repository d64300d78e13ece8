"""What the API and the workers must agree on about Celery, without importing either side:
task names, message routing, broker options, and the messages themselves.

The API does not go through Celery to publish. ``send_task`` costs ~0.4 ms of CPU per message
(kombu builds a Redis client per message) and one Redis round trip each; a 50,000-request job
spent 20 s there. ``publish`` writes the same bytes kombu's Redis transport would (Celery's task
message protocol 2, base64 body, the transport's priority lists) with one pipelined ``LPUSH`` per
thousand messages. A test checks the message against Celery's own, key for key, and every end to
end test has real Celery workers consume them.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from core.settings import Settings

GENERATE_TASK = "batchgen.generate"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the API (producer) and the workers (consumers)."""
    return {
        "broker_url": settings.redis_url,
        "broker_transport_options": {
            # Every kombu key lives under this prefix: deployments (and tests) can share a Redis.
            "global_keyprefix": settings.redis_prefix,
            # A message taken by a worker that then vanished is redelivered after this long.
            "visibility_timeout": settings.visibility_timeout_s,
            # Ten priority lists per queue, consumed highest first (in Redis 0 is the highest).
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
            # A broker that vanishes without closing the connection (a partition, a dead host) is
            # noticed within seconds, and the worker reconnects when it is back.
            "socket_timeout": 10, "socket_connect_timeout": 5, "socket_keepalive": True,
            "health_check_interval": 5,
            # Look for such abandoned messages this often (kombu's default would be every 100 s).
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
        },
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # results live in the database, not a result backend
        "task_acks_late": True,  # ack only after the result is stored
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "task_default_queue": f"{settings.queue_prefix}.default",
    }


def redis_client(url: str, *, socket_timeout: float = 5.0, max_connections: int = 200) -> Any:
    """A redis-py client for a process that serves many calls at once (the API under gevent): a
    call that finds every pooled connection busy waits for one (up to ``socket_timeout``)
    instead of failing with "Too many connections" (redis-py's default pool refuses past 100)."""
    import redis

    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=socket_timeout,
                                                 socket_timeout=socket_timeout, socket_connect_timeout=1)
    return redis.Redis(connection_pool=pool)


def celery_priority(priority: int) -> int:
    """A job's priority (0-9, higher first) as a Redis message priority (0 first)."""
    return 9 - max(0, min(9, priority))


def stream_channel(settings: Settings, request_id: str) -> str:
    """The Redis pub/sub channel a worker announces one request's progress on."""
    return f"{settings.redis_prefix}stream:{request_id}"


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def task_message(request_ids: Sequence[str], *, queue: str, priority: int) -> str:
    """One ``generate`` task message for these request ids, as kombu's Redis transport stores it
    (``priority`` is the Redis priority, 0 first)."""
    task_id = str(uuid.uuid4())
    args = [list(request_ids)]
    body = base64.b64encode(json.dumps([args, {}, _EMBED]).encode()).decode()
    return json.dumps({
        "body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {
            "lang": "py", "task": GENERATE_TASK, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": repr(args), "kwargsrepr": "{}",
            "origin": _ORIGIN, "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": priority,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    })


def publish(redis: Any, settings: Settings, *, model: str, request_ids: Sequence[str], priority: int = 5,
            per_message: int = 1) -> int:
    """Put ``generate`` messages of up to ``per_message`` request ids each on the model's queue
    (``redis`` is a redis-py client); returns how many messages. Raises what redis-py raises."""
    queue = settings.queue_for(model)
    pri = celery_priority(priority)
    key = queue_keys(settings, model)[pri]
    step = max(1, per_message)
    messages = [task_message(request_ids[i:i + step], queue=queue, priority=pri)
                for i in range(0, len(request_ids), step)]
    # LPUSH of many values puts the last at the head; BRPOP takes from the tail: FIFO.
    if len(messages) <= 1000:
        redis.lpush(key, *messages)  # one round trip, no pipeline to build
    else:
        pipe = redis.pipeline(transaction=False)
        for i in range(0, len(messages), 1000):
            pipe.lpush(key, *messages[i:i + 1000])
        pipe.execute()
    return len(messages)


def _ids_of(raw: bytes | str) -> list[str]:
    message = json.loads(raw)
    return list(json.loads(base64.b64decode(message["body"]))[0][0])


def queue_keys(settings: Settings, model: str) -> list[str]:
    """The Redis lists holding a model's queue, highest priority first (kombu's naming)."""
    base = settings.redis_prefix + settings.queue_for(model)
    return [base] + [f"{base}:{step}" for step in range(1, 10)]


SCAN_CHUNK = 1000


def not_held(redis: Any, settings: Settings, model: str, wanted: Iterable[str]) -> set[str]:
    """Of the ``wanted`` request ids, those neither in the model's queue lists nor in an unacked
    message a worker holds. Redis is read a thousand messages at a time (no one command blocks it
    for long) and only until every wanted id has been seen."""
    left = set(wanted)
    for key in queue_keys(settings, model):
        start = 0
        while left:
            chunk = redis.lrange(key, start, start + SCAN_CHUNK - 1)
            for raw in chunk:
                left.difference_update(_ids_of(raw))
            if len(chunk) < SCAN_CHUNK:
                break
            start += SCAN_CHUNK
    queue = settings.queue_for(model)
    cursor = 0
    while left:
        cursor, entries = redis.hscan(settings.redis_prefix + "unacked", cursor, count=SCAN_CHUNK)
        for raw in entries.values():
            message, _exchange, routing_key = json.loads(raw)
            if routing_key == queue:
                left.difference_update(_ids_of(json.dumps(message)))
        if cursor == 0:
            break
    return left
