"""What the API and the workers must agree on about Celery, without importing either side:
task names, message routing and broker options."""

from __future__ import annotations

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
