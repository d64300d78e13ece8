"""Dynamic batching: many small requests from many jobs -> full CTranslate2 batches.

The consumer (``worker.consumer``) hands each message's request ids to ``Batcher.submit``; the
future it gets back resolves once every one of them is stored, and only then is the message
acked.

Threads inside one worker process::

    consumer --submit--> intake --plan--> scheduler --batch--> slot (claim, generate)
                                                                 |      ^
        futures resolved (acks) <------- writer (claims, results) <-----+

- intake: loads submitted requests from the database in bulk, drops those that already ran,
  tokenizes the rest, and fails alone the ones that cannot run (too long, bad template).
- scheduler: picks the next batch when a generation slot is free (``worker.scheduling``: groups
  by sampling settings and prompt length, within the measured limits; a batch starts when one
  is full, when the device is idle and nothing else is arriving, or when the oldest request has
  waited long enough; the largest goes first).
- slots: ``slots`` batches generate at once (on CPU one per CTranslate2 replica,
  ``inter_threads``); while they run, the next batch is being formed.
- writer (``worker.writer``): claims of the next batches and results of finished ones, many per
  transaction, retried while the database is unreachable; a run's futures resolve once its
  results are stored.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

from sqlalchemy.exc import OperationalError

from core import runs
from core.db import Database
from core.ids import new_id
from core.metrics import Metrics
from core.runs import Outcome, WorkItem
from core.tables import utcnow
from worker.scheduling import (
    BatchPolicy,
    Pending,
    Plan,
    group_shared_prefixes,
    isolate,
    select_batch,
)
from worker.tuning import OnlineTuner
from worker.writer import Claim, Writer

log = logging.getLogger("batchgen.batcher")


class Requeue(Exception):  # noqa: N818 - it is an instruction, not an error
    """The request was not run here and goes back to the queue (the worker is shutting down)."""


class Runner(Protocol):
    def encode(self, item: WorkItem) -> Any: ...
    def encode_many(self, items: Sequence[WorkItem]) -> list[Any]: ...
    def generate(self, batch: Sequence[Any], on_delta: Callable[[str, str], None] | None = None) -> list[Outcome]: ...


class Announcer(Protocol):
    """Where progress of synchronous requests goes (``worker.streaming.Publisher``)."""

    def delta(self, request_id: str, text: str, run_id: str) -> None: ...
    def done(self, request_id: str) -> None: ...


@dataclass
class _Submission:
    future: Future[None]
    remaining: int


class Finished(NamedTuple):
    """A run's outcomes, on their way to the recorder: ``ids`` are every request of the run,
    ``notify`` those whose callers wait on an announcement."""

    run_id: str
    outcomes: list[Outcome]
    ids: list[str]
    notify: list[str]


@dataclass
class BatchStats:
    """What the batcher did, for logs, tests and the benchmark."""

    batches: int = 0
    requests: int = 0
    sizes: list[int] = field(default_factory=list)


class Batcher:
    """Batches requests of every job for one model on one device."""

    def __init__(self, *, runner: Runner, db: Database, policy: BatchPolicy,
                 clock: Callable[[], float] = time.monotonic, announcer: Announcer | None = None,
                 lease_s: float = 60.0, max_attempts: int = 3, metrics: Metrics | None = None,
                 tuner: OnlineTuner | None = None, labels: dict[str, str] | None = None) -> None:
        self.runner, self.db, self.policy, self.clock = runner, db, policy, clock
        self.metrics = metrics or Metrics()
        self.tuner = tuner
        self.labels = labels or {}
        self._publish_limits()
        self.announcer = announcer
        self.lease_s, self.max_attempts = lease_s, max_attempts
        self._active_runs: set[str] = set()  # runs generating now: their leases are renewed
        self._created: dict[str, Any] = {}  # request id -> submission time, for time-to-result
        self.stats = BatchStats()
        self._inbox: queue.Queue[tuple[list[str], _Submission] | None] = queue.Queue()
        self._cond = threading.Condition()
        self._plan = Plan()  # what waits to run
        # The next batch, claimed ahead while every slot was busy: (batch, reason, run id, claim).
        self._ready: tuple[list[Pending], str, str, Claim, int] | None = None
        self.tokenizer_s = 0.0  # CPU the intake spent encoding prompts
        self._waiters: dict[str, list[_Submission]] = defaultdict(list)
        self._busy_slots = 0
        self._calls = 0  # generate calls made: tags what each one streams
        self._exclusive = False  # a retried request runs with nothing beside it
        self._unrecorded = 0  # runs whose outcomes wait for the recorder
        self._intake_busy = False
        self._arrivals: deque[float] = deque()  # arrival times within the burst window
        self._stopping = False
        self._slots = ThreadPoolExecutor(max_workers=policy.slots, thread_name_prefix="slot")
        self._draining = False  # shutting down: finish what runs, hand back what waits
        self._draining_since: float | None = None
        self._halt = threading.Event()  # wakes the heartbeat at stop
        self.writer = Writer(db, halt=self._halt, draining_since=lambda: self._draining_since, clock=clock)
        self._threads = [
            threading.Thread(target=self._intake_loop, name="intake", daemon=True),
            threading.Thread(target=self._schedule_loop, name="scheduler", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
        ]

    # --- public ----------------------------------------------------------------------------

    def start(self) -> Batcher:
        self.writer.start()
        for thread in self._threads:
            thread.start()
        return self

    def submit(self, request_ids: Sequence[str]) -> Future[None]:
        """Run these requests; the future resolves once each one's outcome is stored."""
        future: Future[None] = Future()
        ids = list(dict.fromkeys(request_ids))
        if not ids:
            future.set_result(None)
            return future
        with self._cond:  # flag and put under one lock: intake never reads a stale "idle"
            if self._stopping:  # its message goes back to the queue for another worker
                future.set_exception(Requeue("the batcher is stopping"))
                return future
            self._intake_busy = True
            self._inbox.put((ids, _Submission(future, len(ids))))
        return future

    def hand_back(self) -> None:
        """Shutting down: batches that run finish and are stored; requests still waiting here are
        handed back (their tasks raise ``Requeue``, so Celery puts their messages back)."""
        with self._cond:
            self._draining = True
            self._draining_since = self.clock()
            waiting = [p.enc.item.id for p in self._plan.clear()]
            self._cond.notify_all()
        self._fail_futures(waiting, Requeue("the worker is shutting down"))
        log.info("shutting down: %d waiting requests handed back to the queue", len(waiting))

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what was submitted, then stop the threads."""
        deadline = self.clock() + timeout
        with self._cond:
            while (self._plan or self._busy_slots or self._unrecorded or self._ready is not None
                   or not self._inbox.empty()
                   or self._intake_busy) and self.clock() < deadline:
                self._cond.wait(0.05)
            self._stopping = True
            self._cond.notify_all()
        self._halt.set()
        self._inbox.put(None)
        self._slots.shutdown(wait=True)
        self.writer.stop(max(0.0, deadline - self.clock()))
        for thread in self._threads:
            thread.join(max(0.0, deadline - self.clock()))

    # --- intake ----------------------------------------------------------------------------

    def _intake_loop(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch = [first]
            while True:  # take everything that has arrived: one database round trip for all
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._inbox.put(None)
                    break
                batch.append(nxt)
            try:
                wanted = self._register(batch)
                self._take_in_retrying(wanted)
            finally:
                with self._cond:
                    self._intake_busy = not self._inbox.empty()
                    self._cond.notify_all()

    def _register(self, submissions: list[tuple[list[str], _Submission]]) -> list[str]:
        """Attach each message's future to its requests; returns the requests to look up.

        A request this process already holds (waiting, generating, or waiting to be stored) was
        delivered again (kombu restores a message unacked for longer than the visibility
        timeout, even while its worker lives): the new message waits for the same stored result,
        and nothing settles the first one early."""
        with self._cond:
            held_here = {i for ids, _ in submissions for i in ids if self._waiters.get(i)}
            for ids, sub in submissions:
                for request_id in ids:
                    self._waiters[request_id].append(sub)
        if held_here:
            log.info("%d requests delivered again while this worker holds them; both messages are acked "
                     "once their results are stored", len(held_here))
        return [i for i in dict.fromkeys(i for ids, _ in submissions for i in ids) if i not in held_here]

    def _take_in_retrying(self, wanted: list[str]) -> None:
        """``_take_in``, waiting out a database outage with growing pauses: handing the messages
        back at once would have the broker deliver them again at once, in a hot loop."""
        delay = 0.25
        while wanted:
            try:
                self._take_in(wanted)
                return
            except OperationalError as exc:
                if self._draining or self._halt.is_set():
                    self._fail_futures(wanted, Requeue("the database is unavailable and the worker is stopping"))
                    return
                log.warning("intake: database unavailable (%s); retrying in %.2fs", exc.orig, delay)
                self._halt.wait(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("intake failed; handing the requests back to the queue")
                self._fail_futures(wanted, Requeue("intake failed"))
                return

    def _encode(self, items: list[WorkItem]) -> list[Any]:
        """Each request encoded, or the exception that keeps it from running: the round in one
        tokenizer call; should that fail, each alone, so that only the culprit fails."""
        try:
            return self.runner.encode_many(items)
        except Exception:
            log.exception("encoding a round of %d requests failed; encoding them one by one", len(items))
        encoded: list[Any] = []
        for item in items:
            try:
                encoded.append(self.runner.encode(item))
            except Exception as exc:
                encoded.append(exc)
        return encoded

    def _take_in(self, wanted: list[str]) -> None:
        with self.db.connect() as conn:
            items = {w.id: w for w in runs.load_work(session=conn, request_ids=wanted)}
        settled: list[str] = []
        failures: list[Outcome] = []
        now = self.clock()
        fresh: list[Pending] = []
        moment = utcnow()
        runnable = []
        for request_id in wanted:
            item = items.get(request_id)
            if item is None or not item.runnable(moment):
                # Unknown, finished, or running on a live worker elsewhere: nothing to run here.
                settled.append(request_id)
            else:
                runnable.append(item)
        started = time.thread_time()
        encoded = self._encode(runnable)
        self.tokenizer_s += time.thread_time() - started  # this thread's CPU (worker/cpu.py)
        for item, enc in zip(runnable, encoded, strict=True):
            if isinstance(enc, Exception):
                code = getattr(enc, "code", "invalid_prompt")
                failures.append(Outcome(request_id=item.id, job_id=item.job_id, error_code=code,
                                        error_message=getattr(enc, "message", str(enc))))
                continue
            cost = (enc.length + item.params.max_new_tokens) * item.params.samples  # each sample is a row
            key = item.params.sampling_key()  # (a retried one, attempts > 0, runs alone: see _schedule_loop)
            fresh.append(Pending(enc, key, enc.length, cost, now, item.priority,
                                 interactive=item.params.delivery != "store", retried=item.attempts > 0,
                                 owner=item.owner))
        with self._cond:
            waiting = dict(self._plan.groups)
            group_shared_prefixes(fresh, waiting)
        if failures:
            self.writer.fail_queued(failures)
            settled.extend(o.request_id for o in failures)
            self._announce_done([o.request_id for o in failures if items[o.request_id].params.delivery != "store"])
        with self._cond:  # draining is read under the same lock hand_back sets it: nothing slips in after
            draining = self._draining
            if not draining:
                for p in fresh:
                    self._plan.add(p)
                    if p.enc.item.created_at is not None:
                        self._created[p.enc.item.id] = p.enc.item.created_at
                if fresh:  # one arrival per intake round: what came together has fully arrived
                    self._arrivals.append(now)
                self._cond.notify_all()
        if draining:  # arrived during shutdown: straight back to the queue
            self._fail_futures([p.enc.item.id for p in fresh], Requeue("the worker is shutting down"))
        self._settle(settled)

    # --- scheduling ------------------------------------------------------------------------

    def _schedule_loop(self) -> None:
        while True:
            try:
                self._schedule()
                return
            except Exception:  # a bug must not stop this worker's scheduling silently
                log.exception("the scheduler failed; it starts again")
                time.sleep(0.1)

    def _schedule(self) -> None:
        with self._cond:
            while not self._stopping:
                if self._exclusive:
                    if self._busy_slots or self._unrecorded:
                        self._cond.wait()
                        continue
                    self._exclusive = False  # the retried request ran and its outcome is stored
                if self._ready is not None and self._busy_slots < self.policy.slots:
                    batch, reason, run_id, claim, cut_at = self._ready  # claimed already: runs even when draining
                    self._ready = None
                    self._busy_slots += 1
                    self._slots.submit(self._run, batch, reason, run_id, claim, cut_at)
                    continue
                if self._draining or not self._plan:
                    self._cond.wait()
                    continue
                if self._busy_slots >= self.policy.slots:
                    if self._ready is None and not self._plan.retried:
                        # Every slot is busy and a full batch waits: claim it now, so that its
                        # claim is stored with other writes and the slot that frees up starts it.
                        batch, _, reason = self._select()
                        if batch is not None and reason == "full":
                            self._claim_ahead(batch, reason)
                            continue
                    self._cond.wait()
                    continue
                if self._plan.retried:
                    # Requests whose worker died running them may hold what killed that worker.
                    # They run with nothing else in flight in this process (nothing generating,
                    # no outcome waiting to be stored) from their start until their outcomes are
                    # stored: if they kill this worker too, no other request loses a finished
                    # result with them, and nothing that runs after them takes their place.
                    if self._busy_slots or self._unrecorded:
                        self._cond.wait()
                        continue
                    batch, wait = isolate(self._plan.retried, now=self.clock())
                    if batch is None:  # the rest of a dead run may still be arriving
                        self._cond.wait(wait)
                        continue
                    self._plan.take(batch)
                    self._busy_slots += 1
                    self._exclusive = True
                    self._slots.submit(self._run, batch, "retry")
                    continue
                batch, wait, reason = self._select()
                if batch is None:
                    self._cond.wait(wait)
                    continue
                self._plan.take(batch)
                cut_at = self.policy.max_batch_tokens  # the budget it was cut to
                if self.tuner is not None:
                    self.tuner.taken()  # a probe cuts its two budgets by turns
                self._busy_slots += 1
                self._slots.submit(self._run, batch, reason, None, None, cut_at)

    def _claim_ahead(self, batch: list[Pending], reason: str) -> None:
        """Take ``batch`` from the plan and have the writer claim it in the background (called
        under the lock); its leases are renewed from now on, as a running batch's are."""
        self._plan.take(batch)
        cut_at = self.policy.max_batch_tokens
        if self.tuner is not None:
            self.tuner.taken()
        run_id = new_id("run")
        claim = self.writer.claim_ahead([p.enc.item.id for p in batch], run_id, lease_s=self.lease_s,
                                        max_attempts=self.max_attempts)
        self._active_runs.add(run_id)
        self._ready = (batch, reason, run_id, claim, cut_at)

    def _policy_now(self) -> BatchPolicy:
        """The policy with the limits the tuner has in force now (called under the lock)."""
        t = self.tuner
        if t is None:
            return self.policy
        p = self.policy
        if (p.max_batch_tokens, p.max_batch_size) != (t.limit, t.size_limit) or \
                abs(p.batch_seconds - t.typical_batch_seconds) > 0.1 * max(p.batch_seconds, 1e-6):
            self.policy = replace(p, max_batch_tokens=t.limit, max_batch_size=t.size_limit,
                                  batch_seconds=t.typical_batch_seconds)
        return self.policy

    def _publish_limits(self) -> None:
        p = self._policy_now()
        m, labels = self.metrics, self.labels
        m.set("batchgen_batch_limit", p.max_batch_tokens, limit="max_batch_tokens", **labels)
        m.set("batchgen_batch_limit", p.max_batch_size, limit="max_batch_size", **labels)
        m.set("batchgen_batch_limit", p.slots, limit="slots", **labels)
        if self.tuner is not None:
            m.set("batchgen_calibration_ratio", self.tuner.ratio, **labels)

    def _select(self) -> tuple[list[Pending] | None, float, str]:
        self._policy_now()
        now = self.clock()
        window = self.policy.burst_window_ms / 1000
        while self._arrivals and self._arrivals[0] < now - window:
            self._arrivals.popleft()
        arriving = len(self._arrivals) >= 2 or self._intake_busy
        batch, wait, reason = select_batch(
            self._plan, now=now, device_idle=self._busy_slots == 0, policy=self.policy,
            arriving=arriving, free_slots=self.policy.slots - self._busy_slots)
        if batch is None and arriving and self._arrivals:  # look again when the burst may have paused
            wait = min(wait, max(0.0005, self._arrivals[-1] + window - now))
        return batch, wait, reason

    # --- running ---------------------------------------------------------------------------

    def _run(self, batch: list[Pending], reason: str = "", run_id: str | None = None,
             claim: Claim | None = None, cut_at: int | None = None) -> None:
        """Claim (unless ``claim``, made ahead, did), generate, and hand the outcomes to the writer."""
        run_id = run_id or new_id("run")
        ids = [p.enc.item.id for p in batch]
        try:
            if claim is None:
                claim_ids = self.writer.claim(ids, run_id, lease_s=self.lease_s, max_attempts=self.max_attempts)
            else:
                claim_ids = self.writer.hurry(claim)
            claimed = set(claim_ids)
            lost = [i for i in ids if i not in claimed]
            if lost:
                log.info("%d requests of a batch were taken by another run; skipping them", len(lost))
                self._settle(lost)
            todo = [p for p in batch if p.enc.item.id in claimed]
            if not todo:  # nothing of it is ours (a claim made ahead registered the run): let go
                with self._cond:
                    self._active_runs.discard(run_id)
            if todo:
                # The run's leases are renewed from now until its outcomes are stored (the
                # recorder lets go of it), however long the database takes to take them.
                with self._cond:
                    self._active_runs.add(run_id)
                outcomes = self._generate(todo, run_id, waited=self.clock() - min(p.arrived for p in todo),
                                          reason=reason, cut_at=cut_at)
                notify = [p.enc.item.id for p in todo if p.enc.item.params.delivery != "store"]
                self._store(Finished(run_id, outcomes, [p.enc.item.id for p in todo], notify))
        except Exception:
            log.exception("batch %s failed before generation; handing its requests back to the queue", run_id)
            with self._cond:
                self._active_runs.discard(run_id)
            self._fail_futures(ids, Requeue("batch failed before generation"))
        finally:
            with self._cond:
                self._busy_slots -= 1
                self._cond.notify_all()

    def _generate(self, todo: list[Pending], run_id: str, waited: float, reason: str = "",
                  cut_at: int | None = None) -> list[Outcome]:
        with self._cond:
            busy_at_start = self._busy_slots  # batches running beside this one (itself included)
        started = self.clock()
        try:
            announcer = self.announcer
            # Each generate call streams under a tag of its own: a failed batch whose requests are
            # then run one by one (same run) must not splice the two attempts' texts either.
            self._calls += 1
            tag = f"{run_id}.{self._calls}"
            on_delta = None if announcer is None else lambda rid, text: announcer.delta(rid, text, tag)
            outcomes = self.runner.generate([p.enc for p in todo], on_delta=on_delta)
        except Exception as exc:
            if len(todo) == 1:
                item = todo[0].enc.item
                log.exception("request failed in generation", extra={"request_id": item.id,
                                                                      "job_id": item.job_id})
                return [Outcome(request_id=item.id, job_id=item.job_id, error_code="generation_failed",
                                error_message=f"generation failed: {exc}")]
            # Find the request that broke the batch: run each alone, the others still succeed.
            log.warning("batch %s of %d failed (%s); running its requests one by one",
                        run_id, len(todo), exc)
            if self.tuner is not None and todo[0].key != ("score",):  # e.g. out of memory: no batch this big again
                with self._cond:
                    self.tuner.failed(sum(p.cost for p in todo))
            return [o for p in todo for o in self._generate([p], run_id, waited, "isolate")]
        seconds = self.clock() - started
        rows = sum(p.enc.item.params.samples for p in todo)  # sequences generated (n, best_of: several)
        new_tokens = sum(o.completion_tokens or 0 for o in outcomes)
        prompt_tokens = sum(p.length for p in todo)
        batch_tokens = sum(p.cost for p in todo)  # prompt + new tokens of every row (samples count each)
        tuned = ""
        with self._cond:
            # Alone (isolate, retry) or scoring (a forward pass, no generation): not the shape tuned.
            if self.tuner is not None and reason not in ("isolate", "retry") and todo[0].key != ("score",):
                limit = self.tuner.limit
                move = self.tuner.observe(batch_tokens=batch_tokens, requests=rows,
                                          prompt_tokens=prompt_tokens / len(todo), new_tokens=new_tokens,
                                          seconds=seconds, concurrent=min(busy_at_start, self._busy_slots),
                                          cut_at=cut_at if reason == "full" else 0)
                tuned = f", budget {limit}, {self.tuner.ratio:.2f} of calibration"
                if move is not None:
                    log.info("batch limits moved: max_batch_tokens %d -> %d (%s)", move.old, move.new, move.reason)
                    self.metrics.inc("batchgen_batch_limit_moves_total", **self.labels)
            self.stats.batches += 1
            self.stats.requests += len(todo)
            self.stats.sizes.append(len(todo))
        m = self.metrics
        m.observe("batchgen_batch_size", len(todo))
        m.observe("batchgen_batch_tokens", batch_tokens)
        m.inc("batchgen_generated_tokens_total", new_tokens)
        saved = getattr(self.runner, "prefix_saved", lambda: 0)()  # of the call this thread just made
        if saved:
            m.inc("batchgen_prefix_tokens_saved_total", saved)
        m.inc("batchgen_generation_seconds_total", seconds)
        if seconds > 0 and todo[0].key != ("score",):  # a scoring batch generates nothing
            m.set("batchgen_generation_tokens_per_second", new_tokens / seconds)
        m.observe_many("batchgen_queue_wait_seconds", [max(0.0, started - p.arrived) for p in todo])
        if self.tuner is not None:
            with self._cond:
                self._publish_limits()
        log.info("batch %s: %d requests, %d prompt + %d new tokens, lengths %d-%d, left %s after "
                 "%.0f ms, generated in %.3f s (%.0f tokens/s%s)", run_id, len(todo), prompt_tokens,
                 new_tokens, todo[0].length, todo[-1].length, reason or "-", waited * 1000, seconds,
                 new_tokens / seconds if seconds > 0 else 0.0, tuned)
        return outcomes

    def _heartbeat_loop(self) -> None:
        """Renew the leases of running batches, so no one takes over work this worker is doing."""
        while not self._halt.wait(self.lease_s / 3):
            with self._cond:
                active = list(self._active_runs)
            if not active:
                continue
            try:
                with self.db.begin() as conn:
                    runs.renew_leases(session=conn, run_ids=active, lease_s=self.lease_s)
            except Exception as exc:  # the database may be away; the lease is long enough for a retry
                log.warning("could not renew leases (%s)", exc)

    # --- recording -------------------------------------------------------------------------

    def _store(self, finished: Finished) -> None:
        """Hand a run's outcomes to the writer. While the database is away they wait there, the
        run's leases are renewed as soon as it answers again, and the messages stay unacked in
        the broker: an outage costs time, never an attempt, and nothing is lost if this worker
        dies meanwhile. Once stored, the run's requests are settled (their messages acked)."""
        with self._cond:
            self._unrecorded += 1
        future = self.writer.record(finished.run_id, finished.outcomes)
        future.add_done_callback(lambda f: self._stored(finished, f))

    def _stored(self, finished: Finished, future: Future[list[str]]) -> None:
        run_id, _, ids, notify = finished
        try:
            exc = future.exception()
            if exc is None:
                self._observe_results(future.result())
                self._announce_done(notify)
                self._settle(ids)
            elif isinstance(exc, OperationalError):  # stopping, or the database failed too long
                log.error("batch %s could not be stored (database unavailable for too long, or the worker is "
                          "stopping); its requests go back to the queue", run_id)
                self._fail_futures(ids, Requeue("the result could not be stored"))
            else:  # a bug: leases and the reconciler recover it
                log.error("could not record batch %s (%s); it will run again once its lease lapses", run_id, exc)
                self._fail_futures(ids, RuntimeError("recording failed"))
        except Exception:
            log.exception("settling batch %s failed", run_id)
        finally:
            with self._cond:
                self._active_runs.discard(run_id)
                self._unrecorded -= 1
                self._cond.notify_all()

    def _observe_results(self, request_ids: Sequence[str]) -> None:
        now = utcnow()
        with self._cond:
            born = [self._created.pop(i, None) for i in request_ids]
        self.metrics.observe_many("batchgen_time_to_result_seconds",
                                  [(now - created).total_seconds() for created in born if created is not None])

    def _announce_done(self, request_ids: Sequence[str]) -> None:
        if self.announcer is not None:
            for request_id in request_ids:
                self.announcer.done(request_id)

    # --- futures ---------------------------------------------------------------------------

    def _settle(self, request_ids: Sequence[str]) -> None:
        with self._cond:
            for request_id in request_ids:
                self._created.pop(request_id, None)
                for sub in self._waiters.pop(request_id, []):
                    sub.remaining -= 1
                    if sub.remaining == 0 and not sub.future.done():
                        sub.future.set_result(None)

    def _fail_futures(self, request_ids: Sequence[str], exc: Exception) -> None:
        with self._cond:
            for request_id in request_ids:
                for sub in self._waiters.pop(request_id, []):
                    if not sub.future.done():
                        sub.future.set_exception(exc)
