"""Where a worker's CPU goes: CTranslate2's own threads (the engine) against everything else.

Python threads (Celery's consumer and task threads, the batcher's intake, scheduler, slots and
recorder, the publishers) are known by their native ids; every other thread of the process was
started by CTranslate2 (its replicas) or the libraries under it. The step callback runs on
CTranslate2's threads, so its Python counts as engine time. Figures count from ``start()``
(after the model is loaded and calibrated), read from ``/proc/self/task`` (Linux).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu(stat_file: Path) -> float:
    fields = stat_file.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def split() -> tuple[float, float]:
    """(engine seconds, service seconds) of this process so far; (0, 0) where unsupported."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return 0.0, 0.0
    python = {t.native_id for t in threading.enumerate()}
    engine = 0.0
    for task in tasks.iterdir():
        if int(task.name) in python:
            continue
        try:
            engine += _cpu(task / "stat")
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    total = _cpu(Path("/proc/self/stat"))  # every thread, ended ones included
    return engine, total - engine


class CpuSplit:
    """Engine and service CPU since ``start``."""

    def __init__(self) -> None:
        self._base = (0.0, 0.0)

    def start(self) -> CpuSplit:
        self._base = split()
        return self

    def read(self) -> tuple[float, float]:
        engine, service = split()
        return max(0.0, engine - self._base[0]), max(0.0, service - self._base[1])
