"""``make bench``: how close the whole service gets to what CTranslate2 can do on this machine.

Rows, all on the same prompts (mixed lengths) with fixed-length outputs
(``min_new_tokens = max_new_tokens``), each with its own best settings:

- raw: CTranslate2 alone, prompts pre-tokenized, the best thread layout and batching found;
- sequential: one prompt at a time through CTranslate2, the best layout for one prompt;
- system: the prompts as that many single-prompt jobs submitted at once to the REST API, run by a
  real worker through Redis, results stored in SQLite; first submit to last result stored;
- transformers: Hugging Face ``generate`` in PyTorch (float32 or bfloat16, whichever is faster).

Also the latency of one single-prompt job on an idle system against one raw ``generate_batch``
call. Prints a table and writes ``bench/results/latest.json``.

    python -m bench.throughput [--prompts 64] [--min-len 16] [--max-len 256] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from bench.workload import Prompt, ensure_model, make_prompts, save_prompts
from core.settings import PROJECT_ROOT

SAMPLING = {"top_k": 50, "top_p": 0.9, "temperature": 0.8}
RESULTS = PROJECT_ROOT / "bench" / "results"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- CTranslate2 alone ---------------------------------------------------------------------


def chunk(prompts: list[Prompt], *, size: int | None = None, tokens: int | None = None,
          new_tokens: int = 0) -> list[list[Prompt]]:
    """Length-sorted batches of at most ``size`` prompts or ``tokens`` prompt+new tokens."""
    batches: list[list[Prompt]] = []
    current: list[Prompt] = []
    used = 0
    for p in sorted(prompts, key=lambda p: len(p.ids)):
        cost = len(p.ids) + new_tokens
        if current and ((size and len(current) >= size) or (tokens and used + cost > tokens)):
            batches.append(current)
            current, used = [], 0
        current.append(p)
        used += cost
    if current:
        batches.append(current)
    return batches


def run_ct2(generator, vocabulary: list[str], batches: list[list[Prompt]], new_tokens: int) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """Submit every batch at once (the replicas take them as they free up), largest first so
    the replicas finish together; returns (generated tokens, seconds)."""
    ordered = sorted(batches, key=lambda b: -sum(len(p.ids) + new_tokens for p in b))
    started = time.perf_counter()
    pending = [
        generator.generate_batch([[vocabulary[i] for i in p.ids] for p in b], asynchronous=True,
                                 max_length=new_tokens, min_length=new_tokens, include_prompt_in_result=False,
                                 sampling_topk=SAMPLING["top_k"], sampling_topp=SAMPLING["top_p"],
                                 sampling_temperature=SAMPLING["temperature"])
        for b in ordered
    ]
    generated = sum(len(r.result().sequences_ids[0]) for rs in pending for r in rs)
    return generated, time.perf_counter() - started


def bench_raw(model_dir: Path, prompts: list[Prompt], new_tokens: int, device: str) -> dict:
    """Try thread layouts and batchings; the best is the ceiling."""
    import ctranslate2

    vocabulary = json.loads((model_dir / "vocabulary.json").read_text())
    cores = len(os.sched_getaffinity(0))
    layouts = [(cores, 1), (1, cores)] if cores > 1 else [(1, 1)]
    trials = []
    for inter, intra in layouts:
        gen = ctranslate2.Generator(str(model_dir), device=device, compute_type="int8",
                                    inter_threads=inter, intra_threads=intra)
        run_ct2(gen, vocabulary, chunk(prompts[:4], size=2), 4)  # warm-up
        plans = [("size", s) for s in (2, 4, 8, 16)] + [("tokens", t) for t in (512, 768, 1024, 2048)]
        if inter == 1:
            plans = [("size", s) for s in (8, 32)]
        for kind, value in plans:
            batches = chunk(prompts, new_tokens=new_tokens, **{kind: value})
            n, s = run_ct2(gen, vocabulary, batches, new_tokens)
            trial = {"inter_threads": inter, "intra_threads": intra, f"max_batch_{kind}": value,
                     "batches": len(batches), "tps": n / s, "seconds": s, "tokens": n}
            trials.append(trial)
            _say(f"  raw inter={inter} intra={intra} {kind}={value}: {n / s:.0f} tok/s ({s:.1f}s)")
        del gen
    best = max(trials, key=lambda t: t["tps"])
    return {"tps": best["tps"], "settings": best, "trials": trials}


def bench_sequential(model_dir: Path, prompts: list[Prompt], new_tokens: int, device: str) -> dict:
    """One prompt at a time; the layout is chosen on a few prompts first."""
    import ctranslate2

    vocabulary = json.loads((model_dir / "vocabulary.json").read_text())
    cores = len(os.sched_getaffinity(0))
    choices = {}
    for intra in sorted({1, cores}):
        gen = ctranslate2.Generator(str(model_dir), device=device, compute_type="int8", inter_threads=1,
                                    intra_threads=intra)
        run_ct2(gen, vocabulary, [[prompts[0]]], 4)
        n, s = 0, 0.0
        for p in prompts[:6]:
            dn, ds = run_ct2(gen, vocabulary, [[p]], new_tokens)
            n, s = n + dn, s + ds
        choices[intra] = (n / s, gen)
        _say(f"  sequential probe intra={intra}: {n / s:.0f} tok/s")
    intra = max(choices, key=lambda k: choices[k][0])
    gen = choices[intra][1]
    n, s = 0, 0.0
    for p in prompts:
        dn, ds = run_ct2(gen, vocabulary, [[p]], new_tokens)
        n, s = n + dn, s + ds
    # Latency of one call on an idle machine: the median-length prompt, median of 5.
    median_prompt = sorted(prompts, key=lambda p: len(p.ids))[len(prompts) // 2]
    latencies = [run_ct2(gen, vocabulary, [[median_prompt]], new_tokens)[1] for _ in range(5)]
    return {"tps": n / s, "seconds": s, "settings": {"inter_threads": 1, "intra_threads": intra},
            "single_raw_latency_s": statistics.median(latencies), "latency_prompt_tokens": len(median_prompt.ids)}


# --- the whole service ---------------------------------------------------------------------


def bench_system(model_dir: Path, prompts: list[Prompt], new_tokens: int, worker_args: list[str]) -> dict:
    """Many single-prompt jobs at once through the REST API, a worker, Redis and SQLite."""
    import requests
    from sqlalchemy import func, select

    from bench.stack import Stack
    from core.tables import JobRequest

    stack = Stack(model_dir=model_dir, model_name="bench", worker_args=worker_args).start()
    db = stack.database()
    local = threading.local()
    params = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "temperature": SAMPLING["temperature"],
              "top_p": SAMPLING["top_p"], "top_k": SAMPLING["top_k"]}

    def submit(text: str) -> str:
        if not hasattr(local, "http"):
            local.http = requests.Session()
            local.http.headers["Authorization"] = f"Bearer {stack.token}"
        resp = local.http.post(f"{stack.url}/v1/jobs", json={"model": "bench", "prompts": [text], "params": params},
                               timeout=60)
        resp.raise_for_status()
        return resp.json()["id"]  # type: ignore[no-any-return]

    def wait_done(count: int, timeout: float = 900) -> None:
        # Times come from the stored completed_at, so polling slowly measures the same thing and
        # keeps this process from taking CPU from the system it measures.
        deadline = time.monotonic() + timeout
        while True:
            with db.read() as s:
                done = s.scalar(select(func.count()).where(JobRequest.status.in_(("succeeded", "failed"))))
            if done >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done}/{count} done after {timeout}s")
            time.sleep(0.05)

    try:
        submit("warm up")  # first call: imports, connections, CTranslate2 buffers
        wait_done(1)
        median_prompt = sorted(prompts, key=lambda p: len(p.ids))[len(prompts) // 2]
        latencies = []
        for i in range(5):
            time.sleep(0.3)  # idle
            t0 = datetime.now(UTC)
            submit(median_prompt.text)
            wait_done(2 + i)
            with db.read() as s:
                finished = s.scalar(select(func.max(JobRequest.completed_at)))
            latencies.append((finished - t0).total_seconds())
        time.sleep(0.5)
        before = 6
        with db.read() as s:
            tokens_before = s.scalar(select(func.coalesce(func.sum(JobRequest.completion_tokens), 0)))
        t0 = datetime.now(UTC)
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(submit, [p.text for p in prompts]))
        submitted = (datetime.now(UTC) - t0).total_seconds()
        wait_done(before + len(prompts))
        with db.read() as s:
            finished = s.scalar(select(func.max(JobRequest.completed_at)))
            tokens = s.scalar(select(func.sum(JobRequest.completion_tokens))) - tokens_before
            failed = s.scalar(select(func.count()).where(JobRequest.status == "failed"))
        seconds = (finished - t0).total_seconds()
        batches = [line for line in stack.worker_log.read_text().splitlines() if "batchgen.batcher: batch" in line]
        return {"tps": tokens / seconds, "seconds": seconds, "tokens": tokens, "failed": failed,
                "submit_seconds": submitted, "single_job_latency_s": statistics.median(latencies),
                "single_job_latencies_s": latencies, "worker_args": worker_args,
                "batch_log": batches[-40:]}
    finally:
        db.dispose()
        stack.stop()


def bench_transformers(checkpoint: Path, prompts_file: Path, new_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "bench.transformers_row", "--checkpoint", str(checkpoint),
                        "--prompts", str(prompts_file), "--new-tokens", str(new_tokens),
                        "--sampling", json.dumps(SAMPLING), "--out", out.name], check=True, cwd=PROJECT_ROOT)
        result = json.loads(Path(out.name).read_text())
    return {"tps": result["best"]["tps"], "settings": result["best"], "batch1": result["batch1"],
            "trials": result["trials"]}


# --- report --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--preset", default="bench", help="model shape (worker/builder.py PRESETS)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker-args", default="", help="extra flags for the system row's worker")
    p.add_argument("--rows", default="raw,sequential,system,transformers")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = p.parse_args(argv)
    rows = set(args.rows.split(","))

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _say(f"building/loading the {args.preset} model")
    model_dir, checkpoint = ensure_model(args.preset)
    prompts = make_prompts(model_dir, args.prompts, args.min_len, args.max_len)
    lengths = [len(p.ids) for p in prompts]
    prompts_file = model_dir.parent / "prompts.json"
    save_prompts(prompts, prompts_file)
    _say(f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), "
         f"{args.new_tokens} new tokens each")

    report: dict = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": _cpu_name(), "python": platform.python_version()},
        "workload": {"prompts": len(prompts), "min_len": min(lengths), "max_len": max(lengths),
                     "mean_len": statistics.mean(lengths), "new_tokens": args.new_tokens, "sampling": SAMPLING,
                     "model": args.preset, "device": args.device},
    }
    if "raw" in rows:
        _say("raw: CTranslate2 alone")
        report["raw"] = bench_raw(model_dir, prompts, args.new_tokens, args.device)
    if "sequential" in rows:
        _say("sequential: one prompt at a time")
        report["sequential"] = bench_sequential(model_dir, prompts, args.new_tokens, args.device)
    if "system" in rows:
        _say("system: REST API -> Redis -> worker -> SQLite")
        report["system"] = bench_system(model_dir, prompts, args.new_tokens, args.worker_args.split())
    if "transformers" in rows:
        _say("transformers: Hugging Face generate (PyTorch)")
        report["transformers"] = bench_transformers(checkpoint, prompts_file, args.new_tokens)

    flat = {f"{row}_tps": report[row]["tps"] for row in ("raw", "sequential", "system", "transformers") if row in report}
    if "system" in report:
        flat["single_job_latency_s"] = report["system"]["single_job_latency_s"]
    if "sequential" in report:
        flat["single_raw_latency_s"] = report["sequential"]["single_raw_latency_s"]
    ratios = {}
    for other in ("raw", "sequential", "transformers"):
        if "system" in report and other in report:
            ratios[f"system/{other}"] = report["system"]["tps"] / report[other]["tps"]
    if "single_job_latency_s" in flat and "single_raw_latency_s" in flat:
        ratios["single_job_latency_over_raw_ms"] = 1000 * (flat["single_job_latency_s"] - flat["single_raw_latency_s"])
    report.update(flat)
    report["ratios"] = ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    _print_table(report)
    print(f"\nwritten to {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _print_table(report: dict) -> None:
    w = report["workload"]
    print(f"\nbatchgen throughput — {w['prompts']} prompts of {w['min_len']}-{w['max_len']} tokens "
          f"(mean {w['mean_len']:.0f}), {w['new_tokens']} new tokens each, {report['machine']['cpus']} CPUs, "
          f"model '{w['model']}'")
    print(f"{'row':<14}{'tokens/s':>10}  settings")
    for row in ("raw", "sequential", "system", "transformers"):
        if row not in report:
            continue
        r = report[row]
        settings = r.get("settings") or {"worker_args": r.get("worker_args") or "defaults"}
        shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("tps", "seconds", "tokens"))
        print(f"{row:<14}{r['tps']:>10.0f}  {shown}")
    if "transformers" in report:
        b1 = report["transformers"]["batch1"]
        print(f"{'  (batch 1)':<14}{b1['tps']:>10.0f}  dtype={b1['dtype']}, first {b1['prompts']} prompts")
    for name, value in report["ratios"].items():
        print(f"{name:<34}{value:>8.2f}")
    if "single_job_latency_s" in report and "single_raw_latency_s" in report:
        print(f"single-prompt job on an idle system {report['single_job_latency_s'] * 1000:.0f} ms, "
              f"one raw generate_batch call {report['single_raw_latency_s'] * 1000:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
