"""What the API and the workers must agree on about Celery, without importing either side:
task names, message routing and broker options."""

from __future__ import annotations

import base64
import json
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


def celery_priority(priority: int) -> int:
    """A job's priority (0-9, higher first) as a Redis message priority (0 first)."""
    return 9 - max(0, min(9, priority))


def stream_channel(settings: Settings, request_id: str) -> str:
    """The Redis pub/sub channel a worker announces one request's progress on."""
    return f"{settings.redis_prefix}stream:{request_id}"


def publish(app: Any, settings: Settings, *, model: str, request_ids: Sequence[str], priority: int = 5) -> None:
    """Put one ``generate`` message per request on the model's queue (``app`` is a Celery app)."""
    queue = settings.queue_for(model)
    with app.producer_or_acquire() as producer:
        for request_id in request_ids:
            app.send_task(GENERATE_TASK, args=[[request_id]], queue=queue, producer=producer,
                          priority=celery_priority(priority))


def _ids_of(raw: bytes | str) -> list[str]:
    message = json.loads(raw)
    return list(json.loads(base64.b64decode(message["body"]))[0][0])


def queue_keys(settings: Settings, model: str) -> list[str]:
    """The Redis lists holding a model's queue, highest priority first (kombu's naming)."""
    base = settings.redis_prefix + settings.queue_for(model)
    return [base] + [f"{base}:{step}" for step in range(1, 10)]


def messages_held(redis: Any, settings: Settings, model: str) -> int:
    """How many messages a model's queue holds, waiting or taken by a worker and not yet acked."""
    waiting = sum(redis.llen(key) for key in queue_keys(settings, model))
    return int(waiting) + int(redis.hlen(settings.redis_prefix + "unacked"))


def ids_held(redis: Any, settings: Settings, model: str) -> set[str]:
    """Request ids in a model's queue lists and in the unacked messages workers hold."""
    held: set[str] = set()
    for key in queue_keys(settings, model):
        for raw in redis.lrange(key, 0, -1):
            held.update(_ids_of(raw))
    queue = settings.queue_for(model)
    for raw in redis.hvals(settings.redis_prefix + "unacked"):
        message, _exchange, routing_key = json.loads(raw)
        if routing_key == queue:
            held.update(_ids_of(json.dumps(message)))
    return held


def missing(candidates: Iterable[tuple[str, int]], held: set[str]) -> list[tuple[str, int]]:
    """The candidates no queue holds."""
    return [(i, p) for i, p in candidates if i not in held]
