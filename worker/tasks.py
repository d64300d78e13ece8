"""Celery tasks: thin. They take ids, hand them to the process's batcher and wait."""

from __future__ import annotations

from typing import Any


def generate(task: Any, request_ids: list[str]) -> None:
    """Run requests through this worker's batcher; returns once their results are stored.

    Returning is what acks the message (``acks_late``), so a worker that dies first leaves the
    message to be delivered again.
    """
    task.app.batchgen_batcher.submit(request_ids).result()
