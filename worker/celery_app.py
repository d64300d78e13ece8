"""The worker's Celery app, built by a factory. It runs no task of its own: the model's queue is
taken by ``worker.consumer``, a bootstep of this app."""

from __future__ import annotations

from celery import Celery

from core.queueing import celery_config
from core.settings import Settings


def create_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``."""
    app = Celery("batchgen-worker", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
