"""Reading requests: the body (bounded, its turn taken), JSON, query arguments and bodies
validated against a schema, each refused with the error a client can act on."""

from __future__ import annotations

import json
from typing import Any

from flask import current_app, g, request
from pydantic import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from core.schemas import error_details
from webapi.errors import ApiError
from webapi.services import services


def read_body() -> bytes:
    """The request body, at most ``MAX_CONTENT_LENGTH`` bytes, else 413.

    A body with a Content-Length over the limit is refused before it is read. A chunked body has
    none: werkzeug stops reading it at the limit, and one that reaches it is refused as well.
    """
    size = request.content_length
    if size and "body_slot" not in g:  # a large body waits its turn, and holds it until the answer is sent
        slot = services().limits.body_slot(size)
        slot.__enter__()
        g.body_slot = slot
    raw = request.get_data(cache=False)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit and request.content_length is None and len(raw) >= limit:
        raise RequestEntityTooLarge()
    return raw


def parse_json(raw: bytes | str) -> Any:
    """``raw`` parsed as JSON; ``ValueError`` (with a reason a client can act on) if it is not
    JSON or nests too deeply for the parser (a ``RecursionError`` would otherwise be a 500)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None


def int_arg(name: str, default: int, low: int, high: int) -> int:
    """The query argument ``name`` as an integer from ``low`` to ``high`` (``default`` if absent);
    a 422 naming it otherwise (400 on the compatibility routes). Only ASCII digits count:
    ``"²".isdigit()`` is true, and ``int("²")`` fails."""
    raw = request.args.get(name)
    if raw is None:
        return default
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 12 else low - 1
    if not low <= value <= high:
        message = f"must be an integer from {low} to {high}"
        raise ApiError(422, "invalid_request", f"'{name}' {message}",
                       [{"loc": f"query.{name}", "message": message, "type": "invalid_query"}])
    return value


def choice_arg(name: str, choices: tuple[str, ...], default: str | None = None) -> str | None:
    """The query argument ``name``, one of ``choices`` (``default`` if absent); a 422 naming it
    otherwise (400 on the compatibility routes)."""
    value = request.args.get(name)
    if value is None:
        return default
    if value not in choices:
        raise ApiError(422, "invalid_request", f"'{name}' must be one of {', '.join(choices)}",
                       [{"loc": f"query.{name}", "message": "unknown value", "type": "invalid_query"}])
    return value


def json_body() -> Any:
    """The request body parsed as JSON, whatever its content type; 400 if it is not JSON."""
    raw = read_body()
    if not raw:
        raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        return parse_json(raw)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None


def validated(model: Any, body: Any, *, loc_in_message: bool = False) -> Any:
    """``body`` (parsed JSON) validated as ``model``; a 400 ``invalid_request`` listing every
    problem otherwise, in ``details`` and (up to five) in the message, each with its place unless
    the message already starts with it. ``loc_in_message`` puts the place in even a lone problem's
    message, for error shapes that have no field of their own for it (DashScope, PAI-EAS)."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        details = error_details(exc)

        def say(d: dict[str, str]) -> str:
            return d["message"] if d["message"].startswith(d["loc"]) else f"{d['loc']}: {d['message']}"

        if len(details) == 1:
            message = say(details[0]) if loc_in_message else details[0]["message"]
        else:
            message = "; ".join(say(d) for d in details[:5]) + ("; ..." if len(details) > 5 else "")
        raise ApiError(400, "invalid_request", message, details) from None
