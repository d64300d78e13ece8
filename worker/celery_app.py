"""The worker's Celery app, built by a factory; tasks are registered by name."""

from __future__ import annotations

from typing import Any

from celery import Celery

from core.queueing import GENERATE_TASK, celery_config
from core.settings import Settings
from worker import tasks
from worker.broker import TRANSPORT


def create_celery(settings: Settings, batcher: Any = None) -> Celery:
    """A Celery app for ``settings`` whose tasks feed ``batcher``."""
    app = Celery("batchgen-worker", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.broker_transport = TRANSPORT  # kombu's Redis transport, reusing its clients
    app.batchgen_batcher = batcher  # type: ignore[attr-defined]
    app.task(name=GENERATE_TASK, bind=True)(tasks.generate)
    return app
