"""Where a worker's CPU goes: CTranslate2's own threads (the engine) against the service's own
work, and that split by what it does.

Python threads are known by their native ids and names; every other thread of the process was
started by CTranslate2 (its replicas) or the libraries under it. The step callback runs on
CTranslate2's threads, so its Python counts as engine time. The service's parts:

- ``broker``: taking and acking messages (the consumer's fetcher and acker) and Celery's own loop;
- ``database``: the writer, the intake's reads, lease renewal, the reconciler;
- ``tokenizer``: encoding prompts (the intake's share that the batcher measures);
- ``scheduling``: choosing batches;
- ``generation``: the slots' Python around CTranslate2's calls (decoding, log probabilities);
- ``other``: metrics, announcements and the rest.

Figures count from ``start()`` (after the model is loaded and calibrated), read from
``/proc/self/task`` (Linux); a thread that ended takes its figures with it (the worker's threads
live as long as it does).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

PARTS = ("broker", "database", "tokenizer", "scheduling", "generation", "other")
_BY_THREAD = {"fetcher": "broker", "acker": "broker", "MainThread": "broker", "writer": "database",
              "intake": "database", "heartbeat": "database", "janitor": "database", "scheduler": "scheduling"}


def _cpu(task: Path) -> float:
    """A thread's (or process's) CPU seconds: from ``schedstat`` in nanoseconds where the kernel
    keeps it, else ``stat``'s utime + stime in clock ticks (10 ms: too coarse to split a few
    milliseconds per request)."""
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK


def _part(name: str) -> str:
    if name.startswith("slot"):
        return "generation"
    return _BY_THREAD.get(name, "other")


def split(tokenizer_s: float = 0.0) -> dict[str, float]:
    """CPU seconds of this process so far: ``engine`` and each service part (empty where
    unsupported). ``tokenizer_s``: the intake's time spent encoding, moved from ``database``."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return {}
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = dict.fromkeys(("engine", *PARTS), 0.0)
    for task in tasks.iterdir():
        try:
            seconds = _cpu(task)
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        name = names.get(int(task.name))
        out["engine" if name is None else _part(name)] += seconds
    moved = min(tokenizer_s, out["database"])
    out["tokenizer"] += moved
    out["database"] -= moved
    return out


class CpuSplit:
    """The split since ``start``; ``tokenizer_s()`` tells the intake's encoding time so far."""

    def __init__(self, tokenizer_s: Callable[[], float] = lambda: 0.0) -> None:
        self.tokenizer_s = tokenizer_s
        self._base: dict[str, float] = {}

    def start(self) -> CpuSplit:
        self._base = split(self.tokenizer_s())
        return self

    def read(self) -> dict[str, float]:
        """Seconds per part since ``start``, and ``service``: every part but the engine."""
        now = split(self.tokenizer_s())
        out = {part: max(0.0, now.get(part, 0.0) - self._base.get(part, 0.0)) for part in now}
        out["service"] = sum(v for k, v in out.items() if k != "engine")
        return out
