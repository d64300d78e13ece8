"""Synchronous generation for the compatibility routes (OpenAI completions, DashScope, PAI-EAS).

A call becomes a one-request job at the highest priority (``Submissions.submit_call``), so it runs
on the same workers and in the same batches as batch work, ahead of it. The API subscribes to the request's Redis channel
before dispatching; the worker announces text as it is generated (``stream``) and that the result
is stored (``done``). The database stays the authority: the result is read from it, and if an
announcement is lost the process's notifier (``webapi.watch``) finds the result in the database
within a couple of seconds.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Response

from core.auth import Principal
from core.queueing import redis_client, stream_channel
from core.registry import ModelSpec
from core.schemas import JobCreate
from core.tables import JobRequest
from webapi import sse
from webapi.auth import key_still_valid
from webapi.errors import ApiError
from webapi.limits import LongCall
from webapi.watch import Notifier, Subscription

KEY_CHECK_S = 10.0


@dataclass
class Call:
    """One synchronous request under way."""

    job_id: str
    request_id: str
    model: ModelSpec
    sub: Subscription
    held: LongCall
    still_valid: Any = None  # the caller's key is still valid (a revoked key's calls end)
    finished: bool = False
    closed: bool = False


def stream_restarted() -> ApiError:
    """What a streamed answer ends with when the text it streamed will not be the stored one."""
    return ApiError(503, "stream_restarted", "the worker running this request stopped mid-answer and the "
                    "request started over; the text streamed so far is void: retry the call",
                    headers={"Retry-After": "1"})


class SyncRunner:
    """Submits one-request jobs and waits for (or streams) their result."""

    def __init__(self, services: Any) -> None:
        self.svc = services
        self._redis: Any = None
        self.notifier = Notifier(services.db, self._client)

    def _client(self) -> Any:
        if self._redis is None:
            self._redis = redis_client(self.svc.settings.redis_url)
        return self._redis

    def start(self, *, principal: Principal, spec: JobCreate, model: ModelSpec, stream: bool) -> Call:
        """Store and dispatch the request; raises ``ApiError``/domain errors for bad input."""
        svc = self.svc
        held = svc.limits.take_long_call(principal)  # 429 before anything is stored
        try:
            call = self._start(held, principal=principal, spec=spec, model=model, stream=stream)
            call.still_valid = key_still_valid()
            return call
        except BaseException:
            held.release()
            raise

    def _start(self, held: LongCall, *, principal: Principal, spec: JobCreate, model: ModelSpec,
               stream: bool) -> Call:
        subs: list[Subscription] = []

        def subscribe(request_id: str) -> None:  # before dispatch: no announcement can be missed
            subs.append(self.notifier.subscribe(request_id, stream_channel(self.svc.settings, request_id)))

        try:
            done = self.svc.submissions.submit_call(owner=principal.owner, spec=spec, model=model,
                                                    delivery="stream" if stream else "notify",
                                                    before_dispatch=subscribe)
        except BaseException:
            for sub in subs:
                self.notifier.unsubscribe(sub)
            raise
        return Call(job_id=done.job.id, request_id=done.request_ids[0], model=model, sub=subs[0], held=held)

    def close(self, call: Call) -> None:
        """Let go of a call: its place among long calls, its subscription, and the request itself
        if it has not finished (the client went away). Safe to call more than once; a streamed
        response calls it when it is closed, even if its body was never read."""
        if call.closed:
            return
        call.closed = True
        try:
            self.notifier.unsubscribe(call.sub)
            if not call.finished:
                self.svc.submissions.cancel_quietly(call.job_id)
        finally:
            call.held.release()

    def events(self, call: Call) -> Iterator[tuple[str, Any]]:
        """``("delta", text)`` while it generates, then ``("done", JobRequest)``.

        Raises ``ApiError`` 503 ``stream_restarted`` when the request starts over under another
        run (its worker died mid-answer): what was streamed is not what will be stored, and
        splicing the second run's text onto the first's would give the client neither. Closing
        the iterator early (the client went away) cancels the request if it has not started.
        """
        deadline = time.monotonic() + self.svc.settings.sync_timeout_s
        next_check = time.monotonic() + KEY_CHECK_S
        run: str | None = None
        try:
            while True:
                try:  # announcements, and the notifier's look at the database for lost ones
                    kind, event = call.sub.events.get(timeout=0.5)
                except queue.Empty:
                    kind, event = "", None
                if kind == "delta":
                    run = run or event.get("run")
                    if event.get("run") != run:
                        raise stream_restarted()
                    yield "delta", event["text"]
                    continue
                if kind == "done":
                    row = self._result(call)
                    if row is not None:
                        call.finished = True
                        yield "done", row
                        return
                if call.still_valid is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + KEY_CHECK_S
                    if not call.still_valid():
                        raise ApiError(401, "unauthorized", "the API key was revoked")
                if time.monotonic() > deadline:
                    raise ApiError(504, "timeout", f"no result within {self.svc.settings.sync_timeout_s} s; "
                                   "the request was cancelled if it had not started")
        finally:
            self.close(call)

    def wait(self, call: Call) -> JobRequest:
        """The finished request (text or error)."""
        events = self.events(call)
        try:
            for kind, value in events:
                if kind == "done":
                    return value  # type: ignore[no-any-return]
        finally:
            events.close()
        raise AssertionError("events ended without a result")

    def respond(self, call: Call, body: Iterator[str]) -> Response:
        """A streamed response of ``body`` that lets go of the call when the server closes it."""
        return sse.response(body, on_close=lambda: self.close(call))

    def _result(self, call: Call) -> JobRequest | None:
        with self.svc.db.read() as session:
            row = session.get(JobRequest, call.request_id)
            if row is None or row.status in ("queued", "running"):
                return None
            return row
