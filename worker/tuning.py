"""The batcher keeps measuring: it learns tokens/s per batch size from its own batches and moves
its token budget when what it measures proves another one better.

Calibration measures the device on synthetic prompts once; service then differs: prompts get
longer or shorter, another process takes a core, outputs stop early. So the tuner:

- keeps, per batch size (batch tokens rounded to a ladder of budgets, factors of two around the
  calibrated one), a recent average of output tokens/s per replica, counting the service's own
  work per batch (``overhead_s``, as calibration does), from batches that ran with every replica
  busy (a batch running alone at the end of a burst is faster and would flatter its size);
- compares what it sees with what the calibration expects for batches of that many requests of
  that prompt length (``ratio``, a metric): a ratio far from 1 means the calibration no longer
  describes the work;
- probes: after ``probe_every`` batches (at once when the ratio departs by more than
  ``depart``), it tries the budget one step up or down (alternating directions), cutting batches
  at the current and the probed budget by turns (``taken``), so that both see the same work at
  the same moment, until ``probe_pairs`` batches of each were measured. It moves only if the
  probed budget did better in at least ``wins`` of the pairs and by ``gain`` in their median: a
  machine whose speed wanders by tens of percent from one batch to the next, or the service's own
  overhead, cannot make it move, while a device that truly does better elsewhere does.

A budget given explicitly in the settings is never moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tps: float = 0.0
    count: int = 0
    seconds: float = 0.0  # recent duration of a batch of this size


@dataclass
class Move:
    """A change of budget, for the log and metrics."""

    old: int
    new: int
    reason: str


@dataclass
class OnlineTuner:
    """Online choice of ``max_batch_tokens`` (and ``max_batch_size`` in proportion)."""

    budget: int
    max_batch_size: int
    expected: Callable[[float, float], float] | None = None  # (batch size, prompt tokens) -> tokens/s
    batch_seconds: float = 0.0  # expected duration of a full batch at ``budget``
    frozen: bool = False  # explicit settings: observe, never move
    slots: int = 1  # batches the device runs at once; only batches with all of them busy teach
    replicas: int = 1  # CTranslate2 replicas: with more slots than replicas, batches queue inside it
    size_cap: int = 0  # an explicit max_batch_size: never more requests per batch than this
    overhead_s: float = 0.0  # the service's own time per batch (worker.calibration.BATCH_OVERHEAD_S)
    min_budget: int = 64
    max_budget: int = 1 << 17
    probe_every: int = 64
    probe_pairs: int = 10  # batches measured at each of the two budgets a probe compares
    wins: int = 9  # pairs the probed budget must win to be taken (by chance: 1% of probes)
    probe_patience: int = 40  # batches a probe may wait for its pairs before giving up
    gain: float = 1.08
    depart: float = 1.3
    alpha: float = 0.3
    ratio: float = 1.0  # recent observed / expected
    moves: list[Move] = field(default_factory=list)
    _buckets: dict[int, _Bucket] = field(default_factory=dict)
    _since_probe: int = 0
    _probe: int | None = None  # the budget being tried
    _probe_waited: int = 0
    _turn: int = 0  # batches cut since the probe began: odd ones at the probed budget
    _trial: dict[int, list[float]] = field(default_factory=dict)  # budget -> tokens/s seen in the probe
    _direction: int = -1
    _base_size: float = 0.0
    _home: int = 0
    _settled: float = 1.0  # the ratio the last probe ended at: departures are measured from it

    def __post_init__(self) -> None:
        self._base_size = self.max_batch_size / max(1, self.budget)
        self._home = self.budget

    # --- what the batcher reads ---------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The token budget the next batch is cut to (while a probe runs: the current and the
        probed budget by turns)."""
        return self._probe if self._probe is not None and self._turn % 2 else self.budget

    def taken(self) -> None:
        """A batch was cut at ``limit``: during a probe the next one is cut at the other budget."""
        if self._probe is not None:
            self._turn += 1

    @property
    def size_limit(self) -> int:
        """Requests per batch, in proportion to the budget in force (at most an explicit cap)."""
        size = max(1, round(self._base_size * self.limit))
        return min(size, self.size_cap) if self.size_cap else size

    def failed(self, batch_tokens: int) -> None:
        """A batch this big failed (out of memory, say): never try one this big again."""
        self.max_budget = max(self.min_budget, min(self.max_budget, batch_tokens // 2))
        if self._probe is not None and self._probe > self.max_budget:
            self._probe = None
        if self.budget > self.max_budget:
            old, self.budget = self.budget, self._level(self.max_budget)
            self.moves.append(Move(old, self.budget, f"a batch of {batch_tokens} tokens failed"))

    @property
    def typical_batch_seconds(self) -> float:
        """How long a full batch takes, as last seen (the calibration's figure until then)."""
        seen = self._buckets.get(self._level(self.budget))
        return seen.seconds if seen is not None and seen.count else self.batch_seconds

    # --- learning -----------------------------------------------------------------------------

    def _level(self, tokens: float) -> int:
        """The ladder step a batch of ``tokens`` belongs to: budget x 2^k, nearest in log."""
        k = round(math.log2(max(1.0, tokens) / self._home))
        return max(self.min_budget, min(self.max_budget, int(self._home * 2.0 ** k)))

    def observe(self, *, batch_tokens: int, requests: int, prompt_tokens: float, new_tokens: int,
                seconds: float, concurrent: int = 1, cut_at: int | None = None) -> Move | None:
        """Learn from one finished batch; returns the move it caused, if any. ``cut_at``: the budget
        a full batch was cut to (a probe credits it to that budget; 0: not a full batch, which a
        probe does not count); None: taken from the batch's size."""
        if seconds <= 0 or new_tokens <= 0:
            return None
        tps = new_tokens / (seconds + self.overhead_s) * max(1, concurrent)
        if self.expected is not None:
            want = self.expected(requests, prompt_tokens)
            if want > 0:
                self.ratio = (1 - self.alpha) * self.ratio + self.alpha * (new_tokens / seconds * concurrent / want)
        if concurrent < self.slots:
            return None  # not the steady state: no lesson about its size
        level = self._level(batch_tokens)
        b = self._buckets.setdefault(level, _Bucket())
        b.tps = tps if b.count == 0 else (1 - self.alpha) * b.tps + self.alpha * tps
        # With more slots than replicas a batch also waits inside CTranslate2 for the one before.
        own = seconds / max(1, math.ceil(concurrent / max(1, self.replicas)))
        b.seconds = own if b.count == 0 else (1 - self.alpha) * b.seconds + self.alpha * own
        b.count += 1
        if self.frozen:
            return None
        return self._decide(level if cut_at is None else cut_at, tps)

    def _decide(self, level: int, tps: float) -> Move | None:
        if self._probe is not None:
            self._probe_waited += 1
            if level in (self.budget, self._probe):
                self._trial.setdefault(level, []).append(tps)
            if all(len(self._trial.get(b, ())) >= self.probe_pairs for b in (self.budget, self._probe)):
                return self._conclude()
            if self._probe_waited >= self.probe_patience:  # not enough work to fill both sizes
                self._probe = None
            return None
        self._since_probe += 1
        departed = abs(math.log(max(1e-6, self.ratio / self._settled))) > math.log(self.depart)
        if self._since_probe >= self.probe_every or (departed and self._since_probe >= self.probe_pairs):
            self._start_probe()
        return None

    def _start_probe(self) -> None:
        self._since_probe = 0
        for direction in (self._direction, -self._direction):
            target = self._level(self.budget * 2.0 ** direction)
            if target != self.budget and target <= self.max_budget:
                self._direction = -direction  # alternate next time
                self._probe, self._probe_waited, self._turn, self._trial = target, 0, 0, {}
                return

    def _conclude(self) -> Move | None:
        """Compare the two budgets batch by batch, in the order they ran (pairs close in time)."""
        assert self._probe is not None
        probe, self._probe = self._probe, None
        self._settled = self.ratio  # what is seen now is explained by this budget or the probed one
        pairs = list(zip(self._trial[self.budget], self._trial[probe], strict=False))[:self.probe_pairs]
        ratios = sorted(there / here for here, there in pairs if here > 0)
        won = sum(r > 1 for r in ratios)
        median = ratios[len(ratios) // 2] if ratios else 0.0
        if won >= self.wins and median >= self.gain:
            old, self.budget = self.budget, probe
            move = Move(old, probe, f"{probe} tokens per batch did better than {old} in {won} of {len(ratios)} "
                                    f"alternated batches, by {median:.2f}x in the median")
            self.moves.append(move)
            self._direction = 1 if probe > old else -1  # keep going the way that paid
            return move
        return None

    def state(self) -> dict[str, float]:
        """For metrics and logs."""
        return {"max_batch_tokens": float(self.limit), "max_batch_size": float(self.size_limit),
                "calibration_ratio": self.ratio, "moves": float(len(self.moves))}
