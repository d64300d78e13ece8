"""Celery tasks: thin. They take ids, hand them to the process's batcher and wait."""

from __future__ import annotations

from typing import Any

from celery.exceptions import Reject

from worker.batcher import Requeue


def generate(task: Any, request_ids: list[str]) -> None:
    """Run requests through this worker's batcher; returns once their results are stored.

    Returning is what acks the message (``acks_late``), so a worker that dies first leaves the
    message to be delivered again. A worker shutting down hands back requests it has not started:
    their messages go back on the queue at once.
    """
    try:
        task.app.batchgen_batcher.submit(request_ids).result()
    except Requeue:
        raise Reject("worker shutting down", requeue=True) from None
