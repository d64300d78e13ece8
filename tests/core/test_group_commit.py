"""Group commit: concurrent submissions stored in one transaction, each decided as sequential
transactions in arrival order would decide it (caps, idempotency keys), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select, text

from core import jobs
from core.capacity import Capacity
from core.db import Database
from core.errors import ConflictError, LimitError
from core.group_commit import Entry, GroupCommit
from core.jobs import Limits
from core.registry import ModelSpec
from core.schemas import JobCreate
from core.settings import Settings
from core.tables import Job, JobRequest

MODEL = ModelSpec(name="m", path="m", chat=False, context_length=256)


@pytest.fixture
def db(database_url: str):  # type: ignore[no-untyped-def]
    database = Database(database_url)
    yield database
    database.dispose()


def entry(n: int, *, owner: str = "alice", key: str | None = None, body: str = "same") -> Entry:
    spec = JobCreate.model_validate({"model": "m", "prompts": [f"{body} {i}" for i in range(n)]})
    fingerprint = jobs.request_fingerprint({"body": body, "n": n}) if key else None
    new = jobs.prepare_job(spec=spec, model=MODEL, limits=Limits(max_requests=100, max_prompt_chars=100),
                           owner=owner, idempotency_key=key, fingerprint=fingerprint)
    return Entry(new, owner=owner, model="m", idempotency_key=key, fingerprint=fingerprint)


class Held:
    """Another process's transaction holding the lock every submission takes (SQLite's write
    lock; on PostgreSQL the capacity key's advisory lock), so that submissions queue up behind
    it and the next group holds them all."""

    def __init__(self, db: Database, owner: str = "alice") -> None:
        self.db, self.owner = db, owner

    def __enter__(self) -> Held:
        self._cm = self.db.write()
        session = self._cm.__enter__()
        session.connection()  # SQLite: BEGIN IMMEDIATE, the write lock, taken now
        if self.db.dialect == "postgresql":  # the model's key: every submission for it waits
            for key in ("model:m", f"owner:{self.owner}"):
                session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                                {"k": f"batchgen:capacity:{key}"})
        return self

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(None, None, None)


def store_in_order(gc: GroupCommit, entries: list[Entry]) -> list[Entry | BaseException]:
    """Submit from a thread each, one after the other (arrival order is list order); wait for all."""
    outcomes: list[Entry | BaseException] = [None] * len(entries)  # type: ignore[list-item]

    def run(i: int) -> None:
        try:
            outcomes[i] = gc.store(entries[i])
        except BaseException as exc:  # noqa: BLE001
            outcomes[i] = exc

    threads = []
    for i in range(len(entries)):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    return outcomes


def test_a_group_decides_caps_in_arrival_order_as_sequential_transactions_would(db: Database):
    gc = GroupCommit(db, Capacity(Settings.model_validate({"max_pending_per_key": 25, "database_url": db.url})))
    first = entry(1)
    with Held(db):
        threading.Thread(target=gc.store, args=(first,)).start()  # a group of one, waiting for the lock
        time.sleep(0.3)
        rest = [entry(10), entry(10), entry(10), entry(3)]
        threads_done = threading.Event()
        result: list[list[Entry | BaseException]] = []
        threading.Thread(target=lambda: (result.append(store_in_order(gc, rest)), threads_done.set())).start()
        time.sleep(0.5)  # all four queued behind the first group
    assert threads_done.wait(30) and first.done.wait(5)
    stored, second, refused, last = result[0]
    assert isinstance(stored, Entry) and isinstance(second, Entry) and isinstance(last, Entry)
    assert isinstance(refused, LimitError) and refused.code == "too_many_pending"  # 1 + 10 + 10 + 10 > 25
    assert gc.groups == 2  # the first alone, then the four together
    with db.read() as s:
        assert s.scalar(select(func.sum(Job.queued))) == 1 + 10 + 10 + 3  # 24: the last fitted
        assert s.scalar(select(func.count()).select_from(JobRequest)) == 24


def test_idempotency_keys_inside_one_group(db: Database):
    gc = GroupCommit(db, Capacity(Settings.model_validate({"max_pending_per_key": 1000, "database_url": db.url})))
    a, b, c = entry(2, key="k1"), entry(2, key="k1"), entry(2, key="k1", body="other")
    d = entry(1, key="k2")
    with Held(db):
        done = threading.Event()
        result: list[list[Entry | BaseException]] = []
        threading.Thread(target=lambda: (result.append(store_in_order(gc, [a, b, c, d])), done.set())).start()
        time.sleep(0.5)
    assert done.wait(30)
    first, replay, conflict, other = result[0]
    assert isinstance(first, Entry) and first.job is None  # stored
    assert isinstance(replay, Entry) and replay.job is not None and replay.job.id == a.new.id
    assert isinstance(conflict, ConflictError)
    assert isinstance(other, Entry) and other.job is None
    # A later submission with the same key, in a group of its own, finds the stored job.
    again = gc.store(entry(2, key="k1"))
    assert again.job.id == a.new.id
    with db.read() as s:
        assert sorted(s.scalars(select(Job.idempotency_key))) == ["k1", "k2"]


def test_a_call_in_a_group_counts_against_the_stored_quota_of_what_follows_it(db: Database):
    """A synchronous call is not held to the owner's stored-requests quota, but it is stored: a
    job after it in the same group is decided as it would be in a transaction of its own."""
    gc = GroupCommit(db, Capacity(Settings.model_validate({"max_stored_requests_per_owner": 10,
                                                           "database_url": db.url})))
    first = entry(1, owner="bob")  # a group of its own, waiting for the lock while the next two queue
    call = entry(1)
    call.stored_quota = False
    job = entry(10)
    with Held(db):
        threading.Thread(target=gc.store, args=(first,)).start()
        time.sleep(0.3)
        done = threading.Event()
        result: list[list[Entry | BaseException]] = []
        threading.Thread(target=lambda: (result.append(store_in_order(gc, [call, job])), done.set())).start()
        time.sleep(0.3)
    assert done.wait(30) and first.done.wait(5)
    assert gc.groups == 2
    stored_call, refused = result[0]
    assert isinstance(stored_call, Entry)
    assert isinstance(refused, LimitError) and refused.code == "storage_quota_exceeded"
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.owner == "alice")) == 1
