"""What waiting calls wait on, shared by all of them in one API process.

An event stream or a synchronous call that each polled the database (and held a Redis
connection) of its own would cost the process a query per call twice a second: a thousand open
streams, two thousand queries a second. Here one thread per process does the looking for all of
them, and each waiting call only waits on a queue of its own (under gunicorn's gevent workers, a
greenlet that costs no thread):

- ``JobWatch``: one query every ``interval_s`` for every job someone follows (in chunks of a
  thousand ids), and one per followed owner for the all-jobs stream; each follower gets the
  changes it has not seen.
- ``Notifier``: one Redis pub/sub connection for the synchronous calls of the process (their
  streamed text and their ``done``), plus one query every ``FALLBACK_S`` for all of them in case an
  announcement was lost (the database stays the authority).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import select

from core import jobs as job_service
from core.db import Database
from core.tables import Job, JobRequest

log = logging.getLogger("batchgen.watch")

CHUNK = 1000
FALLBACK_S = 2.0
FAILED = object()  # put on a follower's queue when the database cannot be read: the stream ends


class Event(NamedTuple):
    """What a stream sends next: an event's ``name`` (``progress``, ``end``; for a synchronous
    call ``delta``, ``done``) and its data (JSON text; the announcement for a call)."""

    name: str
    data: Any


class Follower:
    """One waiting call's view: the events it has not been sent yet, on a queue of its own."""

    def __init__(self, view: Callable[[Any], dict[str, Any]]) -> None:
        self.view = view
        self.events: queue.Queue[Event | object] = queue.Queue()  # or FAILED
        self._sent: dict[str, tuple[Any, ...]] = {}

    def offer(self, jobs: list[Any], *, finished: Callable[[Any], bool] | None = None) -> None:
        """Queue a ``progress`` event for each job that changed since it was last sent (and an
        ``end`` after a job that ``finished``)."""
        for job in jobs:
            read = self.view(job)
            state = (read["status"], read["counts"], read["usage"])
            if self._sent.get(read["id"]) != state:
                self._sent[read["id"]] = state
                self.events.put(Event("progress", json.dumps(read, ensure_ascii=False, separators=(",", ":"))))
            if finished is not None and finished(read):
                self.events.put(Event("end", json.dumps(read, ensure_ascii=False, separators=(",", ":"))))


class JobWatch:
    """Looks at followed jobs (and owners) for every follower in this process."""

    def __init__(self, db: Database, view: Callable[[Any], dict[str, Any]], interval_s: float = 0.5) -> None:
        self.db, self.view, self.interval_s = db, view, interval_s
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[Follower, str | None]] = defaultdict(dict)  # job -> follower -> owner filter
        self._owners: dict[Follower, tuple[str | None, datetime]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def follow_job(self, job_id: str, owner: str | None) -> Follower:
        follower = Follower(self.view)
        with self._lock:
            self._jobs[job_id][follower] = owner
        self._start()
        return follower

    def follow_owner(self, owner: str | None, since: datetime) -> Follower:
        follower = Follower(self.view)
        with self._lock:
            self._owners[follower] = (owner, since)
        self._start()
        return follower

    def forget(self, follower: Follower) -> None:
        with self._lock:
            self._owners.pop(follower, None)
            for job_id in [j for j, f in self._jobs.items() if follower in f]:
                self._jobs[job_id].pop(follower, None)
                if not self._jobs[job_id]:
                    del self._jobs[job_id]

    def close(self) -> None:
        self._stop.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="job-watch", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                jobs = {job_id: dict(followers) for job_id, followers in self._jobs.items()}
                owners = dict(self._owners)
            if not jobs and not owners:
                continue
            try:
                self._look(jobs, owners)
            except Exception as exc:  # the database is away: the streams end, their clients reconnect
                log.warning("following jobs failed: %s", exc)
                for follower in {f for followers in jobs.values() for f in followers} | set(owners):
                    follower.events.put(FAILED)

    def _look(self, jobs: dict[str, dict[Follower, str | None]], owners: dict[Follower, tuple[str | None, datetime]]
              ) -> None:
        ids = list(jobs)
        found: dict[str, Any] = {}
        for start in range(0, len(ids), CHUNK):
            with self.db.connect() as conn:
                found.update((j.id, j) for j in conn.execute(
                    select(*job_service.JOB_FIELDS).where(Job.id.in_(ids[start:start + CHUNK]))))
        for job_id, followers in jobs.items():
            job = found.get(job_id)
            for follower, owner in followers.items():
                if job is None or (owner is not None and job.owner != owner):
                    follower.events.put(Event("end", '{"deleted": true}'))
                else:
                    follower.offer([job], finished=lambda read: read["status"] in job_service.FINISHED_JOB_STATUSES)
        by_owner: dict[str | None, list[tuple[Follower, datetime]]] = defaultdict(list)
        for follower, (owner, since) in owners.items():
            by_owner[owner].append((follower, since))
        for owner, followers in by_owner.items():
            since = min(s for _, s in followers)
            with self.db.connect() as conn:
                moving = job_service.jobs_in_motion(session=conn, owner=owner, since=since)
            for follower, own_since in followers:
                follower.offer([j for j in reversed(moving)  # oldest first, as they happened
                                if j.status in job_service.ACTIVE_JOB_STATUSES or j.created_at >= own_since
                                or (j.completed_at is not None and j.completed_at >= own_since)])


class Subscription:
    """One synchronous call's announcements, as ``Event``s on its queue."""

    def __init__(self, request_id: str, channel: str) -> None:
        self.request_id, self.channel = request_id, channel
        self.events: queue.Queue[Event] = queue.Queue()


class Notifier:
    """One Redis pub/sub connection for the synchronous calls of this process, and one database
    look every ``FALLBACK_S`` for all of them."""

    def __init__(self, db: Database, client: Callable[[], Any]) -> None:
        self.db, self._client = db, client
        self._lock = threading.Lock()
        self._subs: dict[str, Subscription] = {}  # channel -> subscription
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def subscribe(self, request_id: str, channel: str) -> Subscription:
        """Listen for a request's announcements; raises what redis-py raises if Redis is away."""
        sub = Subscription(request_id, channel)
        with self._lock:
            if self._pubsub is None:
                self._pubsub = self._client().pubsub(ignore_subscribe_messages=True)
            self._subs[channel] = sub
            pubsub = self._pubsub
        try:
            pubsub.subscribe(channel)  # before the request is dispatched: nothing is missed
        except Exception:
            with self._lock:
                self._subs.pop(channel, None)
                if self._pubsub is pubsub:
                    self._pubsub = None
            raise
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="notifier", daemon=True)
                self._thread.start()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.pop(sub.channel, None)
            pubsub = self._pubsub
        if pubsub is not None:
            try:
                pubsub.unsubscribe(sub.channel)
            except Exception as exc:  # the connection went away: the next subscribe makes a new one
                log.debug("unsubscribe failed: %s", exc)

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        next_look = time.monotonic() + FALLBACK_S
        while not self._stop.is_set():
            with self._lock:
                pubsub, idle = self._pubsub, not self._subs
            if idle:
                self._stop.wait(0.1)
                continue
            message = None
            try:
                if pubsub is None:
                    pubsub = self._reconnect()
                message = pubsub.get_message(timeout=0.25)  # blocks (and yields, under gevent)
            except Exception as exc:  # Redis went away: the database look below still finds results
                log.warning("announcements unavailable (%s); falling back to the database", exc)
                with self._lock:
                    if self._pubsub is pubsub:
                        self._pubsub = None
                self._stop.wait(0.5)  # never spin: under gevent a loop that never blocks stops the process
            if message is not None and message.get("type") == "message":
                channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
                with self._lock:
                    sub = self._subs.get(channel)
                if sub is not None:
                    event = json.loads(message["data"])
                    sub.events.put(Event(event["type"], event))
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + FALLBACK_S
                self._look()

    def _reconnect(self) -> Any:
        """A new pub/sub connection, subscribed to every channel still waited on."""
        pubsub = self._client().pubsub(ignore_subscribe_messages=True)
        with self._lock:
            channels = list(self._subs)
        if channels:
            pubsub.subscribe(*channels)
        with self._lock:
            self._pubsub = pubsub
        return pubsub

    def _look(self) -> None:
        """Results stored whose ``done`` never came (lost, or Redis away)."""
        with self._lock:
            waiting = {sub.request_id: sub for sub in self._subs.values()}
        ids = list(waiting)
        try:
            for start in range(0, len(ids), CHUNK):
                with self.db.read() as session:
                    ended = session.scalars(select(JobRequest.id).where(
                        JobRequest.id.in_(ids[start:start + CHUNK]), JobRequest.status.not_in(("queued", "running"))))
                    for request_id in ended:
                        waiting[request_id].events.put(Event("done", {"type": "done"}))
        except Exception as exc:  # the database is away: the calls wait on (until their timeout)
            log.warning("looking for stored results failed: %s", exc)
