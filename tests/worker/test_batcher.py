"""Dynamic batching: the selection policy, then the real batcher on a real model and database.

Which requests shared a ``generate_batch`` call is read from the database: every request records
the id of the run (one call) that produced its result.
"""

import time
from concurrent.futures import Future
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from core import jobs, runs
from core.db import Database
from core.jobs import Limits
from core.registry import ModelSpec
from core.schemas import JobCreate
from core.tables import Job, JobRequest
from tests.support import wait_until
from worker.batcher import Batcher, Finished, _Submission
from worker.runner import ModelRunner
from worker.scheduling import BatchPolicy, Pending, select_batch

# --- the policy, with an explicit clock ----------------------------------------------------


def p(length, arrived=0.0, key=("t",), new=16):
    return Pending(enc=None, key=key, length=length, cost=length + new, arrived=arrived)


POLICY = BatchPolicy(max_batch_size=4, max_batch_tokens=10_000, max_wait_ms=50, slots=2)


def test_waits_for_more_while_the_device_is_busy_and_the_batch_is_not_full():
    batch, wait, _ = select_batch([p(10), p(12)], now=0.010, device_idle=False, policy=POLICY)
    assert batch is None and wait == pytest.approx(0.040)


def test_flushes_on_time():
    batch, _, why = select_batch([p(10), p(12)], now=0.051, device_idle=False, policy=POLICY)
    assert [x.length for x in batch] == [10, 12] and why == "time"


def test_flushes_at_once_when_the_device_is_idle():
    batch, _, why = select_batch([p(10)], now=0.0, device_idle=True, policy=POLICY)
    assert [x.length for x in batch] == [10] and why == "idle"


def test_an_idle_device_lets_a_burst_that_is_still_arriving_gather_first():
    pending = [p(10, 0.0), p(40, 0.008)]
    batch, wait, _ = select_batch(pending, now=0.010, device_idle=True, policy=POLICY, arriving=True)
    assert batch is None and wait > 0
    batch, _, why = select_batch(pending, now=0.010, device_idle=True, policy=POLICY, arriving=False)
    assert why == "idle"


def test_the_last_batch_is_split_between_idle_replicas():
    pending = [p(10 + i, 0.0) for i in range(4)]
    batch, _, _ = select_batch(pending, now=1.0, device_idle=True, policy=POLICY, free_slots=2)
    assert [x.length for x in batch] == [12, 13]  # the longer half; the rest goes to the other
    # Not while a burst is still arriving, nor when other work is waiting.
    assert len(select_batch(pending, now=1.0, device_idle=False, policy=POLICY, free_slots=2, arriving=True)[0]) == 4
    other = [p(10 + i, 0.0, key=("other",)) for i in range(4)]
    assert len(select_batch(pending + other, now=1.0, device_idle=True, policy=POLICY, free_slots=2)[0]) == 4


def test_flushes_on_size_taking_length_neighbours():
    pending = [p(10 + i, arrived=i / 1000) for i in range(6)]
    batch, _, _ = select_batch(pending, now=0.006, device_idle=False, policy=POLICY)
    assert [x.length for x in batch] == [10, 11, 12, 13]


def test_once_it_is_time_the_largest_batch_goes_first_even_if_not_the_oldest():
    pending = [p(10, 0.000), p(100, 0.040), p(101, 0.041)]
    batch, _, _ = select_batch(pending, now=0.051, device_idle=False, policy=POLICY)
    assert [x.length for x in batch] == [100, 101]


def test_flushes_on_tokens():
    policy = BatchPolicy(max_batch_size=64, max_batch_tokens=110, max_wait_ms=50)
    batch, _, _ = select_batch([p(30, new=20), p(31, new=20), p(32, new=20)], now=0.0, device_idle=False,
                            policy=policy)
    assert len(batch) == 2  # 50 + 51 tokens; a third (52) would not fit


def test_groups_by_sampling_settings_and_serves_the_oldest_group_first():
    pending = [p(10, 0.000, key=("hot",)), p(10, 0.001, key=("cold",)), p(11, 0.002, key=("hot",))]
    batch, _, _ = select_batch(pending, now=1.0, device_idle=False, policy=POLICY)
    assert {x.key for x in batch} == {("hot",)} and len(batch) == 2


def test_prompts_of_very_different_lengths_do_not_share_a_batch_and_the_largest_goes_first():
    pending = [p(8, 0.0), p(200, 0.001), p(9, 0.002), p(210, 0.003)]
    batch, _, _ = select_batch(pending, now=1.0, device_idle=False, policy=POLICY)
    assert [x.length for x in batch] == [200, 210]
    batch, _, _ = select_batch([x for x in pending if x.length < 100], now=1.0, device_idle=False, policy=POLICY)
    assert [x.length for x in batch] == [8, 9]


def test_a_batch_cut_only_by_length_difference_is_not_full():
    batch, wait, _ = select_batch([p(10, 0.0), p(200, 0.001)], now=0.002, device_idle=False, policy=POLICY)
    assert batch is None


def test_a_request_waiting_too_long_goes_first_whatever_its_size():
    policy = BatchPolicy(max_batch_size=4, max_wait_ms=50, starvation_ms=2000)
    pending = [p(8, 0.0), p(200, 1.5), p(210, 1.6)]
    batch, _, _ = select_batch(pending, now=2.1, device_idle=False, policy=policy)
    assert [x.length for x in batch] == [8]


def test_a_burst_fills_batches_instead_of_leaving_in_fragments():
    policy = BatchPolicy(max_batch_size=4, max_wait_ms=20, burst_wait_factor=5)
    pending = [p(10, 0.0), p(11, 0.030)]
    # A burst still arriving: a partial batch waits beyond max_wait...
    batch, wait, _ = select_batch(pending, now=0.032, device_idle=False, policy=policy, arriving=True)
    assert batch is None and wait == pytest.approx(0.020)  # looks again after max_wait at most
    # ...up to burst_wait_factor times it; once arrivals pause, max_wait applies again.
    assert select_batch(pending, now=0.101, device_idle=False, policy=policy, arriving=True)[0]
    assert select_batch(pending, now=0.041, device_idle=False, policy=policy, arriving=False)[0]


def simulate(policy, arrivals, run_s, window_s=0.05):
    """Requests arriving at the given times onto an idle device; each batch takes ``run_s``.
    Returns (start time, size) of every batch, deciding as the batcher's scheduler does."""
    pending, started, busy_until = [], [], []
    now, i = 0.0, 0
    while i < len(arrivals) or pending:
        while i < len(arrivals) and arrivals[i] <= now:
            pending.append(p(20, arrivals[i]))
            i += 1
        busy_until = [t for t in busy_until if t > now]
        recent = [a for a in arrivals[:i] if a >= now - window_s]
        if pending and len(busy_until) < policy.slots:
            batch, _, _ = select_batch(pending, now=now, device_idle=not busy_until, policy=policy,
                                       arriving=len(recent) >= 2, free_slots=policy.slots - len(busy_until))
            if batch:
                started.append((round(now, 3), len(batch)))
                pending = [x for x in pending if x not in batch]
                busy_until.append(now + run_s)
                continue
        now += 0.001
    return started


def test_a_burst_onto_an_idle_device_is_batched_not_trickled():
    # 40 requests 5 ms apart onto an idle device with two replicas; a batch takes 1 s and holds 8.
    arrivals = [0.005 * k for k in range(40)]
    calibrated = BatchPolicy(max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=None, slots=2, batch_seconds=1.0)
    starts = simulate(calibrated, arrivals, run_s=1.0)
    assert starts[0][1] > 1 and starts[1][1] > 1, starts  # the first batches wait for company
    assert [size for _, size in starts] == [8, 8, 8, 8, 8]
    assert starts[0][0] <= 0.05  # and it costs the first request at most 5% of a batch's time
    # Without knowing how long a batch takes (what the worker had before calibrating), the first
    # request of the burst took a replica alone for a whole batch.
    blind = BatchPolicy(max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=20, slots=2)
    assert simulate(blind, arrivals, run_s=1.0)[0] == (0.0, 1)


def test_a_lone_request_on_an_idle_device_waits_only_a_twentieth_of_a_batch():
    policy = BatchPolicy(max_batch_size=8, max_wait_ms=None, slots=2, batch_seconds=0.4)
    assert simulate(policy, [0.0], run_s=0.4) == [(0.02, 1)]
    fast = BatchPolicy(max_batch_size=8, max_wait_ms=None, slots=2, batch_seconds=0.01)  # a GPU-fast device
    assert simulate(fast, [0.0], run_s=0.01)[0][0] <= 0.001


# --- the real batcher ----------------------------------------------------------------------

SPEC = ModelSpec(name="tiny-chat", path="-", chat=True, context_length=256)


@pytest.fixture(scope="module")
def runner(tiny_model):
    return ModelRunner(tiny_model, SPEC.model_copy(update={"path": str(tiny_model)}), inter_threads=1)


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    yield database
    database.dispose()


def submit_job(db, payload):
    with db.write() as s:
        job, ids = jobs.create_job(session=s, spec=JobCreate.model_validate({"model": "tiny-chat", **payload}),
                                   model=SPEC, limits=Limits(100, 10_000), owner="alice")
    return job.id, ids


def run_all(db, runner, policy, id_lists):
    """Submit each list as its own message before the batcher starts, then run them."""
    batcher = Batcher(runner=runner, db=db, policy=policy)
    futures = [batcher.submit(ids) for ids in id_lists]
    batcher.start()
    for f in futures:
        f.result(timeout=60)
    batcher.stop()
    return batcher


def rows(db, ids):
    with db.read() as s:
        found = {r.id: r for r in s.scalars(select(JobRequest).where(JobRequest.id.in_(ids)))}
    return [found[i] for i in ids]


def test_requests_of_different_jobs_share_one_generate_call(db, runner):
    _, a = submit_job(db, {"prompts": ["first job one", "first job two"], "params": {"max_new_tokens": 4}})
    _, b = submit_job(db, {"prompts": ["second job one", "second job two"], "params": {"max_new_tokens": 4}})
    batcher = run_all(db, runner, BatchPolicy(max_batch_size=8, max_wait_ms=1000), [[i] for i in a + b])
    stored = rows(db, a + b)
    assert {r.status for r in stored} == {"succeeded"} and all(r.text is not None for r in stored)
    assert len({r.run_id for r in stored}) == 1 and batcher.stats.sizes == [4]
    with db.read() as s:
        assert {j.status for j in s.scalars(select(Job))} == {"completed"}


def test_different_sampling_settings_run_in_different_calls(db, runner):
    _, ids = submit_job(db, {"requests": [
        {"prompt": "warm a", "params": {"temperature": 0.5}}, {"prompt": "cold a", "params": {"temperature": 0.9}},
        {"prompt": "warm b", "params": {"temperature": 0.5}}, {"prompt": "cold b", "params": {"temperature": 0.9}},
    ], "params": {"max_new_tokens": 3}})
    run_all(db, runner, BatchPolicy(max_batch_size=8, max_wait_ms=1000), [[i] for i in ids])
    r = rows(db, ids)
    assert r[0].run_id == r[2].run_id and r[1].run_id == r[3].run_id and r[0].run_id != r[1].run_id


def greedy_probe(db, runner):
    """A prompt whose greedy output (random weights) has text to stop on, that text, and a stop."""
    prompts = ["The class", "The function", "A module", "Each value", "In the loop"]
    _, probe = submit_job(db, {"prompts": prompts, "params": {"temperature": 0.0, "max_new_tokens": 20}})
    # One at a time: int8 greedy output depends on what else is in the batch.
    for prompt, request_id in zip(prompts, probe, strict=True):
        run_all(db, runner, BatchPolicy(max_wait_ms=0), [[request_id]])
        text = rows(db, [request_id])[0].text
        stops = [text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip()]
        if stops:
            return prompt, text, stops[0]
    pytest.fail("no probe prompt produced enough text")


def test_own_max_new_tokens_and_stop_inside_one_shared_call(db, runner):
    greedy = {"temperature": 0.0}
    prompt, text, stop = greedy_probe(db, runner)
    _, ids = submit_job(db, {"requests": [
        {"prompt": prompt, "params": {"max_new_tokens": 20, "stop": [stop]}},
        {"prompt": "A longer prompt here", "params": {"max_new_tokens": 2}},
        {"prompt": "Another one", "params": {"max_new_tokens": 9}},
    ], "params": greedy})
    run_all(db, runner, BatchPolicy(max_batch_size=8, max_wait_ms=1000, length_slack_tokens=64), [[i] for i in ids])
    r = rows(db, ids)
    assert len({x.run_id for x in r}) == 1
    assert (r[0].finish_reason, r[0].text) == ("stop", text[: text.find(stop)])
    assert [(x.finish_reason, x.completion_tokens) for x in r[1:]] == [("length", 2), ("length", 9)]


def test_full_batches_leave_on_size(db, runner):
    _, ids = submit_job(db, {"prompts": [f"same length {i}" for i in range(5)], "params": {"max_new_tokens": 2}})
    batcher = run_all(db, runner, BatchPolicy(max_batch_size=2, max_wait_ms=10_000, slots=1), [[i] for i in ids])
    assert sorted(batcher.stats.sizes) == [1, 2, 2] and len({r.run_id for r in rows(db, ids)}) == 3


def test_a_request_that_cannot_run_fails_alone(db, runner):
    job_id, ids = submit_job(db, {"prompts": ["fine", "word " * 250, "also fine"], "params": {"max_new_tokens": 4}})
    run_all(db, runner, BatchPolicy(max_wait_ms=100), [[i] for i in ids])
    r = rows(db, ids)
    assert [x.status for x in r] == ["succeeded", "failed", "succeeded"]
    assert r[1].error_code == "context_length_exceeded" and "context" in r[1].error_message
    with db.read() as s:
        job = s.get(Job, job_id)
        assert (job.status, job.succeeded, job.failed, job.running, job.queued) == ("completed", 2, 1, 0, 0)


def test_requests_delivered_twice_are_run_and_recorded_once(db, runner):
    job_id, ids = submit_job(db, {"prompts": ["once", "twice"], "params": {"max_new_tokens": 3}})
    batcher = run_all(db, runner, BatchPolicy(max_wait_ms=100), [[ids[0]], [ids[1]], [ids[1]], ids])
    assert batcher.stats.requests == 2
    run_all(db, runner, BatchPolicy(), [ids])  # a late redelivery after both finished
    r = rows(db, ids)
    assert [x.attempts for x in r] == [1, 1]
    with db.read() as s:
        job = s.get(Job, job_id)
        assert (job.succeeded, job.completion_tokens) == (2, sum(x.completion_tokens for x in r))


class Timed:
    """The real runner, noting when each generate call ran and on which requests."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def generate(self, encoded, **kwargs):
        started = naive(jobs.utcnow())
        try:
            return self.runner.generate(encoded, **kwargs)
        finally:
            self.calls.append((started, naive(jobs.utcnow()), {e.item.id for e in encoded}))


def naive(moment):
    return moment.replace(tzinfo=None)


def test_a_request_whose_worker_died_runs_alone_with_nothing_beside_it(db, runner, monkeypatch):
    # Two requests were running when their worker died (lease lapsed, attempts 1); six are fresh.
    # Storing results is made slow (as on a busy database) so that running the retried request
    # while an earlier result still waits to be stored would show.
    record = runs.record

    def slow_record(**kwargs):
        time.sleep(0.2)
        return record(**kwargs)

    monkeypatch.setattr(runs, "record", slow_record)
    _, dead = submit_job(db, {"prompts": ["was running a", "was running b"], "params": {"max_new_tokens": 6}})
    with db.write() as s:
        runs.claim(session=s, request_ids=dead, run_id="run_dead")
        s.execute(update(JobRequest).where(JobRequest.id.in_(dead)).values(lease_until=jobs.utcnow() - timedelta(seconds=1)))
    _, fresh = submit_job(db, {"prompts": [f"fresh {i}" for i in range(6)], "params": {"max_new_tokens": 6}})
    timed = Timed(runner)
    batcher = Batcher(runner=timed, db=db, policy=BatchPolicy(max_batch_size=2, max_wait_ms=0, slots=2))
    futures = [batcher.submit([i]) for i in fresh[:3] + dead + fresh[3:]]
    batcher.start()
    for f in futures:
        f.result(timeout=60)
    batcher.stop()
    assert {r.status for r in rows(db, dead + fresh)} == {"succeeded"}
    assert [r.attempts for r in rows(db, dead)] == [2, 2]
    stored = {r.id: naive(r.completed_at) for r in rows(db, dead + fresh)}
    for request_id in dead:  # its own call, and no other call overlapping it in time
        (start, end, ids), = [c for c in timed.calls if request_id in c[2]]
        assert ids == {request_id}
        assert not [c for c in timed.calls if c[2] != ids and c[0] < end and c[1] > start]
        # What ran before it was stored before it started (if it kills the worker, no finished
        # result dies with it), and nothing started before its own result was stored.
        before = [i for c in timed.calls if c[1] <= start for i in c[2]]
        assert all(stored[i] <= start for i in before)
        assert not [c for c in timed.calls if c[1] > end and c[0] < stored[request_id]]


@pytest.mark.postgres
def test_a_result_the_database_refuses_fails_alone_and_the_batch_is_stored(runner, postgres_url):
    from core.runs import Outcome
    from tests.conftest import _truncate

    _truncate(postgres_url)
    db = Database(postgres_url)
    job_id, ids = submit_job(db, {"prompts": ["a", "b"]})
    with db.write() as s:
        runs.claim(session=s, request_ids=ids, run_id="run_x")
    good = Outcome(request_id=ids[0], job_id=job_id, text="fine", finish_reason="stop", prompt_tokens=1,
                   completion_tokens=1)
    # PostgreSQL refuses this row (error_code is at most 64 characters): a non-transient failure.
    refused = Outcome(request_id=ids[1], job_id=job_id, error_code="x" * 100, error_message="too long a code")
    # Hand the recorder a generated batch directly, as a slot does, and wait as a task would.
    batcher = Batcher(runner=runner, db=db, policy=BatchPolicy()).start()
    waiting = _Submission(Future(), remaining=2)
    for request_id in ids:
        batcher._waiters[request_id].append(waiting)
    batcher._store(Finished("run_x", [good, refused], ids, []))
    waiting.future.result(timeout=30)
    batcher.stop()
    r = rows(db, ids)
    assert (r[0].status, r[0].text) == ("succeeded", "fine")
    assert (r[1].status, r[1].error_code) == ("failed", "store_failed")
    with db.read() as s:
        assert s.get(Job, job_id).status == "completed"
    db.dispose()


# --- delivery guarantees (issue: duplicate deliveries, leases until stored, warm shutdown) ---


class Gated:
    """The real runner, whose generate waits until the test opens the gate."""

    def __init__(self, runner):
        import threading

        self.runner, self.started, self.gate = runner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def generate(self, encoded, **kwargs):
        self.started.set()
        assert self.gate.wait(30)
        return self.runner.generate(encoded, **kwargs)


def test_a_duplicate_delivery_while_the_request_runs_acks_neither_message_before_the_store(db, runner):
    _, ids = submit_job(db, {"prompts": ["running when delivered again"], "params": {"max_new_tokens": 3}})
    gated = Gated(runner)
    batcher = Batcher(runner=gated, db=db, policy=BatchPolicy(max_wait_ms=0)).start()
    try:
        original = batcher.submit(ids)
        assert gated.started.wait(30)  # claimed and generating
        duplicate = batcher.submit(ids)  # kombu restored the unacked message: delivered again
        # The intake takes the second delivery as another waiter on the same request.
        wait_until(lambda: len(batcher._waiters.get(ids[0], [])) == 2, 10, what="the second delivery taken in")
        assert not original.done() and not duplicate.done(), "a message was settled before the result was stored"
        gated.gate.set()
        original.result(timeout=30)
        duplicate.result(timeout=30)
        (row,) = rows(db, ids)
        assert (row.status, row.attempts) == ("succeeded", 1)
    finally:
        gated.gate.set()
        batcher.stop()


def test_leases_are_renewed_until_the_result_is_stored_so_no_one_takes_it_over(db, runner, monkeypatch):
    # The database takes its time storing results (a busy recorder); the lease is much shorter.
    record = runs.record
    storing = []

    def slow_record(**kwargs):
        storing.append(True)
        time.sleep(2.5)
        return record(**kwargs)

    monkeypatch.setattr(runs, "record", slow_record)
    job_id, ids = submit_job(db, {"prompts": ["slow to store"], "params": {"max_new_tokens": 3}})
    batcher = Batcher(runner=runner, db=db, policy=BatchPolicy(max_wait_ms=0), lease_s=0.9).start()
    try:
        future = batcher.submit(ids)
        deadline = time.monotonic() + 30
        while not storing and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.5)  # past the lease the claim gave: only renewal keeps it
        with db.write() as s:  # another worker, handed the request again, tries to take it over
            assert runs.claim(session=s, request_ids=ids, run_id="run_elsewhere", lease_s=60) == []
        future.result(timeout=30)
    finally:
        batcher.stop()
    (row,) = rows(db, ids)
    assert (row.status, row.attempts) == ("succeeded", 1) and row.text is not None
    with db.read() as s:
        job = s.get(Job, job_id)
        assert (job.status, job.succeeded, job.completion_tokens) == ("completed", 1, row.completion_tokens)


def test_requests_taken_in_while_shutdown_begins_go_back_and_stop_never_hangs(db, runner, monkeypatch):
    import threading

    from worker.batcher import Requeue

    # One request cannot run (too long) and is failed by a write in the intake; the warm shutdown
    # begins during that write, while the intake still holds the other, runnable request.
    in_write, handed_back = threading.Event(), threading.Event()
    fail_queued = runs.fail_queued

    def slow_fail_queued(**kwargs):
        in_write.set()
        assert handed_back.wait(10)
        return fail_queued(**kwargs)

    monkeypatch.setattr(runs, "fail_queued", slow_fail_queued)
    _, ids = submit_job(db, {"prompts": ["word " * 250, "fine"], "params": {"max_new_tokens": 3}})
    batcher = Batcher(runner=runner, db=db, policy=BatchPolicy(max_wait_ms=0)).start()
    futures = [batcher.submit(ids)]
    assert in_write.wait(30)
    batcher.hand_back()
    handed_back.set()
    with pytest.raises(Requeue):
        futures[0].result(timeout=10)
    started = time.monotonic()
    batcher.stop(timeout=20)
    assert time.monotonic() - started < 5
    assert [r.status for r in rows(db, ids)] == ["failed", "queued"]


def test_requests_sharing_a_long_prefix_batch_together_and_compute_it_once(db, runner):
    prefix = "You are a careful assistant. Read the passage and answer in one word. " * 2
    shared = [f"{prefix}Question {i}: what is {i}?" for i in range(6)]
    _, ids = submit_job(db, {"prompts": shared, "params": {"max_new_tokens": 3, "temperature": 0.0}})
    _, other = submit_job(db, {"prompts": ["Something else", "Another thing entirely"],
                               "params": {"max_new_tokens": 3, "temperature": 0.0}})
    batcher = run_all(db, runner, BatchPolicy(max_batch_size=16, max_wait_ms=1000, length_slack_tokens=1000),
                      [ids + other])
    r, o = rows(db, ids), rows(db, other)
    assert {x.status for x in r + o} == {"succeeded"}
    # The six that share the prefix ran in one call of their own; the two others did not join it.
    assert len({x.run_id for x in r}) == 1 and not {x.run_id for x in o} & {r[0].run_id}
    with db.read() as s:
        encoded = [runner.encode(item) for item in runs.load_work(session=s, request_ids=ids)]
    shared_tokens = runner.shared_prefix(encoded)
    saved = sum(batcher.metrics.snapshot()["batchgen_prefix_tokens_saved_total"].values())
    assert shared_tokens >= 64 and saved == shared_tokens * 5  # counted once, by the call that saved it


def test_a_request_arriving_while_its_prefix_group_waits_joins_it():
    """Grouping looks at what is already waiting, whatever its key holds (sampling keys end in
    numbers): a late request with the same first tokens joins the waiting group."""
    from types import SimpleNamespace

    from worker.scheduling import PREFIX_MIN, group_shared_prefixes

    def pending(ids, key=(0.7, 0.9, 0, 1.0, 0)):
        enc = SimpleNamespace(ids=ids, length=len(ids), item=SimpleNamespace(attempts=0))
        return Pending(enc=enc, key=key, length=len(ids), cost=len(ids), arrived=0.0)

    prefix = list(range(1, PREFIX_MIN + 1))
    first = [pending(prefix + [100 + i, 7]) for i in range(4)] + [pending(list(range(500, 600)))]
    group_shared_prefixes(first, [])
    assert len({p.key for p in first[:4]}) == 1 and first[0].key != first[4].key == (0.7, 0.9, 0, 1.0, 0)
    late = [pending(prefix + [999]), pending(list(range(700, 800)))]
    group_shared_prefixes(late, [p.key for p in first])
    assert late[0].key == first[0].key and late[1].key == (0.7, 0.9, 0, 1.0, 0)


def test_the_next_full_batch_is_claimed_while_every_slot_is_busy_and_runs_even_at_shutdown(db, runner):
    """One slot, batches of two: while the first batch generates, the next full one is claimed
    ahead (its claim stored with other writes, not on the slot's path). A warm shutdown then
    hands back what waits, but the batch claimed ahead runs and is stored: claimed requests are
    never left to lapse."""
    from worker.batcher import Requeue

    _, ids = submit_job(db, {"prompts": [f"same length {i}" for i in range(6)], "params": {"max_new_tokens": 2}})
    gated = Gated(runner)
    batcher = Batcher(runner=gated, db=db, policy=BatchPolicy(max_batch_size=2, max_wait_ms=0, slots=1)).start()
    try:
        futures = [batcher.submit([i]) for i in ids]
        assert gated.started.wait(30)  # the first batch generates, held at the gate
        wait_until(lambda: sum(r.status == "running" for r in rows(db, ids)) == 4, 10,
                   what="the next batch claimed while the slot is busy")
        running = [r for r in rows(db, ids) if r.status == "running"]
        assert len({r.run_id for r in running}) == 2  # two runs: the one generating, the one claimed ahead
        batcher.hand_back()  # shutdown begins while the first batch still generates
        gated.gate.set()
        outcomes = []
        for f in futures:
            try:
                f.result(timeout=30)
                outcomes.append("stored")
            except Requeue:
                outcomes.append("handed back")
        assert outcomes.count("stored") == 4 and outcomes.count("handed back") == 2
        stored = [r for r in rows(db, ids) if r.status == "succeeded"]
        assert {r.id for r in stored} == {r.id for r in running}
        assert all(r.status == "queued" for r in rows(db, ids) if r.id not in {s.id for s in stored})
    finally:
        gated.gate.set()
        batcher.stop()
