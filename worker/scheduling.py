"""Batching policy: which waiting requests leave together, and when.

Requests are grouped by sampling settings (CTranslate2 takes them per call) and, inside a group,
cut into batches of similar prompt length (CTranslate2 forwards only the shortest prompt of a
batch at once, the rest token by token) up to ``max_batch_size`` requests and ``max_batch_tokens``
prompt + new tokens. ``select_batch`` decides when the next batch starts and which; ``isolate``
picks the next part of a run whose worker died; ``group_shared_prefixes`` gives requests sharing
a long prefix a group of their own.

The ``Plan`` holds what waits, kept sorted per group as requests arrive and leave, with each
group's batches cut once and kept until the group changes: a decision costs the number of
batches, not a sort of everything waiting (a worker may hold thousands of requests).
"""

from __future__ import annotations

import hashlib
from bisect import insort
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BatchPolicy:
    """When a batch leaves, and how many run at once."""

    max_batch_size: int = 16
    max_batch_tokens: int = 2048  # prompt + max_new_tokens, summed over the batch
    max_wait_ms: float | None = 20.0  # None: a tenth of batch_seconds (2-200 ms), 20 ms if unknown
    slots: int = 1
    # How long a full batch takes on this device (calibration, then what the worker sees); 0 if
    # unknown. Waits scale with it: waiting 5% of a batch's time costs a lone request little,
    # while starting a batch of one costs a whole batch's time of a replica.
    batch_seconds: float = 0.0
    # Two requests share a batch only if their prompt lengths differ by at most this many
    # tokens or this fraction of the shorter one, whichever is larger.
    length_slack_tokens: int = 16
    length_slack_ratio: float = 0.25
    # Two or more requests arriving within this window are a burst; while one arrives, a
    # partial batch waits up to burst_wait_factor times max_wait_ms for it to fill.
    burst_window_ms: float = 50.0
    burst_wait_factor: float = 8.0
    # A request that has waited this long is served first, whatever the size of its batch.
    starvation_ms: float = 30_000.0

    def waits(self) -> tuple[float, float, float]:
        """Seconds: (max_wait, idle_wait, burst_wait).

        - max_wait: a partial batch waits this long for more while the device is busy;
        - idle_wait: an idle device waits this long for company for a lone request (a twentieth
          of a batch's time), so the first request of a burst does not take a replica alone;
        - burst_wait: while requests keep arriving, a partial batch waits up to this long
          (``burst_wait_factor`` x max_wait, at most 30% of a batch's time).
        """
        b = self.batch_seconds
        if self.max_wait_ms is not None:
            max_wait = self.max_wait_ms / 1000
        else:
            max_wait = min(0.2, max(0.002, 0.1 * b)) if b > 0 else 0.02
        idle = min(max_wait, 0.05 * b) if b > 0 else 0.0
        burst = max_wait * self.burst_wait_factor
        if b > 0:
            burst = max(max_wait, min(burst, 0.3 * b))
        return max_wait, idle, burst



@dataclass(eq=False)  # identity: two entries are never "equal"
class Pending:
    enc: Any
    key: tuple[Any, ...]
    length: int
    cost: int
    arrived: float
    priority: int = 5
    interactive: bool = False  # a synchronous or streamed call: someone waits on it now
    retried: bool = False  # its worker died running it: it runs alone (see ``isolate``)
    waiting: bool = True  # still in the plan
    owner: str = ""  # its job's: owners share a priority fairly (see ``Plan.served``)



def _order(p: Pending) -> tuple[int, float]:
    return p.length, p.arrived


Batch = tuple[list[Pending], bool, tuple[int, int], frozenset[str]]  # requests, full, rank, owners


@dataclass
class _Cut:
    """A group's batches as ``chunks`` cut them, each with its rank (highest priority, then
    tokens) and its owners, for the limits they were cut with."""

    limits: tuple[int, int, int, float]
    batches: list[Batch]


# How fast what an owner was served is forgotten: each batch that leaves multiplies every owner's
# count by this (half of it is forgotten after about 20 batches).
SERVED_DECAY = 0.966


class Plan:
    """The requests waiting to run, by batching key, each group sorted by prompt length."""

    def __init__(self, pending: Iterable[Pending] = ()) -> None:
        self.groups: dict[tuple[Any, ...], list[Pending]] = {}
        self.retried: list[Pending] = []
        self._arrivals: deque[Pending] = deque()
        self._cuts: dict[tuple[Any, ...], _Cut] = {}
        self._count = 0
        self.interactive = 0  # synchronous calls waiting (someone waits on them now)
        # Work (prompt + new tokens, per sample) each owner had run lately, decayed: at equal
        # priority the batch of the owner served least goes first, so one tenant's flood does not
        # hold another's few requests behind it until they starve.
        self.served: dict[str, float] = {}
        for p in pending:
            self.add(p)

    def __len__(self) -> int:
        return self._count

    def add(self, p: Pending) -> None:
        p.waiting = True
        insort(self.groups.setdefault(p.key, []), p, key=_order)
        self._arrivals.append(p)
        self._cuts.pop(p.key, None)
        self._count += 1
        self.interactive += p.interactive
        if p.retried:
            self.retried.append(p)

    def take(self, batch: Sequence[Pending]) -> None:
        """Remove a batch that leaves. A batch the plan cut leaves its group's other batches as
        they were; anything else has the group cut again at the next decision."""
        for key in {p.key for p in batch}:
            cut = self._cuts.get(key)
            if cut is not None:
                kept = [b for b in cut.batches if b[0] is not batch]
                if len(kept) == len(cut.batches) - 1:
                    cut.batches = kept
                else:
                    del self._cuts[key]
        served = self.served
        for owner in list(served):
            served[owner] *= SERVED_DECAY
            if served[owner] < 0.01:
                del served[owner]
        for p in batch:
            served[p.owner] = served.get(p.owner, 0.0) + p.cost  # the device's work: samples x tokens
        for p in batch:
            group = self.groups[p.key]
            group.remove(p)
            if not group:
                del self.groups[p.key]
                self._cuts.pop(p.key, None)
            p.waiting = False
            self._count -= 1
            self.interactive -= p.interactive
            if p.retried:
                self.retried.remove(p)

    def clear(self) -> list[Pending]:
        """Everything waiting, removed."""
        out = [p for group in self.groups.values() for p in group]
        for p in out:
            p.waiting = False
        self.groups.clear()
        self.retried.clear()
        self._arrivals.clear()
        self._cuts.clear()
        self._count = 0
        self.interactive = 0
        return out

    def changed(self, key: tuple[Any, ...]) -> None:
        """The costs of a group's requests changed: cut its batches again at the next decision."""
        self._cuts.pop(key, None)

    def oldest(self) -> Pending:
        while not self._arrivals[0].waiting:
            self._arrivals.popleft()
        return self._arrivals[0]

    def batches(self, key: tuple[Any, ...], policy: BatchPolicy) -> list[Batch]:
        """The group's batches (batch, full, rank, owners), cut once per change of the group or
        limits."""
        limits = (policy.max_batch_size, policy.max_batch_tokens, policy.length_slack_tokens,
                  policy.length_slack_ratio)
        cut = self._cuts.get(key)
        if cut is None or cut.limits != limits:
            cut = self._cuts[key] = _Cut(limits, [
                (batch, full, (max(p.priority for p in batch), sum(p.cost for p in batch)),
                 frozenset(p.owner for p in batch))
                for batch, full in chunks(self.groups[key], policy)])
        return cut.batches

    def share(self, owners: frozenset[str]) -> float:
        """How much the least served of these owners had run lately."""
        served = self.served
        return min(served.get(o, 0.0) for o in owners) if served else 0.0


# Requests that arrive together and share at least this many leading tokens (at least
# PREFIX_GROUP of them: a job's system prompt, an instruction or few-shot block in front of every
# input) are batched among themselves, so that the runner computes that prefix once per batch
# (CTranslate2's static_prompt; see ModelRunner.generate).
#
# Their rows still count their whole prompt against the batch's token budget. CTranslate2 computes
# the prefix's forward pass once but carries its state in every row (attention and memory grow
# with rows x whole length), and batches costed by their own tokens alone (50 rows of a 405-token
# prefix at a 3,072-token budget) ran at 0.4 of the calibration's speed: 0.82 of raw CTranslate2
# without sharing in `bench.prefix`, where whole-prompt costing (batches of 4-6) reached 1.97x.
PREFIX_MIN = 64
PREFIX_GROUP = 4


def _is_prefix_mark(part: Any) -> bool:
    return isinstance(part, tuple) and len(part) == 2 and part[0] == "prefix"


def prefix_mark(p: Pending) -> tuple[str, str] | None:
    """What a request's first ``PREFIX_MIN`` tokens are, for grouping; None when it has no more
    than that, or must not be grouped (scoring; a retried request runs as it is told)."""
    if p.key == ("score",) or p.enc.length <= PREFIX_MIN or p.enc.item.attempts > 0:
        return None
    return ("prefix", hashlib.blake2b(repr(p.enc.ids[:PREFIX_MIN]).encode(), digest_size=8).hexdigest())


def group_shared_prefixes(fresh: Sequence[Pending], waiting_keys: Iterable[tuple[Any, ...]] = ()) -> None:
    """Give requests that share their first ``PREFIX_MIN`` tokens a batching key of their own:
    ``PREFIX_GROUP`` or more arriving together, or any that arrive while such a group waits
    (``waiting_keys``: the keys of what waits). The runner computes the prefix a batch actually
    shares (at least that long) once. Others keep their key: prompts that share nothing still
    batch across jobs as before."""
    waiting = {key for key in waiting_keys if _is_prefix_mark(key[-1] if key else None)}
    marks = {id(p): prefix_mark(p) for p in fresh}
    counts: dict[tuple[Any, ...], int] = defaultdict(int)
    for p in fresh:
        if marks[id(p)] is not None:
            counts[(*p.key, marks[id(p)])] += 1
    for p in fresh:
        mark = marks[id(p)]
        if mark is None:
            continue
        key = (*p.key, mark)
        if counts[key] >= PREFIX_GROUP or key in waiting:
            p.key = key


def _fits(first: Pending, cand: Pending, policy: BatchPolicy) -> bool:
    slack = max(policy.length_slack_tokens, int(first.length * policy.length_slack_ratio))
    return cand.length - first.length <= slack


def chunks(group: list[Pending], policy: BatchPolicy) -> list[tuple[list[Pending], bool]]:
    """Cut a length-sorted group into batches as full as the limits allow, each with whether it
    is full (cannot take another request)."""
    out: list[tuple[list[Pending], bool]] = []
    chunk: list[Pending] = []
    tokens = 0
    def is_full() -> bool:
        smallest = min(q.cost for q in chunk)
        return len(chunk) >= policy.max_batch_size or tokens + smallest > policy.max_batch_tokens

    for p in group:
        if chunk and (len(chunk) >= policy.max_batch_size or tokens + p.cost > policy.max_batch_tokens
                      or not _fits(chunk[0], p, policy)):
            # Cut for a size limit: full. Cut because the next prompt is much longer: not full,
            # a request of a length in between could still join it.
            out.append((chunk, is_full() or tokens + p.cost > policy.max_batch_tokens))
            chunk, tokens = [], 0
        chunk.append(p)
        tokens += p.cost
    if chunk:
        out.append((chunk, is_full()))
    return out


def select_batch(pending: Plan | Sequence[Pending], *, now: float, device_idle: bool, policy: BatchPolicy,
                 arriving: bool = False, free_slots: int = 1) -> tuple[list[Pending] | None, float, str]:
    """The batch to start now, or ``(None, seconds to wait before looking again)``, and why
    (``full``, ``idle``, ``time``, ``starved``).

    Requests are grouped by sampling settings; each group is sorted by prompt length and cut
    into batches. *When* to start: as soon as a batch is full; when the device is idle and no
    burst of requests is ``arriving``; or once the oldest request has waited ``max_wait_ms``
    (stretched up to ``burst_wait_factor`` times while a burst arrives, so it fills batches
    instead of leaving in fragments). *What* to start: the batch holding the highest job
    priority; among those, the one of the owner served least lately (``Plan.served``: owners
    share a priority fairly); then the largest (prompt + new tokens), since longest first keeps the
    device's replicas finishing together -- unless the oldest
    request has waited ``starvation_ms``, then its batch goes first whatever its size. When the
    last batch would leave replicas idle (``free_slots`` > 1, nothing else waiting, no burst
    arriving), it is split between them.
    """
    plan = pending if isinstance(pending, Plan) else Plan(pending)
    oldest = plan.oldest()
    waited = now - oldest.arrived
    max_wait, idle_wait, burst_wait = policy.waits()
    wait_s = burst_wait if arriving else max_wait
    largest: tuple[tuple[int, float, int], list[Pending]] | None = None
    any_full = False
    count = 0
    for key in plan.groups:
        for batch, full, (priority, tokens), owners in plan.batches(key, policy):
            count += 1
            if key == oldest.key and waited * 1000 >= policy.starvation_ms and any(p is oldest for p in batch):
                return batch, 0.0, "starved"
            any_full = any_full or full
            rank = (priority, -plan.share(owners), tokens)  # at equal priority, the least served owner first
            if largest is None or rank > largest[0]:
                largest = (rank, batch)
    assert largest is not None
    # An idle device still lets a burst gather first, and gives a lone request a moment's company
    # (not a synchronous call: someone is waiting on that one).
    if plan.interactive:
        idle_wait = 0.0
    idle = device_idle and not arriving and waited >= idle_wait
    if any_full or idle or waited >= wait_s:
        batch = largest[1]
        if count == 1 and free_slots > 1 and not arriving and len(batch) > 1:
            batch = batch[len(batch) // free_slots * (free_slots - 1):]  # the longest share
        return batch, 0.0, "full" if any_full else "idle" if idle else "time"
    until = idle_wait - waited if device_idle and not arriving else wait_s - waited
    return None, max(0.0005, min(until, max_wait)), ""


SPLIT = 4  # a dead run is retried a quarter at a time
GATHER_S = 1.0  # how long part of a dead run waits for the rest of it to arrive


def isolate(retried: Sequence[Pending], *, now: float) -> tuple[list[Pending] | None, float]:
    """The next batch to run of requests whose worker died running them: splitting the dead run.

    The requests of the oldest (highest priority) dead run that wait here, in request order:
    their first quarter (if it kills the worker again, that quarter is split next time; if not,
    the next quarter runs). When only part of that run is here, it first waits up to
    ``GATHER_S`` for the rest (its other messages are usually a moment behind; the rest may also
    have run already, or wait on another worker). ``(None, seconds to wait)`` while gathering. A batch of 64 with one request that kills
    its worker is done after about four deaths (64, 16, 4, 1) and a score of runs, the 63 others
    succeeding; only the killer, once alone, uses up its attempts (``core.jobs.claim``).
    Quarters rather than halves: each death costs a worker restart, and there are half as many.
    """
    first = min(retried, key=lambda p: (-p.priority, p.arrived))
    item = first.enc.item
    group = sorted((p for p in retried if p.enc.item.run_id == item.run_id and p.key == first.key),
                   key=lambda p: (p.enc.item.job_id, p.enc.item.idx))
    if len(group) < (item.run_size or 1):
        waited = now - min(p.arrived for p in group)
        if waited < GATHER_S:
            return None, GATHER_S - waited
    quarter = ((item.run_size or len(group)) + SPLIT - 1) // SPLIT  # of the dead run, not of what is left
    return group[:quarter], 0.0


