"""The worker's side of the job service: what a run needs, and the claim/record contract.

A worker loads the requests it was handed (``load_work``), claims a batch of them for one run
(``claim``), renews the run's leases while it generates (``renew_leases``) and stores the run's
outcomes (``record``). A transition is a conditional UPDATE on the current status, so a request
that runs twice (a redelivered message, a second worker) is claimed and recorded once: results
are written only over a request still ``running`` under the run that claims it, and job counters
move in the same transaction by the rows that actually changed. A job ends
(``core.jobs.finalize``) in the transaction that leaves it with nothing queued or running.

Every function takes the caller's unit of work: an ORM session or a Core connection (the worker
writes on Core connections: no ORM session to build per batch).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session

from core.db import connection_of
from core.jobs import ACTIVE_JOB_STATUSES, finalize, unindexed_status
from core.schemas import ResolvedParams
from core.tables import Job, JobRequest, UTCDateTime, utcnow


@dataclass(frozen=True)
class WorkItem:
    """What a worker needs to run one request."""

    id: str
    job_id: str
    model: str
    status: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    system: str | None
    params: ResolvedParams
    priority: int = 5
    lease_until: datetime | None = None
    attempts: int = 0
    created_at: datetime | None = None
    run_id: str | None = None  # the run that last claimed it (for a retried request: the one that died)
    run_size: int | None = None  # how many requests that run held
    idx: int = 0
    continuations: list[str] | None = None  # a scoring request's
    prompt_ids: list[int] | None = None  # a prompt sent as token ids
    owner: str = ""  # its job's (owners share a priority fairly in the batcher)

    def runnable(self, now: datetime) -> bool:
        """Waiting to run, or running on a worker that stopped renewing its lease."""
        return self.status == "queued" or (
            self.status == "running" and self.lease_until is not None and self.lease_until < now)


def load_work(*, session: Session | Connection, request_ids: Sequence[str]) -> list[WorkItem]:
    """The requests with these ids (any that exist), with what is needed to run them."""
    if not request_ids:
        return []
    rows = connection_of(session).execute(_LOAD_WORK, {"ids": list(request_ids)})
    parsed: dict[str, ResolvedParams] = {}  # the requests of a job mostly share their parameters

    def params_of(raw: dict[str, Any]) -> ResolvedParams:
        key = json.dumps(raw, sort_keys=True)
        found = parsed.get(key)
        if found is None:
            found = parsed[key] = ResolvedParams.model_validate(raw)
        return found

    return [
        WorkItem(id=r.id, job_id=r.job_id, model=r.model, status=r.status, prompt=r.prompt,
                 messages=r.messages, system=r.system, params=params_of(r.params),
                 priority=r.priority, lease_until=r.lease_until, attempts=r.attempts, created_at=r.created_at,
                 run_id=r.run_id, run_size=r.run_size, idx=r.idx, continuations=r.continuations,
                 prompt_ids=r.prompt_ids, owner=r.owner)
        for r in rows
    ]


def claim(*, session: Session | Connection, request_ids: Sequence[str], run_id: str, now: datetime | None = None,
          lease_s: float = 60.0, max_attempts: int = 3) -> list[str]:
    """Move requests to ``running`` for one run; returns the ids this call claimed.

    Claimable: ``queued`` requests, and ``running`` ones whose lease has lapsed (their worker
    stopped renewing it: it died). A lapsed request that died alone (a run of one) after
    ``max_attempts`` tries is failed instead (``attempts_exhausted``): a request that keeps killing
    its workers stops there. One that died in a larger run is retaken whatever its attempts: the
    worker splits such a batch in halves until the request that kills it runs alone, so its
    batch mates do not pay for it. A request another live run holds, or one that has finished,
    is not claimed.
    """
    if not request_ids:
        return []
    now = now or utcnow()
    ids = list(request_ids)
    lease = now + timedelta(seconds=lease_s)
    conn = connection_of(session)  # Core statements, built once (see below): this runs per batch
    fresh = conn.execute(_CLAIM_FRESH, {"ids": ids, "now": now, "run": run_id, "lease": lease,
                                        "size": len(ids)}).all()
    exhausted: list[Any] = []
    retaken: list[Any] = []
    rest = list(set(ids) - {row.id for row in fresh})
    if rest:  # the usual case claims everything above; only the others can have lapsed leases
        exhausted = conn.execute(_CLAIM_EXHAUSTED, {
            "ids": rest, "now": now, "max": max_attempts,
            "msg": f"its worker stopped while running it {max_attempts} times"}).all()
        retaken = conn.execute(_CLAIM_LAPSED, {"ids": rest, "now": now, "max": max_attempts, "run": run_id,
                                               "lease": lease, "size": len(ids)}).all()
        # Already this run's: a claim tried again after its commit's answer was lost.
        retaken += conn.execute(_HELD_BY_RUN, {"ids": rest, "run": run_id}).all()

    per_job: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in fresh:
        per_job[row.job_id][0] += 1
    for row in exhausted:
        per_job[row.job_id][1] += 1
    if per_job:  # one statement for all jobs, in a fixed order (no lock-order deadlocks)
        conn.execute(_CLAIM_JOB, [
            {"jid": job_id, "started": started, "failed": failed, "now": now}
            for job_id, (started, failed) in sorted(per_job.items())])
    if exhausted:
        finalize(session, sorted({row.job_id for row in exhausted}), now)
    claimed = [row.id for row in fresh] + [row.id for row in retaken]
    if 0 < len(claimed) < len(ids):  # the run is smaller than asked: a lone survivor ran alone
        conn.execute(update(JobRequest.__table__).where(_REQUESTS.run_id == run_id).values(run_size=len(claimed)))
    return claimed


_JOBS = Job.__table__.c
_REQUESTS = JobRequest.__table__.c
_NOW = bindparam("now", type_=UTCDateTime())
_STATUS = unindexed_status()  # requests named by id are found by id, not through the status index
_LAPSED = (_STATUS == "running") & (_REQUESTS.lease_until < _NOW)
_CLAIM_FRESH = (
    update(JobRequest.__table__)
    .where(_REQUESTS.id.in_(bindparam("ids", expanding=True)), _STATUS == "queued",
           # Correlated, one index look-up per request: as "job_id IN (jobs not expired)" SQLite
           # listed every unexpired job of the database at every claim.
           select(_JOBS.id).where(_JOBS.id == _REQUESTS.job_id,
                                  or_(_JOBS.expires_at.is_(None), _JOBS.expires_at > _NOW)).exists())
    .values(status="running", attempts=_REQUESTS.attempts + 1, started_at=_NOW, run_id=bindparam("run"),
            run_size=bindparam("size"), lease_until=bindparam("lease", type_=UTCDateTime()))
    .returning(_REQUESTS.id, _REQUESTS.job_id)
)
_HELD_BY_RUN = select(_REQUESTS.id).where(_REQUESTS.id.in_(bindparam("ids", expanding=True)),
                                          _STATUS == "running", _REQUESTS.run_id == bindparam("run"))
_DIED_ALONE = or_(_REQUESTS.run_size.is_(None), _REQUESTS.run_size <= 1)
_CLAIM_EXHAUSTED = (
    update(JobRequest.__table__)
    .where(_REQUESTS.id.in_(bindparam("ids", expanding=True)), _LAPSED, _REQUESTS.attempts >= bindparam("max"),
           _DIED_ALONE)
    .values(status="failed", error_code="attempts_exhausted", completed_at=_NOW, error_message=bindparam("msg"))
    .returning(_REQUESTS.id, _REQUESTS.job_id)
)
_CLAIM_LAPSED = (
    update(JobRequest.__table__)
    .where(_REQUESTS.id.in_(bindparam("ids", expanding=True)), _LAPSED,
           or_(_REQUESTS.attempts < bindparam("max"), ~_DIED_ALONE))
    .values(attempts=_REQUESTS.attempts + 1, run_id=bindparam("run"), run_size=bindparam("size"),
            lease_until=bindparam("lease", type_=UTCDateTime()))
    .returning(_REQUESTS.id)
)
_CLAIM_JOB = (
    update(Job.__table__).where(_JOBS.id == bindparam("jid"))
    .values(queued=_JOBS.queued - bindparam("started"),
            running=_JOBS.running + bindparam("started") - bindparam("failed"),
            failed=_JOBS.failed + bindparam("failed"),
            status=case((_JOBS.status == "queued", "running"), else_=_JOBS.status),
            started_at=func.coalesce(_JOBS.started_at, _NOW))
)


def renew_leases(*, session: Session | Connection, run_ids: Sequence[str], lease_s: float, now: datetime | None = None) -> int:
    """Extend the lease of the running requests of these runs (a live worker's heartbeat)."""
    if not run_ids:
        return 0
    now = now or utcnow()
    # Rows are locked in id order, as ``record`` locks them: the heartbeat and the recorder
    # touching the same run never deadlock on PostgreSQL.
    locked = (select(JobRequest.id).where(JobRequest.run_id.in_(list(run_ids)), unindexed_status() == "running")
              .order_by(JobRequest.id))
    if connection_of(session).dialect.name == "postgresql":
        locked = locked.with_for_update()
    return session.execute(
        update(JobRequest).where(JobRequest.id.in_(locked))
        .values(lease_until=now + timedelta(seconds=lease_s))
    ).rowcount


def needing_dispatch(*, session: Session | Connection, model: str, older_than: datetime, now: datetime | None = None,
                     limit: int = 100_000, after: tuple[datetime, str] | None = None
                     ) -> list[tuple[str, int, datetime]]:
    """(request id, job priority, created_at) of a model's requests that should be on its queue,
    oldest first (after ``after``, a (created_at, id) cursor): queued ones older than
    ``older_than``, and running ones whose lease has lapsed."""
    now = now or utcnow()
    query = (select(JobRequest.id, Job.priority, JobRequest.created_at).join(Job, Job.id == JobRequest.job_id)
             .where(Job.model == model, Job.status.in_(ACTIVE_JOB_STATUSES),
                    or_((JobRequest.status == "queued") & (JobRequest.created_at < older_than),
                        (JobRequest.status == "running") & (JobRequest.lease_until < now))))
    if after is not None:
        query = query.where(or_(JobRequest.created_at > after[0],
                                (JobRequest.created_at == after[0]) & (JobRequest.id > after[1])))
    rows = session.execute(query.order_by(JobRequest.created_at, JobRequest.id).limit(limit)).all()
    return [(r.id, r.priority, r.created_at) for r in rows]


@dataclass(frozen=True)
class Outcome:
    """The result of running one request: text and counts, or an error."""

    request_id: str
    job_id: str
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    detail: dict[str, Any] | None = None  # {"logprobs": ...} or {"scores": [...]} (see JobRequest.detail)

    @property
    def ok(self) -> bool:
        return self.error_code is None


@dataclass
class _JobDelta:
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ids: list[str] = field(default_factory=list)


def storable(text: str | None) -> str | None:
    """Text every database can store: PostgreSQL text cannot hold NUL, which a model can emit
    (byte-fallback token ``<0x00>``); it becomes U+FFFD on every backend alike."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


def record(*, session: Session | Connection, outcomes: Iterable[Outcome], run_id: str, now: datetime | None = None) -> list[str]:
    """Store outcomes of the run ``run_id``; returns the ids recorded by this call.

    Only a request still ``running`` under this run takes a result: a result is recorded once even
    if the request ran twice, and a run whose claim another run took over (its lease lapsed: a
    worker cut off, or thought dead) cannot overwrite the new run's result. Counters and usage
    move only for rows that changed here.
    """
    now = now or utcnow()
    by_id = {o.request_id: o for o in outcomes}
    if not by_id:
        return []
    # Which of them still run here: in the same transaction as the writes (SQLite's write lock,
    # or PostgreSQL row locks taken in id order), so the set cannot change before they are written.
    conn = connection_of(session)
    running = _RUNNING_LOCKED if conn.dialect.name == "postgresql" else _RUNNING
    todo = [by_id[i] for i in sorted(conn.execute(running, {"ids": sorted(by_id), "run": run_id}).scalars())]
    if not todo:
        return []
    conn.execute(_RECORD_REQUEST, [
        {"rid": o.request_id, "run": run_id, "st": "succeeded" if o.ok else "failed", "tx": storable(o.text),
         "fr": o.finish_reason, "pt": o.prompt_tokens, "ct": o.completion_tokens, "ec": o.error_code,
         "em": storable(o.error_message), "dt": o.detail, "now": now}
        for o in todo])
    deltas: dict[str, _JobDelta] = defaultdict(_JobDelta)
    for o in todo:
        d = deltas[o.job_id]
        d.ids.append(o.request_id)
        d.succeeded += o.ok
        d.failed += not o.ok
        if o.ok:
            d.prompt_tokens += o.prompt_tokens or 0
            d.completion_tokens += o.completion_tokens or 0
    conn.execute(_RECORD_JOB, [
        {"jid": job_id, "done": d.succeeded + d.failed, "ok": d.succeeded, "bad": d.failed,
         "pt": d.prompt_tokens, "ct": d.completion_tokens}
        for job_id, d in sorted(deltas.items())])
    # Same transaction, rows already locked by the updates above: the last result closes the job.
    finalize(session, sorted(deltas), now)
    return [i for d in deltas.values() for i in d.ids]


_LOAD_WORK = (
    select(_REQUESTS.id, _REQUESTS.job_id, _JOBS.model, _REQUESTS.status, _REQUESTS.prompt, _REQUESTS.messages,
           _JOBS.system, _REQUESTS.params, _JOBS.priority, _REQUESTS.lease_until, _REQUESTS.attempts,
           _REQUESTS.created_at, _REQUESTS.run_id, _REQUESTS.run_size, _REQUESTS.idx, _REQUESTS.continuations,
           _REQUESTS.prompt_ids, _JOBS.owner)
    .join(Job.__table__, _JOBS.id == _REQUESTS.job_id)
    .where(_REQUESTS.id.in_(bindparam("ids", expanding=True)))
)
_RUNNING = (select(_REQUESTS.id).where(_REQUESTS.id.in_(bindparam("ids", expanding=True)),
                                      _REQUESTS.status == "running", _REQUESTS.run_id == bindparam("run"))
            .order_by(_REQUESTS.id))
_RUNNING_LOCKED = _RUNNING.with_for_update()
_RECORD_REQUEST = (
    update(JobRequest.__table__).where(_REQUESTS.id == bindparam("rid"), _REQUESTS.status == "running",
                                       _REQUESTS.run_id == bindparam("run"))
    .values(status=bindparam("st"), text=bindparam("tx"), finish_reason=bindparam("fr"),
            prompt_tokens=bindparam("pt"), completion_tokens=bindparam("ct"), error_code=bindparam("ec"),
            error_message=bindparam("em"), detail=bindparam("dt", type_=JobRequest.__table__.c.detail.type),
            completed_at=_NOW)
)
_RECORD_JOB = (
    update(Job.__table__).where(_JOBS.id == bindparam("jid"))
    .values(running=_JOBS.running - bindparam("done"), succeeded=_JOBS.succeeded + bindparam("ok"),
            failed=_JOBS.failed + bindparam("bad"), prompt_tokens=_JOBS.prompt_tokens + bindparam("pt"),
            completion_tokens=_JOBS.completion_tokens + bindparam("ct"))
)


def fail_queued(*, session: Session | Connection, outcomes: Sequence[Outcome], run_id: str) -> list[str]:
    """Fail requests that cannot run at all (found before they were claimed)."""
    claimed = set(claim(session=session, request_ids=[o.request_id for o in outcomes], run_id=run_id))
    return record(session=session, outcomes=[o for o in outcomes if o.request_id in claimed], run_id=run_id)
