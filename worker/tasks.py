"""Celery tasks: thin. They take ids, hand them to the process's batcher and wait."""

from __future__ import annotations

import logging
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


class QuietHandBack(logging.Filter):
    """Celery logs every rejected task with a traceback; a request handed back at shutdown is
    expected, so its line (one per request, kept) goes without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, Reject) and exc.requeue:
            record.exc_info, record.exc_text = None, None
        return True
