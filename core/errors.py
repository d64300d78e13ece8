"""Domain errors. The web layer maps each to one HTTP status and error code, in one place."""

from __future__ import annotations

from typing import Any


class BatchgenError(Exception):
    """Base class: ``code`` is the stable machine-readable code, ``details`` optional context."""

    code = "error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFoundError(BatchgenError):
    """The thing asked for does not exist (or is not the caller's)."""

    code = "not_found"


class InvalidRequestError(BatchgenError):
    """The input is well-formed but not acceptable; ``details`` lists each problem."""

    code = "invalid_request"


class UnknownModelError(InvalidRequestError):
    """The model name is neither a registered model nor an alias of one."""

    code = "model_not_found"


class ConflictError(BatchgenError):
    """The request cannot be done in the thing's current state (e.g. deleting a running job)."""

    code = "conflict"


class LimitError(BatchgenError):
    """A cap would be passed (queue depth, pending or stored requests); ``code`` names which,
    ``retry_after`` (seconds) says when trying again may help, if it may."""

    code = "limit_exceeded"

    def __init__(self, code: str, message: str, *, details: Any = None, retry_after: int | None = None) -> None:
        super().__init__(message, details=details)
        self.code = code
        self.retry_after = retry_after


class UnavailableError(BatchgenError):
    """A service the request needs (the queue, the database) cannot be reached now."""

    code = "unavailable"
    retry_after = 5
