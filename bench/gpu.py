"""The GPU figures: a Llama-2-7B-shape model (random weights) on one NVIDIA GPU, through
CTranslate2 ``int8_float16`` alone and through the whole service, at batch sizes 1-128.

    bench/gpu.sh [--device-index N] [--sizes 1,2,4,...,128]    # = python -m bench.gpu

1. builds the 7B-shape model here once (``var/bench/llama-2-7b-shape-ct2``; needs PyTorch and
   about 16 GB of RAM and 7 GB of disk) and measures the GPU's device-to-device copy bandwidth;
2. calibrates the worker on the GPU (``worker.calibration``, batch sizes to 256) and prints it;
3. raw: ``generate_batch`` on 128-token prompts, 64 new tokens, each batch size; GPU memory used;
4. batch-1 decode: decode steps/s of one sequence, times the bytes of the weights it must read
   each step, as a share of the measured copy bandwidth (the memory-bandwidth limit of decode);
5. system: the service (gunicorn API, Redis, SQLite, one ``--device cuda`` worker) given that
   many single-prompt jobs at once, each batch size, first submit to last result stored.

Writes ``bench/results/gpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from core.settings import PROJECT_ROOT

NEW_TOKENS = 64
PROMPT_TOKENS = 128


def gpu_memory_mib(index: int) -> int | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    out = subprocess.run([smi, f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    try:
        return int(out.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        return None


def copy_bandwidth(index: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured with PyTorch."""
    import torch

    dev = torch.device("cuda", index)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(dev)
    runs = 20
    started = time.perf_counter()
    for _ in range(runs):
        b.copy_(a)
    torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - started
    del a, b
    torch.cuda.empty_cache()
    return 2 * (1 << 30) * runs / seconds


def raw_sizes(model_dir: Path, sizes: list[int], compute_type: str) -> tuple[list[dict[str, Any]], float]:
    """(one row per batch size, batch-1 decode steps/s)."""
    import ctranslate2

    vocabulary = json.loads((model_dir / "vocabulary.json").read_text())
    words = [t for t in vocabulary if not (t.startswith("<") and t.endswith(">"))]
    gen = ctranslate2.Generator(str(model_dir), device="cuda", device_index=0, compute_type=compute_type)
    prompt = ["<s>", *(words[(i * 7919) % len(words)] for i in range(PROMPT_TOKENS - 1))]
    gen.generate_batch([prompt], max_length=8)  # warm up
    rows = []
    for size in sizes:
        started = time.perf_counter()
        gen.generate_batch([prompt] * size, max_length=NEW_TOKENS, min_length=NEW_TOKENS, sampling_topk=50,
                           sampling_temperature=0.8, include_prompt_in_result=False)
        seconds = time.perf_counter() - started
        rows.append({"batch": size, "tps": size * NEW_TOKENS / seconds, "seconds": seconds,
                     "gpu_memory_mib": gpu_memory_mib(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0") or 0))})
    # Decode alone: a two-token prompt, long output; the prefill is a negligible share.
    steps = 256
    started = time.perf_counter()
    gen.generate_batch([prompt[:2]], max_length=steps, min_length=steps, sampling_topk=1, include_prompt_in_result=False)
    decode_steps_per_s = steps / (time.perf_counter() - started)
    del gen
    return rows, decode_steps_per_s


def system_sizes(model_dir: Path, sizes: list[int], device_index: int) -> list[dict[str, Any]]:
    from bench.throughput import Service
    from bench.workload import Prompt

    service = Service(model_dir, "shape-7b", calibrate="auto",
                      worker_args=["--device", "cuda", "--device-index", str(device_index)])
    rows = []
    try:
        vocabulary = json.loads((model_dir / "vocabulary.json").read_text())
        words = [t.replace("▁", "") for t in vocabulary if t.startswith("▁") and t[1:].isalpha()]
        text = " ".join(words[(i * 7919) % len(words)] for i in range(PROMPT_TOKENS - 10))
        for size in sizes:
            prompts = [Prompt(text=f"{i} {text}", ids=[]) for i in range(size)]
            r = service.run(prompts, NEW_TOKENS, single=True)
            rows.append({"batch": size, "tps": r["tps"], "seconds": r["seconds"],
                         "api_cpu_ms_per_request": r["api_cpu_ms_per_request"],
                         "worker_service_cpu_ms_per_request": r["worker_service_cpu_ms_per_request"]})
        rows.append({"calibration": service.serving()})
    finally:
        service.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-index", type=int, default=0)
    p.add_argument("--sizes", default="1,2,4,8,16,32,64,128")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "gpu.json")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from bench.workload import ensure_model
    from worker import calibration as cal
    from worker.device import pin_cuda_device

    model_dir = PROJECT_ROOT / "var" / "bench" / "llama-2-7b-shape-ct2"
    if not (model_dir / "model.bin").is_file():
        print("building the Llama-2-7B-shape model (random weights; minutes) ...", file=sys.stderr, flush=True)
        ensure_model("llama-2-7b-shape")
    report: dict[str, Any] = {"gpu": cal.device_name("cuda", args.device_index), "model_dir": str(model_dir)}
    report["copy_bandwidth_bytes_per_s"] = copy_bandwidth(args.device_index)
    pin_cuda_device(args.device_index)
    print("calibrating ...", file=sys.stderr, flush=True)
    result = cal.for_worker(model="shape-7b", model_dir=model_dir, device="cuda", device_index=0,
                            physical_index=args.device_index, context_length=4096, compute_type="auto",
                            inter_threads=0, intra_threads=0, cache_dir=PROJECT_ROOT / "var" / "bench" / "calibration",
                            mode="force", budget_s=120)
    report["calibration"] = {"choice": result.choice.__dict__, "seconds": result.seconds, "table": result.table()}
    print(result.table())
    print("raw ...", file=sys.stderr, flush=True)
    report["raw"], decode = raw_sizes(model_dir, sizes, result.choice.compute_type)
    weights = (model_dir / "model.bin").stat().st_size
    report["batch1_decode"] = {"steps_per_s": decode, "weights_bytes": weights,
                               "share_of_bandwidth": weights * decode / report["copy_bandwidth_bytes_per_s"]}
    print("system ...", file=sys.stderr, flush=True)
    report["system"] = system_sizes(model_dir, sizes, args.device_index)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))

    print(f"\n{report['gpu']}: Llama-2-7B shape, int8 weights ({weights / 2**30:.1f} GiB), "
          f"{PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens; output tokens/s")
    print(f"{'batch':>6}{'raw':>10}{'system':>10}{'system/raw':>12}{'GPU MiB':>10}")
    system = {r["batch"]: r for r in report["system"] if "batch" in r}
    for r in report["raw"]:
        s = system.get(r["batch"], {})
        ratio = s.get("tps", 0) / r["tps"] if s else 0
        print(f"{r['batch']:>6}{r['tps']:>10.0f}{s.get('tps', 0):>10.0f}{ratio:>12.2f}{r['gpu_memory_mib'] or 0:>10}")
    d = report["batch1_decode"]
    print(f"batch-1 decode: {d['steps_per_s']:.1f} steps/s x {weights / 2**30:.2f} GiB of weights = "
          f"{d['share_of_bandwidth']:.0%} of the measured copy bandwidth "
          f"({report['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s)")
    c = result.choice
    print(f"calibration: {c.compute_type}, {c.max_batch_tokens} tokens / {c.max_batch_size} requests per batch, "
          f"in {result.seconds:.0f} s")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
