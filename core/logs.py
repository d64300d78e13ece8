"""Logging, configured once by each entry point (never at import).

Records carry ``job_id`` and ``request_id`` when the code logging them knows them
(``log.info(..., extra={"job_id": ...})``); the formatter shows them when present.
"""

from __future__ import annotations

import logging
import sys

_CONTEXT = ("job_id", "request_id")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={getattr(record, k)}" for k in _CONTEXT if getattr(record, k, None))
        return f"{line} [{context}]" if context else line


def configure_logging(level: str = "INFO", *, process: str = "batchgen") -> None:
    """Send records at ``level`` and above to stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO.
    # celery.app.trace logs every task at INFO: one line per request is too many for big jobs.
    for name in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "alembic",
                 "celery.app.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
