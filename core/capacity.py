"""Caps on pending and stored work, checked in the transaction that stores it.

Per model (queue depth), per owner (requests waiting or running) and per owner (requests stored).
A submission past a cap raises ``LimitError``; each interface answers it in its own shape.
"""

from __future__ import annotations

import threading
import time

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from core import jobs as job_service
from core.db import connection_of
from core.errors import BatchgenError, InvalidRequestError, LimitError
from core.ids import floor_id
from core.settings import Settings

CLOCK_MARGIN_S = 5.0


class PendingCounts:
    """Requests pending per model and per owner, as a bound that never undercounts.

    Summing the pending requests of every active job on each submission costs time that grows
    with the backlog (1.5 ms with a thousand active jobs on SQLite, far more with 50,000). So the
    sum is read at most once per ``ttl_s`` per process; in between, what any process submitted
    since that reading (jobs with newer ids: an index range scan) is added to it. Requests that
    finished since are not subtracted until the next reading: the bound errs, briefly, on the
    side of refusing. Read under ``serialize`` (no submission for the same key is in flight), it
    is exact about every submission, whichever process took it.
    """

    def __init__(self, ttl_s: float = 1.0) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], tuple[float, int, str]] = {}

    def get(self, key: tuple[str, str], session: Session | Connection) -> int:
        kind, name = key
        who = {"model": name} if kind == "model" else {"owner": name}
        now = time.monotonic()
        with self._lock:
            seen = self._values.get(key)
        if seen is not None and now - seen[0] < self.ttl_s:
            return seen[1] + job_service.submitted_since(session=session, since_id=seen[2], **who)
        # Taken before the sum, and CLOCK_MARGIN_S early (API processes on other machines may run
        # behind this clock): a job may count twice until the next reading, never zero times.
        since = floor_id("job", margin_s=CLOCK_MARGIN_S)
        read = {"model": lambda: job_service.pending_for_model(session=session, model=name),
                "owner": lambda: job_service.pending_for_owner(session=session, owner=name),
                "stored": lambda: job_service.stored_for_owner(session=session, owner=name)}[kind]
        value = read()
        with self._lock:
            self._values[key] = (now, value, since)
        return value


def serialize(session: Session | Connection, keys: list[tuple[str, str]]) -> None:
    """Hold back, until this transaction ends, every other transaction that takes one of these
    keys (on SQLite a write transaction already holds the one write lock). One statement takes
    them all, left to right in one order everywhere: no deadlock between two submitters."""
    if connection_of(session).dialect.name != "postgresql" or not keys:
        return
    ordered = sorted(set(keys))
    locks = ", ".join(f"pg_advisory_xact_lock(hashtextextended(:k{i}, 0))" for i in range(len(ordered)))
    session.execute(text(f"SELECT {locks}"),
                    {f"k{i}": f"batchgen:capacity:{kind}:{name}" for i, (kind, name) in enumerate(ordered)})


class Ledger:
    """The pending counts of one transaction's capacity keys, moved as submissions are admitted
    in order: each is decided as a transaction of its own, run in that order, would decide it."""

    def __init__(self, capacity: Capacity, counts: dict[tuple[str, str], int]) -> None:
        self.capacity, self.counts = capacity, counts

    def take(self, *, owner: str, model: str, new: int, stored: bool = True) -> BatchgenError | None:
        """Admit ``new`` request units (the counts move), or the error that refuses them: a
        ``LimitError`` while others' units fill a cap, an ``InvalidRequestError`` when the job
        alone is past it (waiting would not help)."""
        for key, cap in self.capacity.limits(owner=owner, model=model, stored=stored):
            if new > cap:
                return InvalidRequestError(
                    f"this job counts {new} request units, more than the {cap} a cap allows ({_CAP_NAMES[key[0]]}; "
                    "a request counts once per sample and per BATCHGEN_REQUEST_WEIGHT_TOKENS tokens): split it",
                    details=[{"loc": "body", "message": f"{new} request units > {cap}", "type": "job_too_large"}])
            if self.counts[key] + new > cap:
                return _refusal(key, cap, model)
        # Admitted: it counts for every key it belongs to, also one it was not held to (a
        # synchronous call is stored, and counts against the owner's quota for what follows).
        for key in (("model", model), ("owner", owner), ("stored", owner)):
            if key in self.counts:
                self.counts[key] += new
        return None


_CAP_NAMES = {"model": "BATCHGEN_MAX_PENDING_PER_MODEL", "owner": "BATCHGEN_MAX_PENDING_PER_KEY",
              "stored": "BATCHGEN_MAX_STORED_REQUESTS_PER_OWNER"}


def _refusal(key: tuple[str, str], cap: int, model: str) -> LimitError:
    # Units: a request counts once per sample and per BATCHGEN_REQUEST_WEIGHT_TOKENS tokens.
    if key[0] == "model":
        return LimitError("queue_full", f"model {model} has more than {cap} request units waiting; retry later",
                          details={"retry_after": 30}, retry_after=30)
    if key[0] == "stored":
        return LimitError("storage_quota_exceeded", f"this owner's jobs hold {cap} request units, the most it "
                          "may store; delete jobs that have ended to make room", details={"limit": cap})
    return LimitError("too_many_pending", f"this owner has more than {cap} request units waiting or running; "
                      "wait for some to finish", details={"retry_after": 60}, retry_after=60)


class Capacity:
    """The caps of ``settings``, with the pending counts they are checked against."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pending = PendingCounts()

    def limits(self, *, owner: str, model: str, stored: bool = True) -> list[tuple[tuple[str, str], int]]:
        """The (key, cap) pairs a submission is held to, in the order they are checked: the
        model's queue, the owner's pending work, the owner's stored requests (``stored=False``:
        a synchronous call, a one-request job that ends within the call, is not held to that one)."""
        limits = [(("model", model), self.settings.max_pending_per_model),
                  (("owner", owner), self.settings.max_pending_per_key),
                  (("stored", owner), self.settings.max_stored_requests_per_owner if stored else 0)]
        return [(key, cap) for key, cap in limits if cap]

    def ledger(self, *, session: Session | Connection, wanted: list[tuple[str, str, bool]]) -> Ledger:
        """The counts of every key the (owner, model, stored) submissions are held to, each read
        once. Call it in the write transaction that stores them: every other submission for the
        same model or owner waits until this transaction ends (SQLite's one write lock;
        PostgreSQL advisory locks taken in a fixed order), so parallel submissions on any number
        of API processes cannot together overshoot a cap."""
        keys = sorted({key for owner, model, stored in wanted
                       for key, _ in self.limits(owner=owner, model=model, stored=stored)})
        if keys:
            serialize(session, keys)
        return Ledger(self, {key: self._pending.get(key, session) for key in keys})

    def check(self, *, session: Session, owner: str, model: str, new: int, stored: bool = True) -> None:
        """Refuse ``new`` requests (``LimitError``) when the model's queue or the key's pending
        work is full; one submission's ``ledger`` and ``take``."""
        refusal = self.ledger(session=session, wanted=[(owner, model, stored)]).take(
            owner=owner, model=model, new=new, stored=stored)
        if refusal is not None:
            raise refusal
