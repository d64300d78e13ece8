"""The scheduling plan: kept sorted as requests arrive and leave, its batches cut once per change
of a group, and every decision the same as one taken from scratch over what waits."""

from __future__ import annotations

import random

from worker import scheduling
from worker.scheduling import BatchPolicy, Pending, Plan, select_batch

POLICY = BatchPolicy(max_batch_size=8, max_batch_tokens=2000, max_wait_ms=10.0, slots=2)


def pending(length: int, arrived: float, key: tuple = ("a",), priority: int = 5) -> Pending:
    return Pending(enc=None, key=key, length=length, cost=length + 32, arrived=arrived, priority=priority)


def test_each_decision_of_the_plan_equals_one_from_scratch_and_cuts_once_per_change(monkeypatch):
    rng = random.Random(7)
    lengths = rng.sample(range(8, 400), 300)  # distinct: no ties between batches
    arrivals = [pending(n, i * 0.001, key=("a",) if i % 3 else ("b",), priority=9 if i % 50 == 0 else 5)
                for i, n in enumerate(lengths)]
    cuts = []
    original = scheduling.chunks
    monkeypatch.setattr(scheduling, "chunks", lambda group, policy: cuts.append(1) or original(group, policy))
    plan = Plan()
    waiting: list[Pending] = []
    now, taken, plan_cuts, decisions = 1.0, 0, 0, 0
    for step in range(200):
        if arrivals and step % 4 == 0:  # a round of arrivals, as the intake adds them
            for p in arrivals[:20]:
                plan.add(p)
                waiting.append(p)
            arrivals = arrivals[20:]
        if not waiting:
            break
        cuts_before = len(cuts)
        batch, _, why = select_batch(plan, now=now, device_idle=True, policy=POLICY)
        decided_cuts = len(cuts) - cuts_before
        plan_cuts += decided_cuts
        decisions += 1
        fresh, _, fresh_why = select_batch(sorted(waiting, key=lambda p: p.arrived), now=now, device_idle=True,
                                           policy=POLICY)
        assert batch is not None and fresh is not None and why == fresh_why
        assert [id(p) for p in batch] == [id(p) for p in fresh], step
        assert all(batch[i].length <= batch[i + 1].length for i in range(len(batch) - 1))
        assert decided_cuts <= 2  # at most once per group, and only for a group that changed
        plan.take(batch)
        for p in batch:
            waiting.remove(p)
        taken += len(batch)
    assert taken == 300 and len(plan) == 0 and not plan.groups
    # Cut again only where arrivals changed a group (every fourth decision here), not per decision.
    assert decisions > 30 and plan_cuts <= 2 * (decisions // 4 + 1) + 2, (plan_cuts, decisions)


def test_the_plan_keeps_groups_sorted_and_counts_what_waits():
    plan = Plan()
    for i, n in enumerate([50, 10, 30, 20, 40]):
        plan.add(pending(n, float(i)))
    call = pending(25, 5.0, priority=9)
    call.interactive = True
    plan.add(call)
    assert [p.length for p in plan.groups[("a",)]] == [10, 20, 25, 30, 40, 50]
    assert len(plan) == 6 and plan.interactive == 1 and plan.oldest().length == 50
    first = plan.groups[("a",)][:2]
    plan.take([plan.groups[("a",)][-1]])  # the 50, the oldest
    assert plan.oldest().length == 10 and len(plan) == 5
    plan.take(first)
    assert [p.length for p in plan.clear()] == [25, 30, 40] and len(plan) == 0 and plan.interactive == 0


def test_a_prefix_group_batches_among_itself_and_each_row_counts_its_whole_prompt():
    """Requests sharing 201 leading tokens (BOS and a 200-token prefix), 9 of their own and 3 new,
    are grouped; each counts its 213 tokens against the budget, since CTranslate2 carries the
    prefix's state in every row (see PREFIX_MIN: costed once per batch, they made batches the
    device ran at 0.4 of its speed)."""
    from types import SimpleNamespace

    from worker.scheduling import chunks, group_shared_prefixes

    prefix = list(range(1000, 1200))
    fresh = []
    for i in range(40):
        ids = [1, *prefix, *range(10 * i, 10 * i + 9)]  # BOS, the prefix, 9 tokens of its own
        item = SimpleNamespace(attempts=0, params=SimpleNamespace(samples=1))
        enc = SimpleNamespace(ids=ids, length=len(ids), item=item)
        fresh.append(Pending(enc=enc, key=("sample",), length=len(ids), cost=len(ids) + 3, arrived=i * 0.001))
    alone = Pending(enc=SimpleNamespace(ids=[1, 2, 3], length=3, item=fresh[0].enc.item), key=("sample",),
                    length=3, cost=6, arrived=1.0)
    group_shared_prefixes([*fresh, alone])
    assert {p.key[-1][0] for p in fresh} == {"prefix"} and alone.key == ("sample",)
    batches = chunks(sorted(fresh, key=lambda p: p.length), BatchPolicy(max_batch_size=64, max_batch_tokens=900))
    assert [len(b) for b, _ in batches] == [4] * 10 and all(sum(p.cost for p in b) <= 900 for b, _ in batches)


def owned(length: int, arrived: float, owner: str, priority: int = 5) -> Pending:
    p = pending(length, arrived, priority=priority)
    p.owner = owner
    return p


def drain(plan: Plan) -> list[set[str]]:
    order = []
    while len(plan):
        batch, _, _ = select_batch(plan, now=1.0, device_idle=True, policy=POLICY)
        assert batch is not None
        plan.take(batch)
        order.append({p.owner for p in batch})
    return order


def test_owners_share_a_priority_fairly():
    """Largest first alone left one owner's short request behind another's flood until it starved
    (30 s): at equal priority the least served owner now goes next."""
    plan = Plan()
    for i in range(64):  # alice: eight full batches
        plan.add(owned(100 + i, 0.0, "alice"))
    plan.add(owned(10, 0.5, "bob"))  # a short one, later: a batch of its own, the smallest
    order = drain(plan)
    assert order.index({"bob"}) == 1, order  # right after alice's first batch, not after all eight
    # Priority still comes first: a higher-priority flood runs before a lower-priority request.
    plan = Plan()
    for i in range(24):
        plan.add(owned(100 + i, 0.0, "alice", priority=7))
    plan.add(owned(10, 0.5, "bob", priority=5))
    assert drain(plan)[-1] == {"bob"}
