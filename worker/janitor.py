"""Periodic housekeeping in every worker process: jobs past their completion window expire.

Any number of workers may run it at once: expiring is a guarded UPDATE (only ``queued`` requests
of due jobs change), so a job is expired once whoever gets there first.
"""

from __future__ import annotations

import logging
import threading

from core import jobs as job_service
from core.db import Database

log = logging.getLogger("batchgen.janitor")


class Janitor:
    """A daemon thread that expires due jobs every ``interval_s`` seconds."""

    def __init__(self, db: Database, interval_s: float = 15.0) -> None:
        self.db, self.interval_s = db, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="janitor", daemon=True)

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

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # the database may be away; try again next round
                log.exception("housekeeping failed")
