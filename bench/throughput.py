"""``make bench``: how close the whole service gets to what CTranslate2 can do on this machine.

Two models, each built here with random weights (``worker/builder.py``):

- ``bench`` (~82M parameters, the CPU benchmark model), on two prompt mixes (16-256 and 16-64
  tokens): raw CTranslate2, one prompt at a time, the service with every prompt as its own job,
  the service with all prompts in one job, and Hugging Face transformers;
- ``demo`` (the tiny model ``make run`` serves, so fast that the service's own cost shows, as it
  will in front of a GPU): raw, one job of all prompts, every prompt as its own job.

All rows of a model run the same prompts with fixed-length outputs (``min_new_tokens =
max_new_tokens``) and the same sampling. Rows:

- raw: CTranslate2 alone on pre-tokenized prompts; thread layouts x batchings searched, best kept;
  also raw at exactly the layout and token budget the worker's calibration chose;
- sequential: one prompt at a time, the best layout for one prompt;
- system: the real stack (gunicorn API, Redis, one worker that calibrates itself as a user's
  would, SQLite), from the first submit to the last result stored. For each system row: the API's
  CPU per request (every gunicorn process, from /proc) and the worker's CPU per request outside
  CTranslate2's threads (the worker's own ``batchgen_worker_cpu_seconds_total{part="service"}``);
- transformers: ``generate`` in PyTorch, float32 or bfloat16, best batch size.

Also: the API's CPU per request inside a 1,000-prompt job, and the calibration's choice next to
the raw search's best. Prints a table and writes ``bench/results/latest.json``.

    python -m bench.throughput [--models bench,demo] [--prompts 64] [--demo-prompts 192] [--quick]
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
from typing import Any

from bench.workload import Prompt, ensure_model, make_prompts, save_prompts
from core.settings import PROJECT_ROOT

SAMPLING = {"top_k": 50, "top_p": 0.9, "temperature": 0.8}
RESULTS = PROJECT_ROOT / "bench" / "results"
CALIBRATION_DIR = PROJECT_ROOT / "var" / "bench" / "calibration"


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


def raw_search(model_dir: Path, prompts: list[Prompt], new_tokens: int, device: str, *, quick: bool) -> dict:
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
        plans = [("size", s) for s in (4, 8, 16, 32)] + [("tokens", t) for t in (1024, 2048, 4096)]
        if quick:
            plans = [("size", 8), ("size", 16)]
        if inter == 1 and cores > 1:
            plans = [("size", 32)]
        for kind, value in plans:
            batches = chunk(prompts, new_tokens=new_tokens, **{kind: value})
            n, s = run_ct2(gen, vocabulary, batches, new_tokens)
            trial = {"inter_threads": inter, "intra_threads": intra, "compute_type": "int8",
                     f"max_batch_{kind}": value, "batches": len(batches), "tps": n / s, "seconds": s, "tokens": n}
            trials.append(trial)
            _say(f"  raw inter={inter} intra={intra} {kind}={value}: {n / s:.0f} tok/s ({s:.1f}s)")
        del gen
    return {"settings": max(trials, key=lambda t: t["tps"]), "trials": trials}


class RawRunner:
    """CTranslate2 alone with one fixed layout and batching, run again and again: measured in
    rounds beside the system rows, so both see the machine as it is at that moment."""

    def __init__(self, model_dir: Path, prompts: list[Prompt], new_tokens: int, device: str, *, compute_type: str,
                 inter_threads: int, intra_threads: int, size: int | None = None, tokens: int | None = None) -> None:
        import ctranslate2

        self.vocabulary = json.loads((model_dir / "vocabulary.json").read_text())
        self.gen = ctranslate2.Generator(str(model_dir), device=device, compute_type=compute_type,
                                         inter_threads=inter_threads, intra_threads=intra_threads)
        run_ct2(self.gen, self.vocabulary, chunk(prompts[:4], size=2), 4)
        groups = chunk(prompts, size=size, new_tokens=new_tokens) if size else [prompts]
        self.batches = [b for g in groups for b in (chunk(g, tokens=tokens, new_tokens=new_tokens) if tokens else [g])]
        self.new_tokens = new_tokens
        self.runs: list[float] = []

    def run(self) -> float:
        n, s = run_ct2(self.gen, self.vocabulary, self.batches, self.new_tokens)
        self.runs.append(n / s)
        return n / s

    def result(self, **extra: Any) -> dict[str, Any]:
        return {"tps": statistics.median(self.runs), "runs": self.runs, "batches": len(self.batches), **extra}


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
    return {"tps": n / s, "seconds": s, "settings": {"inter_threads": 1, "intra_threads": intra}}


def bench_transformers(checkpoint: Path, prompts_file: Path, new_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "bench.transformers_row", "--checkpoint", str(checkpoint),
                        "--prompts", str(prompts_file), "--new-tokens", str(new_tokens),
                        "--sampling", json.dumps(SAMPLING), "--out", out.name], check=True, cwd=PROJECT_ROOT)
        result = json.loads(Path(out.name).read_text())
    return {"tps": result["best"]["tps"], "settings": result["best"], "batch1": result["batch1"],
            "trials": result["trials"]}


# --- the whole service ---------------------------------------------------------------------


class Service:
    """The real stack for one model, its worker calibrated as a user's would be."""

    def __init__(self, model_dir: Path, model_name: str, *, calibrate: str, worker_args: list[str] | None = None,
                 database_url: str | None = None) -> None:
        import requests

        from bench.stack import Stack

        # No rate limit: the bench measures throughput, and its clients poll as fast as they like.
        self.stack = Stack(model_dir=model_dir, model_name=model_name, worker_args=worker_args or [],
                           calibrate=calibrate, database_url=database_url, rate_limit_per_minute=0,
                           calibration_dir=CALIBRATION_DIR, metrics_interval_s=1.0).start()
        self.model = model_name
        self.local = threading.local()
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.stack.token}"
        warm = self.submit_job({"prompts": ["warm up"], "params": {"max_new_tokens": 4}})  # imports, connections
        self.watch_jobs([warm])
        # What the idle worker spends (heartbeats, reconciler, publishing its metrics): subtracted
        # from each row's figures, which are about the work of the requests.
        first, t0 = self.worker_cpu(), time.monotonic()
        time.sleep(2.0)
        last = self.worker_cpu()
        self.idle_cpu_per_s = {part: max(0.0, last[part] - first.get(part, 0.0)) / (time.monotonic() - t0)
                               for part in last}

    def close(self) -> None:
        self.stack.stop()

    def serving(self) -> dict[str, Any]:
        """The worker's entry in GET /v1/models: its limits in force."""
        for _ in range(100):
            models = self.http.get(f"{self.stack.url}/v1/models").json()["data"]
            entry = next(m for m in models if m["id"] == self.model)
            if entry.get("serving"):
                return entry["serving"][0]  # type: ignore[no-any-return]
            time.sleep(0.1)
        raise RuntimeError("the worker does not show in /v1/models")

    def worker_cpu(self) -> dict[str, float]:
        """The worker's engine/service CPU seconds, from its freshest metrics snapshot."""
        import redis

        client = redis.Redis.from_url(self.stack.settings.redis_url)
        time.sleep(2.2)  # a snapshot published after the work ended (every second)
        prefix = self.stack.settings.redis_prefix + "metrics:worker:"
        for key in client.scan_iter(match=prefix + "*"):
            snapshot = json.loads(client.get(key))
            series = snapshot.get("batchgen_worker_cpu_seconds_total", {})
            return {dict(json.loads(labels))["part"]: value for labels, value in series.items()}
        return {}

    def submit_job(self, body: dict[str, Any], model: str | None = None) -> str:
        if not hasattr(self.local, "http"):
            import requests

            self.local.http = requests.Session()
            self.local.http.headers["Authorization"] = f"Bearer {self.stack.token}"
        resp = self.local.http.post(f"{self.stack.url}/v1/jobs", json={"model": model or self.model, **body},
                                    timeout=120)
        resp.raise_for_status()
        return resp.json()["id"]  # type: ignore[no-any-return]

    def watch_jobs(self, ids: list[str], *, interval_s: float = 0.1, timeout: float = 1800) -> list[dict[str, Any]]:
        """Poll the API as a client does until every job in ``ids`` has ended, and return them
        as the API shows them: one job by ``GET /v1/jobs/{id}``, many by paging the job list
        (newest first, 100 a page) down to the oldest of them."""
        wanted: set[str] = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            seen: dict[str, dict[str, Any]] = {}
            if len(ids) == 1:
                job = self.http.get(f"{self.stack.url}/v1/jobs/{ids[0]}", timeout=60).json()
                seen[job["id"]] = job
            else:
                after = None
                while len(seen) < len(wanted):
                    query: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
                    page = self.http.get(f"{self.stack.url}/v1/jobs", params=query, timeout=60).json()
                    seen.update((j["id"], j) for j in page["data"] if j["id"] in wanted)
                    if not page["has_more"]:
                        break
                    after = page["last_id"]
            if len(seen) == len(wanted) and all(j["completed_at"] for j in seen.values()):
                return list(seen.values())
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(bool(j['completed_at']) for j in seen.values())}/{len(ids)} jobs ended")
            time.sleep(interval_s)

    def run(self, prompts: list[Prompt], new_tokens: int, *, single: bool) -> dict[str, Any]:
        """All prompts as single-prompt jobs (16 client threads) or as one job; tokens/s from the
        first submit to the last result stored (the jobs' completed_at, read through the API,
        which the bench polls ten times a second as a client would), and CPU per request."""
        from bench.stack import cpu_seconds

        params = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "temperature": SAMPLING["temperature"],
                  "top_p": SAMPLING["top_p"], "top_k": SAMPLING["top_k"]}
        time.sleep(0.5)
        worker0, api0 = self.worker_cpu(), cpu_seconds(self.stack.api_pids)
        m0 = time.monotonic()
        t0 = datetime.now(UTC)
        if single:
            with ThreadPoolExecutor(max_workers=16) as pool:
                ids = list(pool.map(lambda p: self.submit_job({"prompts": [p.text], "params": params}), prompts))
        else:
            ids = [self.submit_job({"prompts": [p.text for p in prompts], "params": params})]
        submitted = (datetime.now(UTC) - t0).total_seconds()
        api_submitted = cpu_seconds(self.stack.api_pids)
        jobs = self.watch_jobs(ids)
        api1 = cpu_seconds(self.stack.api_pids)
        worker1 = self.worker_cpu()
        elapsed = time.monotonic() - m0
        finished = max(datetime.fromisoformat(j["completed_at"]) for j in jobs)
        tokens = sum(j["usage"]["completion_tokens"] for j in jobs)
        failed = sum(j["counts"]["failed"] for j in jobs)
        seconds = (finished - t0).total_seconds()
        parts = self.worker_parts(worker0, worker1, elapsed, len(prompts))
        batches = [line.split("batchgen.batcher: ", 1)[-1] for line in self.stack.worker_log.read_text().splitlines()
                   if "batchgen.batcher: batch" in line]
        return {"tps": tokens / seconds, "seconds": seconds, "tokens": tokens, "requests": len(prompts),
                "failed": failed, "submit_seconds": submitted,
                "api_cpu_ms_per_request": 1000 * (api1 - api0) / len(prompts),
                "api_submit_cpu_ms_per_request": 1000 * (api_submitted - api0) / len(prompts),
                "worker_service_cpu_ms_per_request": parts.get("service", 0.0), "worker_cpu_ms_per_request": parts,
                "worker_engine_cpu_s": worker1.get("engine", 0.0) - worker0.get("engine", 0.0),
                "limits_after": self.serving(), "batch_log": batches[-12:]}

    def worker_parts(self, before: dict[str, float], after: dict[str, float], elapsed: float,
                     n: int) -> dict[str, float]:
        """The worker's CPU ms per request by part (worker/cpu.py), less what it spends idle."""
        return {part: 1000 * max(0.0, after[part] - before.get(part, 0.0) - self.idle_cpu_per_s.get(part, 0.0)
                                 * elapsed) / n for part in after}

    def api_cost_of_big_job(self, n: int = 1000) -> float:
        """API CPU ms per request of one ``n``-prompt job (for a model no worker serves: only the
        API's work counts; the job is cancelled afterwards)."""
        from bench.stack import cpu_seconds

        prompts = [f"Question {i}: what is the capital of country number {i}?" for i in range(n)]
        self.submit_job({"prompts": prompts[:10]}, model=self.stack.unserved)  # warm the path
        costs = []
        for _ in range(3):
            before = cpu_seconds(self.stack.api_pids)
            job = self.submit_job({"prompts": prompts, "params": {"max_new_tokens": 16}}, model=self.stack.unserved)
            costs.append(1000 * (cpu_seconds(self.stack.api_pids) - before) / n)
            self.http.post(f"{self.stack.url}/v1/jobs/{job}/cancel")
        return statistics.median(costs)


# --- one model -----------------------------------------------------------------------------


def bench_model(preset: str, mixes: list[tuple[int, int]], n_prompts: int, new_tokens: int, *, rows: set[str],
                device: str, quick: bool, repeat: int = 3) -> dict[str, Any]:
    _say(f"== {preset} model")
    model_dir, checkpoint = ensure_model(preset)
    out: dict[str, Any] = {"model": preset, "mixes": {}}
    mixes_prompts = {f"{lo}-{hi}": make_prompts(model_dir, n_prompts, lo, hi) for lo, hi in mixes}
    for name, prompts in mixes_prompts.items():
        lengths = [len(p.ids) for p in prompts]
        out["mixes"][name] = {"prompts": n_prompts, "min_len": min(lengths), "max_len": max(lengths),
                              "mean_len": statistics.mean(lengths), "new_tokens": new_tokens}
    searched: dict[str, dict[str, Any]] = {}
    if "raw" in rows:  # the search, alone on the machine
        for name, prompts in mixes_prompts.items():
            _say(f"  raw search, prompts of {name} tokens: CTranslate2 alone")
            searched[name] = raw_search(model_dir, prompts, new_tokens, device, quick=quick)
    service = None
    if "system" in rows:
        _say("  starting the service; its worker calibrates itself (BATCHGEN_CALIBRATE=force)")
        service = Service(model_dir, preset, calibrate="force")
        out["calibration"] = service.serving()
        cached = sorted(CALIBRATION_DIR.glob(f"{preset}-{device}-*.json"), key=lambda p: p.stat().st_mtime)
        if cached:
            data = json.loads(cached[-1].read_text())
            out["calibration"].update(choice=data["choice"], seconds=data["seconds"])
        _say(f"  calibration: {out['calibration']}")
        out["api_cpu_ms_per_request_in_1000_prompt_job"] = service.api_cost_of_big_job()
    try:
        # Rounds: raw's best, raw at the calibration's choice, the service with single-prompt jobs
        # and with one job, each once a round; medians of the rounds. The machine's speed drifts
        # by tens of percent over minutes here, and rows measured side by side drift together.
        runners: dict[str, dict[str, RawRunner]] = {}
        for name, prompts in mixes_prompts.items():
            runners[name] = {}
            if name in searched:
                best = searched[name]["settings"]
                runners[name]["best"] = RawRunner(model_dir, prompts, new_tokens, device, compute_type="int8",
                                                  inter_threads=best["inter_threads"], intra_threads=best["intra_threads"],
                                                  size=best.get("max_batch_size"), tokens=best.get("max_batch_tokens"))
                choice = out.get("calibration", {}).get("choice")
                if choice:
                    runners[name]["choice"] = RawRunner(
                        model_dir, prompts, new_tokens, device, compute_type=choice["compute_type"],
                        inter_threads=choice["inter_threads"], intra_threads=choice["intra_threads"],
                        size=choice["max_batch_size"], tokens=choice["max_batch_tokens"])
        system_runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for round_ in range(repeat):
            for name, prompts in mixes_prompts.items():
                _say(f"  round {round_ + 1}/{repeat}, prompts of {name} tokens")
                for kind, runner in runners[name].items():
                    _say(f"    raw {kind}: {runner.run():.0f} tok/s")
                if service is not None:
                    for key, single in (("system_single", True), ("system_one_job", False)):
                        r = service.run(prompts, new_tokens, single=single)
                        system_runs.setdefault((name, key), []).append(r)
                        _say(f"    {key}: {r['tps']:.0f} tok/s")
        for (name, key), runs in system_runs.items():
            runs.sort(key=lambda r: r["tps"])
            out["mixes"][name][key] = {**runs[len(runs) // 2], "runs": [r["tps"] for r in runs]}
        for name, found in runners.items():
            if "best" in found:
                raw = found["best"].result(settings=searched[name]["settings"], trials=searched[name]["trials"])
                if "choice" in found:
                    raw["at_choice"] = found["choice"].result(**out["calibration"]["choice"])
                out["mixes"][name]["raw"] = raw
        del runners
    finally:
        if service is not None:
            service.close()
    for name, prompts in mixes_prompts.items():
        mix = out["mixes"][name]
        if "sequential" in rows:
            _say(f"  sequential, prompts of {name} tokens: one prompt at a time")
            mix["sequential"] = bench_sequential(model_dir, prompts, new_tokens, device)
        if "transformers" in rows:
            _say("  transformers: Hugging Face generate (PyTorch)")
            prompts_file = model_dir.parent / f"prompts-{preset}-{name}.json"
            save_prompts(prompts, prompts_file)
            mix["transformers"] = bench_transformers(checkpoint, prompts_file, new_tokens)
    return out


# --- the service's own cost: classification, OpenAI batches, polling, PostgreSQL -------------


def bench_service_rows(*, rows: set[str], repeat: int, quick: bool, device: str,
                       postgres_url: str) -> dict[str, Any]:
    """Rows on the demo model, where the model costs almost nothing (``bench/service.py``)."""
    from bench.service import classify, medians, openai_batch, polling, raw_classify, short_texts

    _say("== the service's own cost (demo model)")
    model_dir, _ = ensure_model("demo")
    out: dict[str, Any] = {}
    texts = short_texts(2000 if quick else 20_000)
    if rows & {"classify", "openai", "poll"}:
        service = Service(model_dir, "demo", calibrate="auto")
        layout = service.serving()
        try:
            if "classify" in rows:
                raw, system = [], []
                for round_ in range(repeat):  # alternated: both see the machine as it is
                    raw.append(raw_classify(model_dir, texts, inter_threads=layout["inter_threads"],
                                            intra_threads=layout["intra_threads"]))
                    system.append(classify(service, texts))
                    _say(f"  classify round {round_ + 1}/{repeat}: raw {raw[-1]['requests_per_s']:.0f}, system "
                         f"{system[-1]['requests_per_s']:.0f} requests/s")
                out["classify"] = {"raw": medians(raw), "system": medians(system)}
            if "openai" in rows:
                small = []
                for _ in range(repeat):
                    small.append(openai_batch(service, texts[:1000]))
                    _say(f"  OpenAI batch of 1,000 lines: {small[-1]['requests_per_s']:.0f} requests/s")
                lines = 5_000 if quick else 50_000
                big = openai_batch(service, (texts * (lines // len(texts) + 1))[:lines])
                _say(f"  OpenAI batch of {lines:,} lines: {big['requests_per_s']:.0f} requests/s, "
                     f"peak memory {big['peak_memory_mb']:.0f} MB")
                out["openai"] = {"small": medians(small), "big": big, "big_lines": lines}
            if "poll" in rows:
                out["poll"] = polling(service, [p.text for p in make_prompts(model_dir, 192, 16, 256)])
                _say(f"  polling: {out['poll']}")
        finally:
            service.close()
    if "postgres" in rows:
        out["postgres"] = bench_on_postgres(model_dir, postgres_url, repeat=repeat, device=device)
    return out


def bench_on_postgres(model_dir: Path, admin_url: str, *, repeat: int, device: str) -> dict[str, Any]:
    """The demo rows (192 single-prompt jobs, one job of 192) with the stack on PostgreSQL, in a
    database of the bench's own on this machine's server, beside raw CTranslate2 at the
    calibration's choice."""
    from bench.stack import scratch_postgres

    prompts = make_prompts(model_dir, 192, 16, 256)
    new_tokens = 64
    out: dict[str, Any] = {}
    with scratch_postgres(admin_url) as url:
        _say("  PostgreSQL: the demo rows once more, the stack on this machine's PostgreSQL")
        service = Service(model_dir, "demo", calibrate="auto", database_url=url)
        try:
            choice = service.serving()
            raw = RawRunner(model_dir, prompts, new_tokens, device, compute_type=choice["compute_type"],
                            inter_threads=choice["inter_threads"], intra_threads=choice["intra_threads"],
                            tokens=choice["max_batch_tokens"])
            runs: dict[str, list[dict[str, Any]]] = {"system_single": [], "system_one_job": []}
            for _ in range(repeat):
                _say(f"    raw: {raw.run():.0f} tok/s")
                for key, single in (("system_single", True), ("system_one_job", False)):
                    runs[key].append(service.run(prompts, new_tokens, single=single))
                    _say(f"    {key}: {runs[key][-1]['tps']:.0f} tok/s")
            out["raw"] = raw.result()
            for key, found in runs.items():
                found.sort(key=lambda r: r["tps"])
                out[key] = {**found[len(found) // 2], "runs": [r["tps"] for r in found]}
        finally:
            service.close()
    return out


# --- report --------------------------------------------------------------------------------


TARGETS = {
    ("bench", "system_single/raw"): 0.95, ("bench", "system_one_job/raw"): 0.95,
    ("bench", "system_single/sequential"): 4.0, ("bench", "system_one_job/sequential"): 4.0,
    ("demo", "system_one_job/raw"): 0.92, ("demo", "system_single/raw"): 0.8,
}


def ceiling(mix: dict[str, Any]) -> float | None:
    """Raw CTranslate2's best here: the search's best or the calibration's choice, whichever ran
    faster (medians of the same rounds)."""
    raw = mix.get("raw")
    if not raw:
        return None
    return max(raw["tps"], raw.get("at_choice", {}).get("tps", 0.0))


def ratios(model: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, mix in model["mixes"].items():
        r: dict[str, float] = {}
        top = ceiling(mix)
        for system in ("system_single", "system_one_job"):
            if system in mix and top:
                r[f"{system}/raw"] = mix[system]["tps"] / top
            for other in ("sequential", "transformers"):
                if system in mix and other in mix:
                    r[f"{system}/{other}"] = mix[system]["tps"] / mix[other]["tps"]
        if top and "transformers" in mix:
            r["raw/transformers"] = top / mix["transformers"]["tps"]
        if "raw" in mix and "at_choice" in mix["raw"]:
            r["raw_at_calibration/raw"] = mix["raw"]["at_choice"]["tps"] / mix["raw"]["tps"]
        out[name] = r
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bench,demo")
    p.add_argument("--prompts", type=int, default=64, help="prompts per mix on the bench model")
    p.add_argument("--demo-prompts", type=int, default=192)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", default="raw,sequential,system,transformers,classify,openai,poll,postgres",
                   help="rows to run (classify, openai, poll, postgres: the demo model's service rows)")
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="a PostgreSQL server the postgres rows may create (and drop) a database on")
    p.add_argument("--quick", action="store_true", help="a smaller raw search (for trying the bench itself)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each system row and of raw's best; medians")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    p.add_argument("--report", type=Path, help="print the table of an earlier run's JSON and exit")
    args = p.parse_args(argv)
    if args.report is not None:
        report = json.loads(args.report.read_text())
        for model in report["models"].values():
            model["ratios"] = ratios(model)
        print_report(report)
        return 0
    rows = set(args.rows.split(","))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.monotonic()
    report: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": _cpu_name(), "python": platform.python_version()},
        "models": {},
    }
    for model in args.models.split(","):
        if model == "bench":
            report["models"]["bench"] = bench_model("bench", [(16, 256), (16, 64)], args.prompts, args.new_tokens,
                                                    rows=rows, device=args.device, quick=args.quick,
                                                    repeat=args.repeat)
        elif model == "demo":
            report["models"]["demo"] = bench_model("demo", [(16, 256)], args.demo_prompts, args.new_tokens,
                                                   rows=rows - {"sequential", "transformers"}, device=args.device,
                                                   quick=args.quick, repeat=args.repeat)
    if rows & {"classify", "openai", "poll", "postgres"}:
        report["service"] = bench_service_rows(rows=rows, repeat=args.repeat, quick=args.quick, device=args.device,
                                               postgres_url=args.postgres)
    for model in report["models"].values():
        model["ratios"] = ratios(model)
    report["seconds"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    print(f"\nwritten to {args.out} ({report['seconds']:.0f} s)")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _layout(settings: dict[str, Any]) -> str:
    keys = [k for k in settings if k.startswith("max_batch_")]
    what = ", ".join(f"{k.removeprefix('max_batch_')} {settings[k]}" for k in keys)
    return f"inter {settings.get('inter_threads')} x intra {settings.get('intra_threads')}, {what}"


def _runs(row: dict[str, Any]) -> str:
    runs = row.get("runs")
    return f"; runs {'/'.join(str(round(r)) for r in sorted(runs))}" if runs and len(runs) > 1 else ""


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nbatchgen throughput on {m['processor']} ({m['cpus']} CPUs); output tokens/s, medians of each row's runs")
    print(f"{'model':<7}{'prompts':<9}{'row':<30}{'tokens/s':>9}{'of raw':>8}  notes   (of raw: of the faster raw row)")
    for name, model in report["models"].items():
        for mix_name, mix in model["mixes"].items():
            raw = ceiling(mix)

            def line(row: str, tps: float, notes: str = "", raw: float = raw, name: str = name,
                     mix_name: str = mix_name) -> None:
                share = f"{tps / raw:>8.2f}" if raw else f"{'':>8}"
                print(f"{name:<7}{mix_name:<9}{row:<30}{tps:>9.0f}{share}  {notes}")

            if "raw" in mix:
                line("raw (best of the search)", mix["raw"]["tps"], _layout(mix["raw"]["settings"]) + _runs(mix["raw"]))
                if "at_choice" in mix["raw"]:
                    c = mix["raw"]["at_choice"]
                    line("raw at calibration's choice", c["tps"], f"{c['compute_type']}, inter {c['inter_threads']} x "
                         f"intra {c['intra_threads']}, {c['max_batch_tokens']} tokens / {c['max_batch_size']} requests"
                         + _runs(c))
            if "sequential" in mix:
                line("sequential", mix["sequential"]["tps"], f"intra {mix['sequential']['settings']['intra_threads']}")
            for key, label in (("system_single", f"system, {mix['prompts']} single jobs"),
                               ("system_one_job", f"system, one job of {mix['prompts']}")):
                if key in mix:
                    r = mix[key]
                    limits = r["limits_after"]
                    line(label, r["tps"], f"API {r['api_cpu_ms_per_request']:.2f} ms/req ("
                         f"{r.get('api_submit_cpu_ms_per_request', 0):.2f} submitting), worker outside CT2 "
                         f"{r['worker_service_cpu_ms_per_request']:.2f} ms/req; budget after "
                         f"{limits.get('max_batch_tokens')}; {r['failed']} failed" + _runs(r))
            if "transformers" in mix:
                t = mix["transformers"]
                line("transformers", t["tps"], f"{t['settings']['dtype']}, batch {t['settings']['batch_size']}")
    print()
    for name, model in report["models"].items():
        if "calibration" in model:
            c = model["calibration"]
            choice = c.get("choice", {})
            print(f"{name}: calibration chose {c.get('compute_type')}, inter {c.get('inter_threads')} x intra "
                  f"{c.get('intra_threads')}, {choice.get('max_batch_tokens')} tokens / "
                  f"{choice.get('max_batch_size')} requests per batch, in {c.get('seconds', 0):.1f} s")
        if "api_cpu_ms_per_request_in_1000_prompt_job" in model:
            print(f"{name}: API CPU per request inside a 1,000-prompt job: "
                  f"{model['api_cpu_ms_per_request_in_1000_prompt_job']:.3f} ms")
        for mix_name, r in model.get("ratios", {}).items():
            for ratio, value in r.items():
                target = TARGETS.get((name, ratio))
                if ratio.endswith("/transformers"):
                    target = 1.15 if r.get("raw/transformers", 0) > 1.15 else None
                verdict = "" if target is None else (f"  target >= {target}: " + ("met" if value >= target else "NOT met"))
                print(f"{name} {mix_name} {ratio:<34}{value:>6.2f}{verdict}")
    for name, model in report["models"].items():
        for mix_name, mix in model["mixes"].items():
            if "system_single" in mix:
                r = mix["system_single"]
                v = r.get("api_submit_cpu_ms_per_request", r["api_cpu_ms_per_request"])
                print(f"{name} {mix_name} API CPU per single-prompt job while they are submitted {v:.2f} ms  "
                      f"target <= 1.5: " + ("met" if v <= 1.5 else "NOT met")
                      + f" ({r['api_cpu_ms_per_request']:.2f} ms over the row, polling the job list included)")
        if "api_cpu_ms_per_request_in_1000_prompt_job" in model:
            v = model["api_cpu_ms_per_request_in_1000_prompt_job"]
            print(f"{name} API CPU per request in a 1,000-prompt job {v:.3f} ms  target <= 0.2: "
                  + ("met" if v <= 0.2 else "NOT met"))
    for name, model in report["models"].items():
        for mix_name, mix in model["mixes"].items():
            for key in ("system_single", "system_one_job"):
                if key in mix and mix[key].get("worker_cpu_ms_per_request"):
                    print(f"{name} {mix_name} {key}: worker CPU outside CTranslate2 per request: "
                          + _parts(mix[key]["worker_cpu_ms_per_request"]))
            if "system_one_job" in mix:
                v = mix["system_one_job"]["worker_service_cpu_ms_per_request"]
                print(f"{name} {mix_name} worker CPU per request outside CTranslate2 in one job {v:.2f} ms  "
                      f"target <= 0.3: " + ("met" if v <= 0.3 else "NOT met"))
    service = report.get("service")
    if service:
        print_service(service)


def _parts(parts: dict[str, float]) -> str:
    named = ", ".join(f"{p} {parts[p]:.3f}" for p in ("broker", "database", "tokenizer", "scheduling", "generation",
                                                       "other") if p in parts)
    return f"{parts.get('service', 0.0):.3f} ms ({named})"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_service(service: dict[str, Any]) -> None:
    """The demo model's service rows: classification, OpenAI batches, polling, PostgreSQL."""
    print("\nThe service's own cost (demo model: the model costs almost nothing)")
    if "classify" in service:
        raw, system = service["classify"]["raw"], service["classify"]["system"]
        ratio = system["requests_per_s"] / raw["requests_per_s"]
        print(f"classification, {system['requests']:,} prompts, 1 new token, one job, results downloaded: system "
              f"{system['requests_per_s']:.0f} requests/s{_runs(system)}; raw CTranslate2 {raw['requests_per_s']:.0f} "
              f"(unsorted batches of {raw['batch']}, inter {raw['inter_threads']} x intra {raw['intra_threads']})"
              f"{_runs(raw)}; {ratio:.2f} of raw  target >= 0.8: {_verdict(ratio >= 0.8)}")
        print(f"  API {system['api_cpu_ms_per_request']:.3f} ms/request; worker outside CTranslate2 "
              + _parts(system["worker_cpu_ms_per_request"]) + "  target <= 0.3: "
              + _verdict(system["worker_cpu_ms_per_request"].get("service", 0) <= 0.3)
              + f"; peak memory of the stack {system['peak_memory_mb']:.0f} MB")
    if "openai" in service:
        small, big = service["openai"]["small"], service["openai"]["big"]
        cost = small["requests_per_s"] / big["requests_per_s"]  # seconds per request, big over small
        print(f"OpenAI batches through the official client: 1,000 lines {small['requests_per_s']:.0f} requests/s"
              f"{_runs(small)}, peak memory {small['peak_memory_mb']:.0f} MB; {service['openai']['big_lines']:,} lines "
              f"{big['requests_per_s']:.0f} requests/s, peak memory {big['peak_memory_mb']:.0f} MB")
        for label, row in (("1,000", small), (f"{service['openai']['big_lines']:,}", big)):
            print(f"  {label} lines: API {row['api_cpu_ms_per_request']:.3f} ms/request, worker "
                  + _parts(row["worker_cpu_ms_per_request"]))
        api_cost = big["api_cpu_ms_per_request"] / max(small["api_cpu_ms_per_request"], 1e-9)
        worker_cost = (big["worker_cpu_ms_per_request"].get("service", 0.0)
                       / max(small["worker_cpu_ms_per_request"].get("service", 0.0), 1e-9))
        print(f"  cost per request, big over small: time x{cost:.2f}, API CPU x{api_cost:.2f}, worker CPU "
              f"x{worker_cost:.2f}  target <= 1.2: {_verdict(max(cost, api_cost, worker_cost) <= 1.2)}")
    if "poll" in service:
        poll = service["poll"]
        print(f"polling, the worker busy: API CPU per GET /v1/jobs/{{id}} {poll['api_cpu_ms_per_get']:.3f} ms  target "
              f"<= 0.3: {_verdict(poll['api_cpu_ms_per_get'] <= 0.3)}; per job listed "
              f"{poll['api_cpu_us_per_job_listed']:.1f} us  target <= 20: "
              f"{_verdict(poll['api_cpu_us_per_job_listed'] <= 20)} (a list call of one job: "
              f"{poll['api_cpu_ms_per_list_call']:.3f} ms)")
    if "postgres" in service:
        pg = service["postgres"]
        raw = pg["raw"]["tps"]
        print(f"PostgreSQL, demo model, 192 prompts: raw at the calibration's choice {raw:.0f} tok/s{_runs(pg['raw'])}")
        for key, label, target in (("system_single", "192 single-prompt jobs", 0.8),
                                   ("system_one_job", "one job of 192", 0.92)):
            r = pg[key]
            print(f"  {label}: {r['tps']:.0f} tok/s, {r['tps'] / raw:.2f} of raw  target >= {target}: "
                  f"{_verdict(r['tps'] / raw >= target)}{_runs(r)}; API {r['api_cpu_ms_per_request']:.2f} ms/req, "
                  f"worker " + _parts(r["worker_cpu_ms_per_request"]))


if __name__ == "__main__":
    sys.exit(main())
