"""Devices: pinning a process to one GPU, and the defaults each kind of device runs best with.

Defaults come from measurements (see ``bench/`` and the README):
- CPU: ``int8``, one single-threaded CTranslate2 replica per core (``inter_threads`` = cores,
  ``intra_threads=1``) and as many batches in flight as replicas. On the 2-core development
  machine two replicas gave 1.6-2x the throughput of one replica with ``intra_threads=2``.
- CUDA: ``int8_float16``, one replica, two batches in flight (one generating, the next queued
  behind it in CTranslate2 so the GPU never waits for Python).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
