"""The worker's one writer: the claims of the next batches and the results of finished ones,
stored together.

Every batch costs the database two writes, its claim before it runs and its results after, and
each was a transaction of its own (a commit, and on SQLite an fsync), built on an ORM session.
The writer is one thread that takes every write waiting (claims, results, requests failed at
intake) and stores them in one transaction on a Core connection, so a worker pays the fixed cost
of a transaction about once per batch, not twice, and a slot's claim shares the commit of the
results stored just before it.

While the database is away, writes are retried together with growing pauses (new ones join),
each with its own patience: a claim gives up after ``CLAIM_TRIES`` (its batch is handed back),
results wait up to ``RECORD_PATIENCE_S`` (an outage passes within it; an error that does not
pass, such as a full disk, must not hold a worker's results and leases for ever) and only
``DRAIN_GRACE_S`` once the worker is shutting down. A write the database refuses for another
reason (a value it cannot hold, a bug) is retried alone, so it cannot take the others down; the
results of a run are then stored one by one, and one that cannot be stored is stored as a
``store_failed`` failure.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from core import runs
from core.db import Database, KeptConnection
from core.ids import new_id
from core.runs import Outcome

log = logging.getLogger("batchgen.writer")

CLAIM_TRIES = 8
RECORD_PATIENCE_S = 600.0
DRAIN_GRACE_S = 10.0
MAX_GROUP = 64  # writes per transaction
LINGER_S = 0.05  # writes nobody waits on gather up to this long (acks come that much later)


@dataclass(eq=False)
class Write:
    """One write waiting for the writer; ``future`` resolves with what it returned."""

    future: Future[Any] = field(default_factory=Future, init=False)
    tries: int = field(default=0, init=False)
    since: float = field(default=0.0, init=False)

    def run(self, conn: Connection) -> Any:
        raise NotImplementedError

    def patient(self, waited: float, *, halted: bool, draining_for: float | None) -> bool:
        """Whether to try again after the database failed (``tries`` failures so far)."""
        return self.tries < CLAIM_TRIES


@dataclass(eq=False)
class Claim(Write):
    ids: list[str] = field(default_factory=list)
    run_id: str = ""
    lease_s: float = 60.0
    max_attempts: int = 3
    urgent: bool = True  # a slot waits on it (a claim made ahead, while every slot is busy, is not)

    def run(self, conn: Connection) -> list[str]:
        return runs.claim(session=conn, request_ids=self.ids, run_id=self.run_id, lease_s=self.lease_s,
                          max_attempts=self.max_attempts)


@dataclass(eq=False)
class Record(Write):
    run_id: str = ""
    outcomes: list[Outcome] = field(default_factory=list)

    def run(self, conn: Connection) -> list[str]:
        return runs.record(session=conn, outcomes=self.outcomes, run_id=self.run_id)

    def patient(self, waited: float, *, halted: bool, draining_for: float | None) -> bool:
        return not halted and waited <= RECORD_PATIENCE_S and (draining_for is None or draining_for <= DRAIN_GRACE_S)


@dataclass(eq=False)
class FailQueued(Write):
    """Requests that cannot run at all (found at intake), failed before anyone claims them."""

    outcomes: list[Outcome] = field(default_factory=list)

    def run(self, conn: Connection) -> list[str]:
        return runs.fail_queued(session=conn, outcomes=self.outcomes, run_id=new_id("run"))


@dataclass(eq=False)
class Nudge(Write):
    """Nothing to store: wakes a writer that lets writes gather, because a slot now waits on a
    claim made ahead (``Writer.hurry``)."""

    def run(self, conn: Connection) -> None:
        return None


def _urgent(write: Write) -> bool:
    return isinstance(write, Claim) and write.urgent or isinstance(write, FailQueued | Nudge)


class Writer:
    """Stores a worker's writes, many per transaction."""

    def __init__(self, db: Database, *, halt: threading.Event | None = None,
                 draining_since: Callable[[], float | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db, self.clock, self.draining_since = db, clock, draining_since
        self.halt = halt or threading.Event()
        self._queue: queue.Queue[Write | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="writer", daemon=True)
        self._conn = KeptConnection(db)
        self.transactions = 0  # committed (tests, the bench)
        self.writes = 0

    def start(self) -> Writer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Store what was handed over, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, write: Write) -> Future[Any]:
        write.since = self.clock()
        self._queue.put(write)
        return write.future

    def claim(self, ids: Sequence[str], run_id: str, *, lease_s: float, max_attempts: int) -> list[str]:
        """Claim requests for a run (waits for the commit); the ids claimed."""
        write = Claim(ids=list(ids), run_id=run_id, lease_s=lease_s, max_attempts=max_attempts)
        return self.submit(write).result()  # type: ignore[no-any-return]

    def claim_ahead(self, ids: Sequence[str], run_id: str, *, lease_s: float, max_attempts: int) -> Claim:
        """Claim a batch that will run when a slot frees up: stored with other writes, unless a
        slot waits for it first (``hurry``)."""
        claim = Claim(ids=list(ids), run_id=run_id, lease_s=lease_s, max_attempts=max_attempts, urgent=False)
        self.submit(claim)
        return claim

    def hurry(self, claim: Claim) -> list[str]:
        """Wait for a claim made ahead, which a slot now needs: it is stored at once."""
        if not claim.future.done():
            claim.urgent = True
            self.submit(Nudge())
        return claim.future.result()  # type: ignore[no-any-return]

    def record(self, run_id: str, outcomes: list[Outcome]) -> Future[list[str]]:
        """Store a run's outcomes; the future resolves with the ids recorded once committed."""
        return self.submit(Record(run_id=run_id, outcomes=outcomes))

    def fail_queued(self, outcomes: list[Outcome]) -> list[str]:
        return self.submit(FailQueued(outcomes=outcomes)).result()  # type: ignore[no-any-return]

    # --- the thread ----------------------------------------------------------------------------

    def _take(self, first: Write | None = None, limit: int = MAX_GROUP) -> tuple[list[Write], bool]:
        """What is waiting (after ``first``); and whether the writer was told to stop."""
        group = [] if first is None else [first]
        while len(group) < limit:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return group, True
            group.append(nxt)
        return group, False

    def _loop(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    group, _ = self._take()
                    if group:
                        self._guarded(group)
                    return
                group, stop = self._take(first)
                # Nobody waits on results (their messages are acked a few ms later) nor on a
                # claim made ahead: while no slot waits on a claim, writes gather for up to
                # LINGER_S, so that a transaction (and its fsync) stores several batches' writes.
                deadline = self.clock() + LINGER_S
                while not stop and len(group) < MAX_GROUP and not any(_urgent(w) for w in group):
                    left = deadline - self.clock()
                    if left <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    more, stop = self._take(nxt, limit=MAX_GROUP - len(group))
                    group += more
                self._guarded(group)
                if stop:
                    group, _ = self._take()
                    if group:
                        self._guarded(group)
                    return
        finally:
            self._conn.drop()

    def _guarded(self, group: list[Write]) -> None:
        """``_store``, and whatever goes wrong with it a bug: no write is left unanswered (a slot
        would wait on its claim for ever) and the writer goes on."""
        for nudge in [w for w in group if isinstance(w, Nudge)]:  # nothing to store: done
            nudge.future.set_result(None)
        group = [w for w in group if not isinstance(w, Nudge)]
        if not group:
            return
        try:
            self._store(group)
        except BaseException as exc:  # noqa: BLE001
            log.exception("the writer failed on %d writes", len(group))
            for write in group:
                if not write.future.done():
                    write.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))

    def _store(self, group: list[Write]) -> None:
        delay = 0.25
        fresh_tried = False
        while group:
            try:
                conn = self._conn.get()
                with conn.begin():
                    results = [write.run(conn) for write in group]
            except OperationalError as exc:
                self._conn.drop()  # it may be the connection that broke: a fresh one next time
                if exc.connection_invalidated and not fresh_tried:
                    # The kept connection died while idle (the database restarted): no outage
                    # so far, try once more on a fresh one, at once, as a pool's ping would.
                    fresh_tried = True
                    continue
                group = self._after_outage(group, exc)
                if group:
                    log.warning("database unavailable (%s); retrying %d writes in %.2fs", exc.orig, len(group), delay)
                    self.halt.wait(delay) if any(isinstance(w, Record) for w in group) else time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    more, _ = self._take(limit=MAX_GROUP - len(group))  # writes that came meanwhile join
                    group += more
                continue
            except Exception as exc:
                if len(group) > 1:  # one write the database refuses must not take the others down
                    for write in group:
                        self._store([write])
                else:
                    self._refused(group[0], exc)
                return
            self.transactions += 1
            self.writes += len(group)
            for write, result in zip(group, results, strict=True):
                write.future.set_result(result)
            return

    def _after_outage(self, group: list[Write], exc: OperationalError) -> list[Write]:
        """The writes still worth trying again; the others fail with the database's error."""
        now = self.clock()
        draining = self.draining_since()
        keep = []
        for write in group:
            write.tries += 1
            if write.patient(now - write.since, halted=self.halt.is_set(),
                             draining_for=None if draining is None else now - draining):
                keep.append(write)
            else:
                write.future.set_exception(exc)
        return keep

    def _refused(self, write: Write, exc: Exception) -> None:
        if not isinstance(write, Record):
            write.future.set_exception(exc)
            return
        # One result the database refuses must not take its run down: store them one by one,
        # and one that cannot be stored as a failure saying why.
        log.exception("could not store run %s whole; storing its results one by one", write.run_id)
        recorded: list[str] = []
        for outcome in write.outcomes:
            try:
                with self.db.begin() as conn:
                    recorded += runs.record(session=conn, outcomes=[outcome], run_id=write.run_id)
            except OperationalError as outage:
                write.future.set_exception(outage)
                return
            except Exception as refused:
                log.exception("result could not be stored", extra={"request_id": outcome.request_id,
                                                                    "job_id": outcome.job_id})
                failure = Outcome(request_id=outcome.request_id, job_id=outcome.job_id, error_code="store_failed",
                                  error_message=f"the result could not be stored: {type(refused).__name__}")
                try:
                    with self.db.begin() as conn:
                        recorded += runs.record(session=conn, outcomes=[failure], run_id=write.run_id)
                except Exception as again:  # the lease lapses and the request runs again
                    write.future.set_exception(again)
                    return
        write.future.set_result(recorded)
