"""Logging, configured once by each entry point (never at import).

Records carry ``job_id`` and ``request_id`` when the code logging them knows them
(``log.info(..., extra={"job_id": ...})``); in the API, ``request_id`` is otherwise the HTTP
request's id. ``text`` shows them at the end of the line when present; ``json`` writes one object
per line with both keys always present (null when unknown), for log shippers.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_CONTEXT = ("job_id", "request_id")


def _http_request_id() -> str | None:
    # Only where Flask is in use (the API); workers never import it for this.
    flask = sys.modules.get("flask")
    if flask is None:
        return None
    try:
        return flask.g.get("request_id") if flask.has_request_context() else None  # type: ignore[no-any-return]
    except Exception:
        return None


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _http_request_id()
        if not hasattr(record, "job_id"):
            record.job_id = None
        return True


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={getattr(record, k)}" for k in _CONTEXT if getattr(record, k, None))
        return f"{line} [{context}]" if context else line


class _Json(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "process": self.process, "pid": record.process,
            "logger": record.name, "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None), "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", *, process: str = "batchgen", fmt: str = "text") -> None:
    """Send records at ``level`` and above to stderr, one line each, as text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(_Json(process) if fmt == "json" else
                         _Text(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO; celery.app.trace logs every task (one line per request).
    for name in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "alembic",
                 "celery.app.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
