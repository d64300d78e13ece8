"""Housekeeping in every worker process: expiry, and the reconciler that makes sure nothing is lost.

- Jobs past their completion window expire (a guarded UPDATE: once, whoever gets there first).
- The reconciler re-dispatches a model's requests that the database says should be on its queue
  (queued for longer than ``reconcile_grace_s``, or running with a lapsed lease) but that no
  Redis list and no unacked message holds: Redis restarted empty, the API died between commit and
  publish, a message was lost. It runs under a Redis lock, so one worker does it at a time, and
  compares the oldest such requests, by id, with what the model's queue and its workers hold.
  A request that is dispatched twice still runs once: claims are guarded in the database.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from datetime import timedelta
from typing import Any

from core import jobs as job_service
from core import queueing, runs
from core.db import Database
from core.settings import Settings
from core.tables import utcnow

log = logging.getLogger("batchgen.janitor")

# Requests looked at per pass, oldest first, each pass going on where the last stopped: a pass
# stays bounded however large the backlog, and what is lost longest is dispatched first.
RECONCILE_LIMIT = 10_000


class Janitor:
    """A daemon thread: expiry and reconciliation every ``interval_s`` seconds."""

    def __init__(self, db: Database, interval_s: float = 15.0, *, settings: Settings | None = None,
                 model: str | None = None, redis: Any = None) -> None:
        self.db, self.interval_s = db, interval_s
        self.settings, self.model, self.redis = settings, model, redis
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="janitor", daemon=True)
        self._cursor: tuple[Any, str] | None = None  # where the last pass stopped, oldest first

    def start(self) -> Janitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def run_once(self) -> list[str]:
        """Expire what is due now; returns the ids of the jobs expired."""
        with self.db.write() as session:
            expired = job_service.expire_due(session=session)
        for job_id in expired:
            log.info("completion window passed: requests not yet started expired", extra={"job_id": job_id})
        return expired

    def reconcile(self) -> int:
        """Re-dispatch this model's requests that no queue holds; returns how many."""
        if self.settings is None or self.redis is None or self.model is None:
            return 0
        settings = self.settings
        lock = f"{settings.redis_prefix}reconcile:{self.model}"
        if not self.redis.set(lock, "1", nx=True, ex=max(1, int(self.interval_s))):
            return 0  # another worker of this model is at it
        now = utcnow()
        with self.db.read() as session:
            candidates = runs.needing_dispatch(
                session=session, model=self.model, now=now, after=self._cursor,
                older_than=now - timedelta(seconds=settings.reconcile_grace_s), limit=RECONCILE_LIMIT)
        # The next pass goes on after these (a backlog bigger than a pass is covered over several),
        # and starts over from the oldest once it has reached the newest.
        self._cursor = (candidates[-1][2], candidates[-1][0]) if len(candidates) == RECONCILE_LIMIT else None
        if not candidates:
            return 0
        # Always compare ids with what this model's queue and the unacked messages of its workers
        # hold: counting messages instead let a backlog (of any model, stale messages included)
        # hide lost requests until it drained.
        gone = queueing.not_held(self.redis, settings, self.model, (i for i, _, _ in candidates))
        lost = [(i, p) for i, p, _ in candidates if i in gone]
        by_priority: dict[int, list[str]] = defaultdict(list)
        for request_id, priority in lost:
            by_priority[priority].append(request_id)
        for priority, ids in by_priority.items():
            queueing.publish(self.redis, settings, model=self.model, request_ids=ids, priority=priority,
                             per_message=settings.requests_per_message)
        if lost:
            log.warning("re-dispatched %d requests of %s that no queue held", len(lost), self.model)
        return len(lost)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for step in (self.run_once, self.reconcile):
                try:
                    step()
                except Exception:  # the database or Redis may be away; try again next round
                    log.exception("housekeeping failed (%s)", step.__name__)
