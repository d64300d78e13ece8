"""Devices: pinning a process to one GPU, and how a worker uses its device.

A worker measures its device before it serves (``worker.calibration``) and runs with what it
measured; the fixed defaults here are for ``BATCHGEN_CALIBRATE=off`` and for a failed calibration:
- CPU: ``int8``, one single-threaded CTranslate2 replica per core (``inter_threads`` = cores,
  ``intra_threads=1``) and as many batches in flight as replicas.
- CUDA: ``int8_float16``, one replica, two batches in flight (one generating, the next queued
  behind it in CTranslate2 so the GPU never waits for Python).
Settings given explicitly win over both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from core.settings import Settings


@dataclass(frozen=True)
class DevicePlan:
    """How a worker process uses its device."""

    device: str
    device_index: int  # index as CTranslate2 sees it, after pinning
    physical_index: int  # index on the machine
    compute_type: str
    inter_threads: int
    intra_threads: int
    slots: int
    max_batch_size: int
    max_batch_tokens: int
    batch_seconds: float = 0.0  # expected duration of a full batch (0: unknown)
    source: str = "defaults"  # where the limits came from: defaults, measured, cached


def apply_choice(plan: DevicePlan, choice: Any, settings: Settings, source: str) -> DevicePlan:
    """``plan`` with a calibration's choice (``worker.calibration.Choice``); settings given
    explicitly still win."""
    inter = settings.inter_threads or choice.inter_threads
    return replace(
        plan, compute_type=choice.compute_type if settings.compute_type == "auto" else settings.compute_type,
        inter_threads=inter, intra_threads=settings.intra_threads or choice.intra_threads,
        slots=inter + 1 if plan.device == "cuda" else inter,
        max_batch_size=settings.max_batch_size or choice.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens or choice.max_batch_tokens,
        batch_seconds=choice.batch_seconds, source=source,
    )


def fully_explicit(settings: Settings) -> bool:
    """Nothing is left to measure: layout, compute type and both batch limits are set."""
    layout = settings.device == "cuda" or bool(settings.inter_threads and settings.intra_threads)
    return (layout and settings.compute_type != "auto" and bool(settings.max_batch_size)
            and bool(settings.max_batch_tokens))


def pin_cuda_device(index: int) -> None:
    """Make GPU ``index`` the only one this process can see; call before CUDA is initialised."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    # Deterministic numbering (PCI order) so index N here is N in nvidia-smi.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def plan_device(settings: Settings) -> DevicePlan:
    """The plan for ``settings.device``; explicit settings win over the defaults."""
    if settings.device == "cuda":
        compute = "int8_float16" if settings.compute_type == "auto" else settings.compute_type
        inter = settings.inter_threads or 1
        return DevicePlan(
            device="cuda", device_index=0, physical_index=settings.device_index, compute_type=compute,
            inter_threads=inter, intra_threads=settings.intra_threads or 1, slots=inter + 1,
            max_batch_size=settings.max_batch_size or 64,
            max_batch_tokens=settings.max_batch_tokens or 65536,
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    compute = "int8" if settings.compute_type == "auto" else settings.compute_type
    inter = settings.inter_threads or max(1, min(cores, 8))
    intra = settings.intra_threads or max(1, cores // inter)
    return DevicePlan(
        device="cpu", device_index=0, physical_index=0, compute_type=compute, inter_threads=inter,
        intra_threads=intra, slots=inter, max_batch_size=settings.max_batch_size or 16,
        max_batch_tokens=settings.max_batch_tokens or 768,
    )


def memory_in_use(device: str, physical_index: int) -> int | None:
    """Bytes in use on the device: the GPU's used memory (nvidia-smi), or this process's RSS."""
    if device == "cuda":
        import shutil
        import subprocess

        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        try:
            out = subprocess.run([smi, f"--id={physical_index}", "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            return int(out.stdout.strip().splitlines()[0]) * 1024 * 1024
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
