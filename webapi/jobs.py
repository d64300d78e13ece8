"""The native jobs API: submit, list, read, page or download results, follow, cancel, delete.

Every route acts for the authenticated caller: another owner's job is answered 404, as if it did
not exist; an admin key reaches every job.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, jsonify, request

from core import jobs as job_service
from core.schemas import JOB_STATUSES, REQUEST_STATUSES, ResultRead
from webapi import sse
from webapi.auth import CACHE_SECONDS, current_principal, key_still_valid
from webapi.errors import ApiError, attachment
from webapi.parsing import choice_arg, int_arg, json_body
from webapi.services import services
from webapi.views import job_view, result_view
from webapi.watch import FAILED, Follower

log = logging.getLogger("batchgen.api")
bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

MAX_PAGE = 1000
STREAM_CHUNK = 500
EVENTS_INTERVAL_S = 0.5
KEEPALIVE_S = 5.0  # also how soon a stream whose client went away notices and frees its thread
# Set when this server process is stopping (see webapi/gunicorn_conf.py): open streams end cleanly.
STOPPING = threading.Event()
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@bp.post("")
def create_job() -> tuple[Response, int, dict[str, str]]:
    """Validate and store a job in one transaction, dispatch its requests, answer 202.

    With an ``Idempotency-Key`` header, a retry of the same request returns the job it created
    (200); the same key with a different request is a 409.
    """
    principal = current_principal()
    body = json_body()
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise ApiError(422, "invalid_request", "Idempotency-Key must be 1 to 255 visible ASCII characters",
                       [{"loc": "header.Idempotency-Key", "message": "invalid", "type": "invalid_header"}])
    done = services().submissions.submit_job(owner=principal.owner, body=body, idempotency_key=key)
    location = f"{request.script_root}/v1/jobs/{done.job.id}"  # url_for("jobs.get_job"), without its cost
    headers = {"Location": location}
    if done.replayed:
        headers["Idempotent-Replayed"] = "true"
    body = job_view(done.job, created=not done.replayed)
    return jsonify(body), 200 if done.replayed else 202, headers


@bp.get("")
def list_jobs() -> dict[str, Any]:
    """The caller's jobs, newest first: ``after`` (a job id), ``limit``, ``status``."""
    limit = int_arg("limit", 20, 1, 100)
    status = choice_arg("status", JOB_STATUSES)
    with services().db.connect() as conn:
        rows, has_more = job_service.list_jobs(session=conn, owner=current_principal().owner_filter,
                                               after=request.args.get("after"), limit=limit, status=status)
    data = [job_view(j) for j in rows]  # as core.schemas.JobPage
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def event_stream(follower: Follower, max_s: float) -> Response:
    """Server-sent events of ``follower`` (``webapi.watch``: one thread of the process looks at
    the database for every open stream), a comment every ``KEEPALIVE_S`` on a quiet connection;
    the stream ends after an ``end`` event, after ``max_s`` seconds, when the caller's key is
    revoked (seen within the key cache's ``CACHE_SECONDS``), when the database cannot be read, or
    when this process stops; clients reconnect. Waiting costs no thread under gevent."""
    svc = services()
    try:
        held = svc.limits.take_long_call(current_principal())  # 429 past the process's or the key's limit
    except BaseException:
        svc.watch.forget(follower)
        raise
    still_valid = key_still_valid()

    def events() -> Iterator[str]:
        try:
            yield sse.retry(2000)
            opened = quiet_since = checked = time.monotonic()
            while time.monotonic() - opened < max_s and not STOPPING.is_set():
                if time.monotonic() - checked >= CACHE_SECONDS:
                    checked = time.monotonic()
                    try:
                        if not still_valid():
                            log.info("event stream ended: its key was revoked")
                            return
                    except Exception as exc:  # the database is away: end it; the client reconnects
                        log.warning("event stream ended: %s", exc)
                        return
                try:
                    item = follower.events.get(timeout=EVENTS_INTERVAL_S)
                except queue.Empty:
                    if time.monotonic() - quiet_since > KEEPALIVE_S:
                        quiet_since = time.monotonic()
                        yield sse.KEEPALIVE
                    continue
                if item is FAILED:
                    log.warning("event stream ended: the database cannot be read")
                    return
                name, data = item
                yield sse.event(data, name=name)
                quiet_since = time.monotonic()
                if name == "end":
                    return
        finally:
            svc.watch.forget(follower)

    return sse.response(events(), on_close=held.release)


@bp.get("/events")
def all_job_events() -> Response:
    """Server-sent events for all the caller's jobs: ``progress`` with a job whenever one is
    submitted or changes status, counts or usage. First the jobs that are active or ended in the
    last minute; then changes, until the client goes away or ``stream_max_s`` has passed
    (clients reconnect, as the web page does)."""
    svc = services()
    owner = current_principal().owner_filter
    since = job_service.utcnow() - timedelta(minutes=1)
    with svc.db.read() as session:  # what there is now goes out at once
        moving = job_service.jobs_in_motion(session=session, owner=owner, since=since)
        follower = svc.watch.follow_owner(owner, since)
        follower.offer(list(reversed(moving)))
    return event_stream(follower, max_s=svc.settings.stream_max_s)


@bp.get("/<job_id>")
def get_job(job_id: str) -> dict[str, Any]:
    """Status, counts, usage, timestamps and, while it runs, an estimated completion time."""
    with services().db.connect() as conn:
        job = job_service.get_job(session=conn, job_id=job_id, owner=current_principal().owner_filter)
    return job_view(job)


@bp.get("/<job_id>/results")
def list_results(job_id: str) -> dict[str, Any]:
    """A page of results in request order: ``after`` (a request id), ``limit``, ``status``."""
    limit = int_arg("limit", 100, 1, MAX_PAGE)
    status = choice_arg("status", REQUEST_STATUSES)
    with services().db.connect() as conn:
        rows, has_more = job_service.list_results(session=conn, job_id=job_id,
                                                  owner=current_principal().owner_filter,
                                                  after=request.args.get("after"), limit=limit, status=status)
    data = [result_view(r) for r in rows]  # as core.schemas.ResultPage
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def result_line(row: Any) -> str:
    """One line of a results download: ``ResultRead`` as compact JSON. A result with log
    probabilities or scores goes through the model, which writes an infinite value as null."""
    view = result_view(row)
    if row.detail:
        return ResultRead.model_validate(view).model_dump_json() + "\n"
    return json.dumps(view, ensure_ascii=False, separators=(",", ":")) + "\n"


@bp.get("/<job_id>/results.jsonl")
def download_results(job_id: str) -> Response:
    """Every result as one JSON line each, streamed a chunk at a time (``status`` filters)."""
    status = choice_arg("status", REQUEST_STATUSES)
    svc = services()
    with svc.db.connect() as conn:
        job_service.get_job(session=conn, job_id=job_id, owner=current_principal().owner_filter)
    held = svc.limits.take_long_call(current_principal())  # a download lasts: it counts among long calls
    still_valid = key_still_valid()

    def lines() -> Iterator[str]:
        after = -1
        checked = time.monotonic()
        while True:  # a short read per chunk: no transaction is held while the client reads
            if time.monotonic() - checked >= CACHE_SECONDS:
                checked = time.monotonic()
                if not still_valid():
                    log.info("download ended: its key was revoked", extra={"job_id": job_id})
                    return
            with svc.db.connect() as conn:
                rows = job_service.results_after(session=conn, job_id=job_id, after_idx=after,
                                                 limit=STREAM_CHUNK, status=status)
            chunk = "".join(result_line(r) for r in rows)
            if not rows:
                return
            yield chunk
            after = rows[-1].idx

    response = Response(lines(), mimetype="application/jsonl",
                        headers={"Content-Disposition": attachment(f"{job_id}.jsonl")})
    response.call_on_close(held.release)
    return response


@bp.get("/<job_id>/events")
def job_events(job_id: str) -> Response:
    """Server-sent events: a ``progress`` event whenever the job changes, ``end`` when it ends."""
    svc = services()
    owner = current_principal().owner_filter
    with svc.db.read() as session:
        job = job_service.get_job(session=session, job_id=job_id, owner=owner)
        follower = svc.watch.follow_job(job_id, owner)
        follower.offer([job], finished=lambda read: read["status"] in job_service.FINISHED_JOB_STATUSES)
    return event_stream(follower, max_s=svc.settings.stream_max_s)


@bp.post("/<job_id>/cancel")
def cancel_job(job_id: str) -> dict[str, Any]:
    """Cancel what has not started; running requests finish and are kept."""
    with services().db.write() as session:
        job = job_service.cancel_job(session=session, job_id=job_id, owner=current_principal().owner_filter)
    log.info("job cancel requested", extra={"job_id": job_id})
    return job_view(job)


@bp.delete("/<job_id>")
def delete_job(job_id: str) -> dict[str, Any]:
    """Remove a job that has ended, with all its requests and results."""
    with services().db.write() as session:
        job_service.delete_job(session=session, job_id=job_id, owner=current_principal().owner_filter)
    log.info("job deleted", extra={"job_id": job_id})
    return {"id": job_id, "object": "job.deleted", "deleted": True}

