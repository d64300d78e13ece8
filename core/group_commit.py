"""Group commit: the submissions an API process receives at the same time, stored together.

A job's write transaction costs the same whether it holds one job or fifty: taking the write
lock (SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's advisory locks on the capacity keys), reading the
pending counts the caps are checked against, and a commit that reaches the disk (an fsync). Paid
per single-prompt job, that fixed cost bounded how fast a burst of them could be accepted. Here
one thread of the process stores whatever submissions are waiting, in one transaction: the caps
are read once per key and decided entry by entry in arrival order, exactly as sequential
transactions would have decided them; idempotency keys are looked up in one statement; rows go
in with one ``executemany`` per table; one commit. Each submitter waits for the commit that
holds its job, so a ``202`` still means stored and durable.

While a group commits, the next one gathers; under gevent, SQLite blocks the loop during its
commit, and the thread lets every request that became ready meanwhile reach the queue (one
``sleep(0)``) before it takes the next group.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError, IntegrityError

from core import jobs as job_service
from core.capacity import Capacity
from core.db import Database, KeptConnection
from core.jobs import NewJob

log = logging.getLogger("batchgen.submit")

MAX_GROUP = 256  # submissions per transaction (a group of big jobs is bounded by their rows)
MAX_GROUP_REQUESTS = 20_000
RETRIES = 3  # a group another process raced on an idempotency key is stored again


@dataclass(eq=False)
class Entry:
    """One submission waiting for its group's commit, and then its outcome: stored (``job`` is
    None), an earlier job with the same idempotency key (``job``), or ``error``."""

    new: NewJob
    owner: str
    model: str
    stored_quota: bool = True  # counts against the owner's stored-requests quota
    dispatch: bool = True  # handed to the publishing thread after the commit (a call publishes itself)
    idempotency_key: str | None = None
    fingerprint: str | None = None
    job: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def count(self) -> int:
        return len(self.new.requests)


class GroupCommit:
    """Stores submissions in groups; ``on_stored(entries)`` runs after each commit with the
    entries it stored (the dispatcher's hand-over: one for the whole group)."""

    def __init__(self, db: Database, capacity: Capacity,
                 on_stored: Callable[[list[Entry]], None] | None = None) -> None:
        self.db, self.capacity, self.on_stored = db, capacity, on_stored
        self._queue: queue.Queue[Entry] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._conn = KeptConnection(db)
        self.groups = 0  # transactions committed (tests, the bench)

    def store(self, entry: Entry) -> Entry:
        """Store ``entry`` with whatever else is waiting; returns once its group committed (or
        raises what refused it: ``LimitError``, ``ConflictError``, or the database's error)."""
        self._queue.put(entry)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="group-commit", daemon=True)
                self._thread.start()
        entry.done.wait()
        if entry.error is not None:
            raise entry.error
        return entry

    def _loop(self) -> None:
        while True:
            group = [self._queue.get()]
            time.sleep(0)  # let the submissions that are ready now join this group
            requests = group[0].count
            while len(group) < MAX_GROUP and requests < MAX_GROUP_REQUESTS:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                requests += group[-1].count
            try:
                self._commit(group)
            except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
                for entry in group:
                    if not entry.done.is_set():
                        entry.error = exc
                        entry.done.set()

    def _commit(self, group: list[Entry]) -> None:
        stored: list[Entry] = []
        for attempt in range(RETRIES):
            for entry in group:
                entry.job, entry.error = None, None
            stored = []
            try:
                conn = self._conn.get()
                with conn.begin():
                    stored = self._decide(conn, group, stamp=attempt == 0)
                    job_service.insert_jobs(conn, [e.new for e in stored])
                break
            except IntegrityError:
                # Another process stored a job with one of these idempotency keys after our
                # look-up: the next attempt finds it.
                if attempt == RETRIES - 1:
                    raise
            except DBAPIError as exc:
                self._conn.drop()  # it may be the connection that broke: a fresh one next time
                # A connection that died while idle (the database restarted) is not an outage:
                # try once more on a fresh one, as the pool's ping would have. One that died
                # during the commit may have committed: the answer was lost, not the jobs.
                if not exc.connection_invalidated or attempt == RETRIES - 1:
                    raise
                if stored and self._were_stored(stored):
                    break
            except Exception:
                self._conn.drop()
                raise
        self.groups += 1
        if stored and self.on_stored is not None:
            try:
                self.on_stored(stored)
            except Exception:  # stored is stored: the reconciler dispatches what was not handed over
                log.exception("handing a stored group to the dispatcher failed")
        for entry in group:
            entry.done.set()

    def _were_stored(self, entries: list[Entry]) -> bool:
        """Whether these entries' jobs are in the database (a commit whose answer was lost)."""
        ids = [e.new.id for e in entries]
        with self.db.connect() as conn:
            return len(job_service.existing_jobs(session=conn, job_ids=ids)) == len(ids)

    def close(self) -> None:
        """Let go of the kept connection (at shutdown)."""
        self._conn.drop()

    def _decide(self, session: Any, group: list[Entry], *, stamp: bool = True) -> list[Entry]:
        """Which entries of the group are stored, in arrival order; the others get their outcome
        (an earlier job with the same key, a conflict, a cap). ``stamp``: give the jobs their ids
        and times now, with the locks held: a job's id is what the capacity caps read
        submissions since (``core.capacity.PendingCounts``), so it must not predate the wait."""
        keyed = [e for e in group if e.idempotency_key is not None]
        earlier = job_service.find_idempotent_many(
            session=session, keys=[(e.owner, e.idempotency_key) for e in keyed]) if keyed else {}  # type: ignore[misc]
        ledger = self.capacity.ledger(session=session, wanted=[(e.owner, e.model, e.stored_quota) for e in group])
        if stamp:
            for entry in group:
                entry.new.stamp()
        in_group: dict[tuple[str, str], Entry] = {}
        stored = []
        for entry in group:
            if self._replays(entry, earlier, in_group):
                continue
            entry.error = ledger.take(owner=entry.owner, model=entry.model, new=entry.new.units,
                                      stored=entry.stored_quota)
            if entry.error is not None:
                continue
            if entry.idempotency_key is not None:
                in_group[(entry.owner, entry.idempotency_key)] = entry
            stored.append(entry)
        return stored

    @staticmethod
    def _replays(entry: Entry, earlier: dict[tuple[str, str], Any], in_group: dict[tuple[str, str], Entry]) -> bool:
        """Whether ``entry`` stores nothing because of its idempotency key: it names a job stored
        earlier (or earlier in this group), which it gets; or a different request (a conflict)."""
        if entry.idempotency_key is None:
            return False
        key = (entry.owner, entry.idempotency_key)
        found = earlier.get(key)
        if found is not None:
            fingerprint, job = found.request_hash, found
        elif key in in_group:
            first = in_group[key]
            fingerprint, job = first.fingerprint, first.new.row
        else:
            return False
        if fingerprint != entry.fingerprint:
            entry.error = job_service.idempotency_conflict(job.id)
        else:
            entry.job = job
        return True

