"""Server-sent events, for every interface that streams: native job events, OpenAI chunks and
DashScope results. One encoder (``event``) and one streamed response (``response``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what ends a line in an event stream, and nothing else
KEEPALIVE = ": keep-alive\n\n"  # a comment: clients ignore it, proxies see traffic


def event(data: Any, *, name: str | None = None, id: int | str | None = None, comment: str | None = None,
          compact: bool = False) -> str:
    """One event: ``data`` as JSON (a string is sent as it is: ``[DONE]``, or JSON already
    encoded), split over ``data:`` lines if it has line breaks, so no line of it can end the
    event early or forge a field. ``compact``: no space after the colons, as DashScope writes
    them (its SDK compares ``event:error`` before stripping the value)."""
    sep = ":" if compact else ": "
    lines = []
    if id is not None:
        lines.append(f"id{sep}{id}")
    if name is not None:
        lines.append(f"event{sep}{name}")
    if comment is not None:
        lines.append(f"{sep}{comment}")
    text = data if isinstance(data, str) else json.dumps(data)
    lines.extend(f"data{sep}{line}" for line in _LINE_BREAK.split(text))
    return "\n".join(lines) + "\n\n"


def retry(ms: int) -> str:
    """The field telling a client how long to wait before it reconnects."""
    return f"retry: {ms}\n\n"


def response(body: Iterator[str], on_close: Callable[[], None]) -> Response:
    """A streamed ``text/event-stream`` response of ``body``; ``on_close`` runs when the server
    closes it, even if its body was never read (the client went away)."""
    resp = Response(body, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.call_on_close(on_close)
    return resp
