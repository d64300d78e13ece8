"""The one place that turns exceptions into HTTP errors.

Every error leaves as ``{"error": {"code", "message", "details", "request_id"}}`` with the
``X-Request-Id`` of the exchange; 4xx are logged as warnings, 5xx with their traceback.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import quote

from flask import Flask, Response, g, jsonify, request
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from core.errors import BatchgenError
from core.ids import new_id
from core.schemas import error_details

log = logging.getLogger("batchgen.api")

# The one mapping from the service's error codes to HTTP statuses, as the native API answers them.
# Domain errors (``core.errors``) and the error codes of requests that failed (a synchronous call
# answers with its request's failure) both go through it; a code not listed is the service's own
# fault (500). ``status_for`` turns it into each interface's status.
STATUS_BY_CODE = {
    "invalid_request": 422, "model_not_found": 422, "context_length_exceeded": 422, "invalid_prompt": 422,
    "prompt_too_long": 422, "not_found": 404, "conflict": 409, "queue_full": 429, "too_many_pending": 429,
    "storage_quota_exceeded": 429, "limit_exceeded": 429, "webhook_backlog": 429, "unavailable": 503,
}
# The compatibility interfaces answer as the services they imitate do: invalid input is a 400
# (they have no 422) and an unknown model a 404.
COMPAT_INTERFACES = ("openai", "tokenizer", "dashscope", "eas")
_COMPAT_STATUS = {"model_not_found": 404}


def status_for(code: str, interface: str = "native", native: int | None = None) -> int:
    """The HTTP status of error ``code`` on ``interface`` (a blueprint name; ``native`` for the
    jobs API), given the status the native API answers it with (``native``, else the table's)."""
    status = native if native is not None else STATUS_BY_CODE.get(code, 500)
    if interface in COMPAT_INTERFACES:
        status = _COMPAT_STATUS.get(code, 400 if status == 422 else status)
    return status


_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "payload_too_large",
    414: "uri_too_long", 415: "unsupported_media_type", 417: "expectation_failed", 429: "rate_limited",
    431: "headers_too_large", 501: "not_implemented", 503: "unavailable",
}
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ApiError(Exception):
    """An HTTP error raised by a view: status, code, message and optional details."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers or {}


def attachment(filename: str) -> str:
    """A Content-Disposition header value for any file name: an ASCII ``filename`` for old
    clients and the exact name as RFC 5987 ``filename*`` (a raw non-Latin-1 name is refused by
    WSGI servers, and a quote would end the value early)."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback or 'download'}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _param(details: Any) -> str | None:
    if isinstance(details, list) and details and isinstance(details[0], dict):
        return details[0].get("loc")
    return None


def _openai_body(status: int, code: str, message: str, details: Any, request_id: str | None) -> dict[str, Any]:
    # OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
    kind = ("server_error" if status >= 500 and status != 504 else "timeout" if status == 504
            else "rate_limit_error" if status == 429 else "invalid_request_error")
    if status == 401:
        code = "invalid_api_key"
    return {"error": {"message": message, "type": kind, "param": _param(details), "code": code}}


_DASHSCOPE_CODES = {400: "InvalidParameter", 401: "InvalidApiKey", 404: "ModelNotFound", 409: "InvalidParameter",
                    413: "InvalidParameter", 429: "Throttling", 503: "ServiceUnavailable", 504: "RequestTimeOut"}


def _dashscope_body(status: int, code: str, message: str, details: Any, request_id: str | None) -> dict[str, Any]:
    # DashScope's shape: {"code", "message", "request_id"} with the HTTP status.
    return {"code": _DASHSCOPE_CODES.get(status, "InternalError"), "message": message, "request_id": request_id}


def _native_body(status: int, code: str, message: str, details: Any, request_id: str | None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details, "request_id": request_id}}


# Error shapes by blueprint; every other route (PAI-EAS among them: it has no error body of its
# own) gets the native envelope.
_SHAPES = {"openai": _openai_body, "tokenizer": _openai_body, "dashscope": _dashscope_body}


def error_body(interface: str, status: int | None, code: str, message: str, details: Any = None,
               request_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """The status and body of an error on ``interface`` (a blueprint name), given the status the
    native API answers it with (``None``: the one ``STATUS_BY_CODE`` gives ``code``). Also for errors sent as an event of a stream whose headers are
    gone (``request_id`` then comes from the caller: the request context may be over)."""
    status = status_for(code, interface, status)
    return status, _SHAPES.get(interface, _native_body)(status, code, message, details, request_id)


def wire_error(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP response, in the envelope, for what the HTTP server refuses before the app sees
    a request (gunicorn: a request line or headers past its limits, a request it cannot parse).
    The route is not known yet, so the shape is the native one."""
    code = _HTTP_CODES.get(status, "bad_request" if status < 500 else "internal_error")
    body = json.dumps(_native_body(status, code, message, None, new_id("rid"))).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def failed_call(row: Any) -> ApiError:
    """The error a synchronous call answers when its request failed (by its error code)."""
    code = row.error_code or "generation_failed"
    return ApiError(STATUS_BY_CODE.get(code, 500), code, row.error_message or "generation failed")


def error_response(status: int, code: str, message: str, details: Any = None) -> Response:
    """The error in the status and shape of the route family it happened on."""
    status, body = error_body((request.blueprint if request else None) or "native", status, code, message, details,
                              g.get("request_id"))
    response = jsonify(body)
    response.status_code = status
    return response


def init_app(app: Flask) -> None:
    """Give every exchange a request id and every error the envelope."""

    @app.before_request
    def _assign_request_id() -> None:
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _CLIENT_REQUEST_ID.match(given) else new_id("rid")
        # Ids and cursors from the URL go into queries: NUL cannot (PostgreSQL refuses it).
        if "\x00" in request.path or any("\x00" in v for v in request.args.values()):
            raise ApiError(400, "invalid_request", "the URL must not contain NUL characters")

    @app.teardown_request
    def _release_body_slot(_exc: BaseException | None) -> None:
        slot = g.pop("body_slot", None)
        if slot is not None:
            slot.__exit__(None, None, None)

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        if "request_id" in g:
            response.headers["X-Request-Id"] = g.request_id
        return response

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        response = error_response(exc.status, exc.code, exc.message, exc.details)
        log.warning("%s %s -> %s %s: %s", request.method, request.path, response.status_code, exc.code, exc.message)
        response.headers.update(exc.headers)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="batchgen"'
        return response

    @app.errorhandler(BatchgenError)
    def _domain_error(exc: BatchgenError) -> Response:
        response = error_response(STATUS_BY_CODE.get(exc.code, 500), exc.code, exc.message, exc.details)
        log.warning("%s %s -> %s %s: %s", request.method, request.path, response.status_code, exc.code, exc.message)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            response.headers["Retry-After"] = str(retry_after)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = exc.description or exc.name
        if status == 413:
            message = f"request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes"
        elif status == 404:
            message = f"no route {request.path}"
        log.warning("%s %s -> %s %s", request.method, request.path, status, code)
        response = error_response(status, code, message)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(ValidationError)
    def _invalid(exc: ValidationError) -> Response:
        # Input a view converted after validating it (e.g. an OpenAI body into native params).
        details = error_details(exc)
        log.warning("%s %s -> invalid input: %s", request.method, request.path, details[0]["message"])
        return error_response(422, "invalid_request", f"{details[0]['loc']}: {details[0]['message']}", details)

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeoutError)  # every pooled connection busy (a slow or unreachable database)
    def _database_down(exc: OperationalError | PoolTimeoutError) -> Response:
        log.error("database unavailable on %s %s: %s", request.method, request.path, getattr(exc, "orig", exc))
        response = error_response(503, "unavailable", "the database is unavailable; retry shortly")
        response.headers["Retry-After"] = "5"
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; quote the request_id if you report it")
