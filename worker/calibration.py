"""Calibration: the worker measures its model on its device and picks its batch limits from that.

The best batching differs by processor (on two 2-core machines the best budget was 768 and 2,048
prompt+new tokens per batch), by GPU, by model and by compute type, so no constant carries. Before
a worker serves, it measures output tokens/s with fixed-length outputs on synthetic prompts made
of the model's own vocabulary:

1. **Layouts and compute types** (held fixed where settings give them): on CPU every way to split
   the cores between CTranslate2 replicas (``inter_threads``) and threads per replica
   (``intra_threads``), then every int8-family compute type the device supports, each on one
   mid-sized batch per replica; the fastest is kept.
2. **The curve**: for a short and a long prompt shape, batch sizes doubling from 1 until
   throughput falls clearly past its peak, a batch runs out of memory, or the time budget is spent.
   Every replica gets a batch at once, as in service.
3. **The choice** (``choose``): the token budget (prompt + new tokens per batch) that does best
   over both shapes, the smallest within 3% of the best (lower latency and memory for the same
   throughput); at most as many requests as the short shape gained from.

The result is cached on disk under a key of model, device, processor or GPU name, compute type,
thread settings, CTranslate2 version and this procedure's version: the next start reads it at
once. Settings given explicitly win over what was measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("batchgen.calibration")

VERSION = 1  # bump when the procedure changes: cached results of older ones are measured again
INT8_FAMILY = ("int8_float16", "int8_bfloat16", "int8", "int8_float32")
# What CTranslate2 takes as a compute type (a cached choice holding anything else is measured again).
COMPUTE_TYPES = (*INT8_FAMILY, "int16", "float16", "bfloat16", "float32", "default", "auto")
NEAR_BEST = 0.97  # a smaller budget within this share of the best score is preferred
SAMPLING = {"sampling_topk": 50, "sampling_topp": 0.9, "sampling_temperature": 0.8}


@dataclass(frozen=True)
class Plan:
    """What to measure on one device."""

    device: str
    layouts: list[tuple[int, int]]  # (inter_threads, intra_threads)
    compute_types: list[str]  # the first is the default
    shapes: list[int]  # prompt tokens per request: short, long
    new_tokens: int
    batch_sizes: list[int]  # tried in order, per replica
    screen_batch: int  # batch size of the layout/compute-type screening
    budget_s: float
    min_trial_s: float = 0.4  # a quick trial is repeated until this much time (at most 7 runs)


@dataclass(frozen=True)
class Trial:
    """One measurement: ``batches`` batches of ``batch_size`` requests run at once."""

    compute_type: str
    inter_threads: int
    intra_threads: int
    prompt_tokens: int
    new_tokens: int
    batch_size: int
    batches: int
    seconds: float
    tokens_per_s: float  # output tokens per second, all batches together
    phase: str = "curve"  # "screen" or "curve"
    error: str = ""

    @property
    def batch_tokens(self) -> int:
        return self.batch_size * (self.prompt_tokens + self.new_tokens)


@dataclass(frozen=True)
class Choice:
    """How the worker runs: its layout, compute type and batch limits."""

    compute_type: str
    inter_threads: int
    intra_threads: int
    max_batch_size: int
    max_batch_tokens: int
    tokens_per_s: float  # expected at this choice (mean over the measured shapes)
    batch_seconds: float  # expected duration of a full batch

    def problems(self) -> list[str]:
        """Why a worker could not run with this choice (read from a cache file anyone with access
        to the disk may have edited): empty when it can."""
        found = []
        for name, low, high in (("inter_threads", 1, 1024), ("intra_threads", 0, 1024), ("max_batch_size", 1, 65536),
                                ("max_batch_tokens", 1, 1 << 26)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                found.append(f"{name} is {value!r}, not a whole number from {low} to {high}")
        if not isinstance(self.compute_type, str) or self.compute_type not in COMPUTE_TYPES:
            found.append(f"compute_type {self.compute_type!r} is not one of CTranslate2's")
        for name in ("tokens_per_s", "batch_seconds"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                found.append(f"{name} is {value!r}, not a finite number of at least 0")
        return found


@dataclass
class Calibration:
    """A device's measurements for one model and the choice made from them."""

    key: dict[str, Any]
    trials: list[Trial]
    choice: Choice
    seconds: float
    measured_at: str
    source: str = "measured"  # or "cached" once read back

    def to_json(self) -> str:
        data = {"key": self.key, "trials": [asdict(t) for t in self.trials], "choice": asdict(self.choice),
                "seconds": self.seconds, "measured_at": self.measured_at}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        data = json.loads(text)
        return cls(key=data["key"], trials=[Trial(**t) for t in data["trials"]], choice=Choice(**data["choice"]),
                   seconds=data["seconds"], measured_at=data["measured_at"], source="cached")

    def curve(self, prompt_tokens: int) -> list[Trial]:
        """The curve trials of one shape with the chosen layout and compute type, by batch size."""
        c = self.choice
        return sorted((t for t in self.trials if t.phase == "curve" and not t.error
                       and t.prompt_tokens == prompt_tokens and t.compute_type == c.compute_type
                       and (t.inter_threads, t.intra_threads) == (c.inter_threads, c.intra_threads)),
                      key=lambda t: t.batch_size)

    def largest_batch(self) -> int:
        """Prompt + new tokens of the largest batch measured without error."""
        return max((t.batch_tokens for t in self.trials if not t.error), default=self.choice.max_batch_tokens)

    @property
    def shapes(self) -> list[int]:
        return sorted({t.prompt_tokens for t in self.trials if t.phase == "curve"})

    def expected(self, batch_size: float, prompt_tokens: float) -> float:
        """Expected output tokens/s (all replicas busy) of batches of ``batch_size`` requests with
        prompts of ``prompt_tokens``: between the measured shapes, interpolated in log length."""
        points = [(float(length), _interpolate([(float(t.batch_size), t.tokens_per_s) for t in curve],
                                               max(1.0, batch_size)))
                  for length in self.shapes if (curve := self.curve(length))]
        return _interpolate(points, max(1.0, prompt_tokens))

    def table(self) -> str:
        """The measurements as a text table, the choice last."""
        rows = [f"{'phase':<7}{'compute':<14}{'inter':>6}{'intra':>6}{'prompt':>8}{'batch':>7}{'tokens':>8}"
                f"{'seconds':>9}{'tokens/s':>10}"]
        for t in self.trials:
            tps = f"{t.tokens_per_s:>10.0f}" if not t.error else f"  {t.error[:40]}"
            rows.append(f"{t.phase:<7}{t.compute_type:<14}{t.inter_threads:>6}{t.intra_threads:>6}"
                        f"{t.prompt_tokens:>8}{t.batch_size:>7}{t.batch_tokens:>8}{t.seconds:>9.3f}{tps}")
        c = self.choice
        rows.append(f"chosen: {c.compute_type}, inter_threads={c.inter_threads}, intra_threads={c.intra_threads}, "
                    f"max_batch_tokens={c.max_batch_tokens}, max_batch_size={c.max_batch_size} "
                    f"(expected {c.tokens_per_s:.0f} tokens/s, {c.batch_seconds * 1000:.0f} ms a batch); "
                    f"measured in {self.seconds:.1f} s")
        return "\n".join(rows)


# --- what to measure -----------------------------------------------------------------------


def cpu_count() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_layouts(cores: int) -> list[tuple[int, int]]:
    """Every split of the cores into replicas x threads (one replica per core first)."""
    return [(cores // intra, intra) for intra in range(1, cores + 1) if cores % intra == 0]


def make_plan(*, device: str, context_length: int, compute_type: str = "auto", inter_threads: int = 0,
              intra_threads: int = 0, supported: Sequence[str] = (), budget_s: float = 30.0) -> Plan:
    """The measurements for a device; explicit settings (non-zero, not ``auto``) are held fixed."""
    if device == "cuda":
        default_ct, shapes, new_tokens = "int8_float16", [64, 512], 64
        sizes, screen = [1, 2, 4, 8, 16, 32, 64, 128, 256], 32
        layouts = [(inter_threads or 1, intra_threads or 1)]
    else:
        default_ct, shapes, new_tokens = "int8", [32, 160], 32
        sizes, screen = [1, 2, 4, 8, 16, 32, 64], 8
        cores = cpu_count()
        if inter_threads or intra_threads:
            inter = inter_threads or max(1, cores // (intra_threads or 1))
            layouts = [(inter, intra_threads or max(1, cores // inter))]
        else:
            layouts = cpu_layouts(cores)
    if compute_type != "auto":
        types = [compute_type]
    else:
        family = [t for t in INT8_FAMILY if t in supported] or [default_ct]
        types = sorted(family, key=lambda t: t != default_ct)
    room = max(8, context_length - new_tokens)
    shapes = sorted({min(s, room // 2 if i == 0 else room) for i, s in enumerate(shapes)})
    return Plan(device=device, layouts=layouts, compute_types=types, shapes=shapes, new_tokens=new_tokens,
                batch_sizes=sizes, screen_batch=screen, budget_s=budget_s)


def device_name(device: str, physical_index: int = 0) -> str:
    """The processor or GPU model, as part of the cache key."""
    if device == "cuda":
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                out = subprocess.run([smi, f"--id={physical_index}", "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10)
                if out.returncode == 0 and out.stdout.strip():
                    return out.stdout.strip().splitlines()[0]
            except (OSError, subprocess.SubprocessError):
                pass
        return "cuda (unknown GPU)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x{cpu_count()}"


def model_fingerprint(model_dir: Path) -> str:
    """Changes when the model's weights are replaced (size and modification time of model.bin)."""
    st = (model_dir / "model.bin").stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def cache_key(*, model: str, model_dir: Path, device: str, physical_index: int, compute_type: str,
              inter_threads: int, intra_threads: int, ctranslate2_version: str, context_length: int = 0,
              budget_s: float = 0.0) -> dict[str, Any]:
    """Everything a calibration depends on; a change in any of it means measuring again."""
    return {"model": model, "weights": model_fingerprint(model_dir), "device": device,
            "device_name": device_name(device, physical_index), "compute_type": compute_type,
            "inter_threads": inter_threads, "intra_threads": intra_threads, "context_length": context_length,
            "budget_s": budget_s, "ctranslate2": ctranslate2_version, "procedure": VERSION}


def cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(key["model"]))
    return cache_dir / f"{safe}-{key['device']}-{digest}.json"


def load_cached(cache_dir: Path, key: dict[str, Any]) -> Calibration | None:
    """The cached calibration for exactly this key, or None (also when the file holds a choice a
    worker could not run with, such as ``inter_threads: 0``: it is measured again and rewritten)."""
    path = cache_path(cache_dir, key)
    try:
        found = Calibration.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        log.warning("the cached calibration %s cannot be read (%s): measuring again", path, type(exc).__name__)
        return None
    if found.key != key:
        return None
    problems = found.choice.problems() + [
        f"trial {n} holds {t!r}" for n, t in enumerate(found.trials)
        if not all(type(getattr(t, f)) is int and getattr(t, f) >= 0 for f in (
            "inter_threads", "intra_threads", "prompt_tokens", "new_tokens", "batch_size", "batches"))
        or not all(type(getattr(t, f)) in (int, float) and math.isfinite(getattr(t, f)) and getattr(t, f) >= 0
                   for f in ("seconds", "tokens_per_s"))]
    if problems:
        log.warning("the cached calibration %s is not valid (%s): measuring again", path, "; ".join(problems))
        return None
    return found


def save(cache_dir: Path, calibration: Calibration) -> Path:
    """Write a calibration where ``load_cached`` finds it (atomically)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_path(cache_dir, calibration.key)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two workers calibrating at once do not clash
    tmp.write_text(calibration.to_json())
    tmp.replace(path)
    return path


# --- measuring -----------------------------------------------------------------------------


Measure = Callable[[str, int, int, int, int, int, int], float]
"""``measure(compute_type, inter, intra, prompt_tokens, new_tokens, batch_size, batches)`` ->
seconds for ``batches`` batches run at once (raises on failure, e.g. out of memory)."""


class Bench:
    """Runs trials on real CTranslate2 generators, one loaded at a time."""

    def __init__(self, model_dir: Path, *, device: str, device_index: int = 0, seed: int = 0) -> None:
        import ctranslate2

        self.ct2 = ctranslate2
        self.model_dir, self.device, self.device_index = Path(model_dir), device, device_index
        vocabulary: list[str] = json.loads((self.model_dir / "vocabulary.json").read_text())
        # Ordinary tokens only: no specials, no byte-fallback pieces.
        self.words = [t for t in vocabulary if not (t.startswith("<") and t.endswith(">"))] or vocabulary
        self.bos = "<s>" if "<s>" in vocabulary else vocabulary[1]
        self.rng = random.Random(seed)
        self._loaded: tuple[tuple[str, int, int], Any] | None = None

    def generator(self, compute_type: str, inter: int, intra: int) -> Any:
        wanted = (compute_type, inter, intra)
        if self._loaded is None or self._loaded[0] != wanted:
            self._loaded = None  # free the previous one first (GPU memory)
            gen = self.ct2.Generator(str(self.model_dir), device=self.device, device_index=self.device_index,
                                     compute_type=compute_type, inter_threads=inter, intra_threads=intra)
            gen.generate_batch([[self.bos, self.words[0]]] * max(1, inter), max_length=2)  # warm up
            self._loaded = (wanted, gen)
        return self._loaded[1]

    def prompt(self, length: int) -> list[str]:
        return [self.bos, *(self.rng.choice(self.words) for _ in range(length - 1))]

    def __call__(self, compute_type: str, inter: int, intra: int, prompt_tokens: int, new_tokens: int,
                 batch_size: int, batches: int) -> float:
        gen = self.generator(compute_type, inter, intra)
        work = [[self.prompt(prompt_tokens) for _ in range(batch_size)] for _ in range(batches)]
        started = time.perf_counter()
        pending = [gen.generate_batch(b, max_length=new_tokens, min_length=new_tokens, asynchronous=True,
                                      include_prompt_in_result=False, **SAMPLING) for b in work]
        for results in pending:
            for r in results:
                r.result()
        return time.perf_counter() - started

    def close(self) -> None:
        self._loaded = None


def run(plan: Plan, measure: Measure, *, clock: Callable[[], float] = time.monotonic) -> tuple[list[Trial], float]:
    """Carry out a plan; returns the trials and the seconds it took."""
    started = clock()
    trials: list[Trial] = []

    def trial(ct: str, layout: tuple[int, int], length: int, size: int, phase: str) -> Trial:
        inter, intra = layout
        batches = max(1, inter)
        try:
            runs = [measure(ct, inter, intra, length, plan.new_tokens, size, batches)]
            while sum(runs) < plan.min_trial_s and len(runs) < 7:  # fast ones: the median of several
                runs.append(measure(ct, inter, intra, length, plan.new_tokens, size, batches))
            seconds = sorted(runs)[len(runs) // 2]
            t = Trial(ct, inter, intra, length, plan.new_tokens, size, batches, seconds,
                      size * batches * plan.new_tokens / seconds, phase)
        except Exception as exc:  # out of memory, unsupported type: recorded, not fatal
            t = Trial(ct, inter, intra, length, plan.new_tokens, size, batches, 0.0, 0.0, phase,
                      error=f"{type(exc).__name__}: {exc}"[:200])
        trials.append(t)
        return t

    short = plan.shapes[0]
    # 1. Layouts with the default compute type, then compute types with the best layout.
    layout, ct = plan.layouts[0], plan.compute_types[0]
    if len(plan.layouts) > 1 or len(plan.compute_types) > 1:
        # Another layout or compute type must beat the first (the device's default) clearly:
        # a tie within measurement noise keeps the default.
        screened = [trial(ct, lay, short, plan.screen_batch, "screen") for lay in plan.layouts]
        best = _clear_winner(screened)
        layout = (best.inter_threads, best.intra_threads)
        typed = [best] + [trial(other, layout, short, plan.screen_batch, "screen")
                          for other in plan.compute_types[1:]]
        ct = _clear_winner(typed).compute_type
    # 2. The curve of each shape, batch sizes doubling until past the peak or out of time.
    for i, length in enumerate(plan.shapes):
        best_tps = 0.0
        for size in plan.batch_sizes:
            spent = clock() - started
            share = plan.budget_s * (i + 1) / len(plan.shapes)  # the long shape may use what is left
            if spent > share and size > 2:
                break
            t = trial(ct, layout, length, size, "curve")
            if t.error:
                break
            best_tps = max(best_tps, t.tokens_per_s)
            if t.tokens_per_s < 0.85 * best_tps or t.seconds > plan.budget_s / 6:
                break  # clearly past the peak, or the next (twice as big) would take too long
    return trials, clock() - started


def _clear_winner(trials: list[Trial], margin: float = 1.03) -> Trial:
    """The fastest trial if it beats the first by ``margin``, else the first."""
    best = max(trials, key=lambda t: t.tokens_per_s)
    return best if best.tokens_per_s > margin * trials[0].tokens_per_s else trials[0]


# --- choosing ------------------------------------------------------------------------------

# The service's own work per batch (claiming, recording, scheduling: 3-6 ms of CPU per batch in
# bench/throughput.py's demo rows, on the same cores as the model). Counting it keeps a fast
# device from choosing batches so short that this work, not the model, sets the pace. It is a
# property of batchgen's code more than of the device; the tuner counts it the same way.
BATCH_OVERHEAD_S = 0.005


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Linear in log2(x) between measured points; flat outside them."""
    if not points:
        return 0.0
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            f = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return y0 + f * (y1 - y0)
    return points[-1][1]


def _shape_curves(trials: Sequence[Trial], ct: str, layout: tuple[int, int]) -> dict[int, list[Trial]]:
    curves: dict[int, list[Trial]] = {}
    for t in trials:
        if t.phase == "curve" and not t.error and t.compute_type == ct and (t.inter_threads, t.intra_threads) == layout:
            curves.setdefault(t.prompt_tokens, []).append(t)
    return {k: sorted(v, key=lambda t: t.batch_size) for k, v in curves.items()}


def budget_score(calibration: Calibration | Sequence[Trial], budget: float, *, ct: str | None = None,
                 layout: tuple[int, int] | None = None,
                 overhead_s: float = BATCH_OVERHEAD_S) -> tuple[float, float, float]:
    """(expected tokens/s, share of each shape's best, expected batch seconds) at a token budget,
    averaged over the measured prompt shapes, with ``overhead_s`` added to every batch."""
    if isinstance(calibration, Calibration):
        trials, c = calibration.trials, calibration.choice
        ct, layout = c.compute_type, (c.inter_threads, c.intra_threads)
    else:
        trials = calibration
    assert ct is not None and layout is not None
    curves = _shape_curves(trials, ct, layout)
    if not curves:
        return 0.0, 0.0, 0.0
    tps, share, secs = [], [], []
    for length, curve in curves.items():
        size = budget / (length + curve[0].new_tokens)
        tps_points = [(float(t.batch_size), t.tokens_per_s * t.seconds / (t.seconds + overhead_s)) for t in curve]
        sec_points = [(float(t.batch_size), t.seconds) for t in curve]
        y = _interpolate(tps_points, max(1.0, size))
        tps.append(y)
        share.append(y / max(p[1] for p in tps_points))
        secs.append(_interpolate(sec_points, max(1.0, size)))
    n = len(curves)
    return sum(tps) / n, sum(share) / n, sum(secs) / n


def choose(trials: Sequence[Trial]) -> Choice:
    """The layout, compute type and batch limits the trials argue for (see the module docs)."""
    good = [t for t in trials if not t.error and t.tokens_per_s > 0]
    if not good:
        raise ValueError("no calibration trial succeeded")
    curve_trials = [t for t in good if t.phase == "curve"] or good
    # The layout and type the curve was measured with (the screening's winner).
    first = curve_trials[0]
    ct, layout = first.compute_type, (first.inter_threads, first.intra_threads)
    curves = _shape_curves(curve_trials, ct, layout) or {first.prompt_tokens: [first]}
    candidates = sorted({t.batch_tokens for c in curves.values() for t in c})
    scored = [(b, *budget_score(curve_trials, b, ct=ct, layout=layout)) for b in candidates]
    top = max(s[2] for s in scored)
    budget, tps, _, seconds = next(s for s in scored if s[2] >= NEAR_BEST * top)
    short = curves[min(curves)]
    per_request = short[0].prompt_tokens + short[0].new_tokens
    # Requests per batch: what the budget holds of short prompts, but no more than the short
    # curve gained from (beyond that, more requests only add latency).
    best_short = max(short, key=lambda t: t.tokens_per_s)
    gainful = min((t.batch_size for t in short if t.tokens_per_s >= NEAR_BEST * best_short.tokens_per_s),
                  default=best_short.batch_size)
    size_cap = max(gainful, min(max(t.batch_size for t in short), math.ceil(budget / per_request)))
    return Choice(compute_type=ct, inter_threads=layout[0], intra_threads=layout[1],
                  max_batch_size=max(1, size_cap), max_batch_tokens=int(budget), tokens_per_s=tps,
                  batch_seconds=seconds)


def calibrate(plan: Plan, measure: Measure, key: dict[str, Any]) -> Calibration:
    """Measure per ``plan`` and choose."""
    trials, seconds = run(plan, measure)
    return Calibration(key=key, trials=trials, choice=choose(trials), seconds=seconds,
                       measured_at=datetime.now(UTC).isoformat(timespec="seconds"))


def for_worker(*, model: str, model_dir: Path, device: str, device_index: int, physical_index: int,
               context_length: int, compute_type: str, inter_threads: int, intra_threads: int,
               cache_dir: Path, mode: str = "auto", budget_s: float = 30.0) -> Calibration:
    """The calibration a worker starts with: the cached one for this key, or measured now
    (``mode="force"`` always measures) and cached."""
    import ctranslate2

    key = cache_key(model=model, model_dir=model_dir, device=device, physical_index=physical_index,
                    compute_type=compute_type, inter_threads=inter_threads, intra_threads=intra_threads,
                    ctranslate2_version=ctranslate2.__version__, context_length=context_length, budget_s=budget_s)
    if mode != "force":
        cached = load_cached(cache_dir, key)
        if cached is not None:
            log.info("calibration of %s on %s read from the cache (measured %s): %s", model, key["device_name"],
                     cached.measured_at, _summary(cached.choice))
            return cached
    supported = sorted(ctranslate2.get_supported_compute_types(device, device_index))
    plan = make_plan(device=device, context_length=context_length, compute_type=compute_type,
                     inter_threads=inter_threads, intra_threads=intra_threads, supported=supported,
                     budget_s=budget_s)
    log.info("calibrating %s on %s (%s): layouts %s, compute types %s, prompts of %s tokens, %d new tokens",
             model, key["device_name"], device, plan.layouts, plan.compute_types, plan.shapes, plan.new_tokens)
    bench = Bench(model_dir, device=device, device_index=device_index)
    try:
        result = calibrate(plan, bench, key)
    finally:
        bench.close()
    for line in result.table().splitlines():
        log.info("calibration: %s", line)
    try:
        save(cache_dir, result)
    except OSError as exc:
        log.warning("could not cache the calibration in %s: %s", cache_dir, exc)
    return result


def _summary(c: Choice) -> str:
    return (f"{c.compute_type}, inter_threads={c.inter_threads}, intra_threads={c.intra_threads}, "
            f"max_batch_tokens={c.max_batch_tokens}, max_batch_size={c.max_batch_size}")


@dataclass
class PlotData:
    """What ``plot`` draws (kept apart so it can be tested without matplotlib)."""

    lines: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    chosen: int = 0


def plot_data(calibration: Calibration) -> PlotData:
    data = PlotData(chosen=calibration.choice.max_batch_tokens)
    for length in calibration.shapes:
        data.lines[f"prompts of {length} tokens"] = [(t.batch_tokens, t.tokens_per_s) for t in calibration.curve(length)]
    return data


def plot(calibration: Calibration, path: Path) -> Path:
    """Write the curve as a PNG: output tokens/s over prompt+new tokens per batch, the choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = plot_data(calibration)
    c = calibration.choice
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, points in data.lines.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axvline(data.chosen, color="grey", linestyle="--", label=f"chosen: {data.chosen} tokens per batch")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt + new tokens per batch")
    ax.set_ylabel("output tokens/s (all replicas)")
    key = calibration.key
    ax.set_title(f"{key['model']} on {key['device_name']}\n{c.compute_type}, inter_threads={c.inter_threads}, "
                 f"intra_threads={c.intra_threads}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
