"""Rows of ``make bench`` where the model costs almost nothing and the service's own cost shows:
classification (one new token per prompt) as a native job and as OpenAI batches through the
official client, and what polling costs the API.

- ``classify``: 20,000 short prompts, 1 new token each, as one job; from the submit to the last
  line of the downloaded results. Against raw CTranslate2 as a user's script would run it: the
  prompts tokenized and generated in submission order, unsorted batches of 256 (both replicas
  busy), the answers decoded.
- ``openai``: the same kind of prompts as OpenAI batches of 1,000 and 50,000 lines (files.create,
  batches.create, polling batches.retrieve, files.content): requests/s, and the peak memory of
  the whole stack (every API process, the worker, Redis) while each runs.
- ``poll``: API CPU per ``GET /v1/jobs/{id}`` and per job listed (``GET /v1/jobs?limit=100``),
  measured while the worker is busy with a job (the machine under the bench's load), so that the
  API's CPU is the polls' own.
"""

from __future__ import annotations

import io
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.stack import children, cpu_seconds


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def short_texts(n: int, seed: int = 11) -> list[str]:
    """``n`` short English-like texts (8-20 words: about 16-40 tokens), to classify."""
    from worker.builder import training_corpus

    words = " ".join(training_corpus()).split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(8, 20)
        start = rng.randrange(len(words) - length)
        out.append(" ".join(words[start:start + length]))
    return out


# --- raw CTranslate2, as a user's script would classify ------------------------------------


def raw_classify(model_dir: Path, texts: list[str], *, inter_threads: int, intra_threads: int,
                 batch: int = 256) -> dict[str, Any]:
    """Requests/s of CTranslate2 alone: tokenize, generate one token, decode, 256 at a time in
    submission order, every replica busy."""
    import ctranslate2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocabulary = json.loads((model_dir / "vocabulary.json").read_text())
    bos = vocabulary.index("<s>")
    generator = ctranslate2.Generator(str(model_dir), device="cpu", compute_type="int8",
                                      inter_threads=inter_threads, intra_threads=intra_threads)
    generator.generate_batch([["<s>", vocabulary[10]]], max_length=1)  # warm up
    started = time.perf_counter()
    pending = []
    for i in range(0, len(texts), batch):
        encoded = tokenizer.encode_batch(texts[i:i + batch], add_special_tokens=False)
        tokens = [[vocabulary[bos], *(vocabulary[t] for t in e.ids)] for e in encoded]
        pending.append(generator.generate_batch(tokens, max_length=1, include_prompt_in_result=False,
                                                asynchronous=True))
    answers = [tokenizer.decode(r.result().sequences_ids[0]) for rs in pending for r in rs]
    seconds = time.perf_counter() - started
    assert len(answers) == len(texts)
    return {"requests_per_s": len(texts) / seconds, "seconds": seconds, "batch": batch,
            "inter_threads": inter_threads, "intra_threads": intra_threads}


# --- the service -----------------------------------------------------------------------------


class Memory:
    """The peak resident memory of a set of processes (and their children), sampled."""

    def __init__(self, pids: list[int], interval_s: float = 0.2) -> None:
        self.pids, self.interval_s = pids, interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Memory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes(self.pids))


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in {p for root in pids for p in [root, *children(root)]}:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def stack_pids(service: Any) -> list[int]:
    return [proc.pid for proc in service.stack.procs]


def classify(service: Any, texts: list[str]) -> dict[str, Any]:
    """One job of ``texts``, one new token each, greedy; from the submit to the last line of the
    downloaded results."""
    http = service.http
    url = service.stack.url
    worker0, api0 = service.worker_cpu(), cpu_seconds(service.stack.api_pids)
    started = time.monotonic()
    with Memory(stack_pids(service)) as memory:
        job = service.submit_job({"prompts": texts, "params": {"max_new_tokens": 1, "temperature": 0.0}})
        service.watch_jobs([job], interval_s=0.2)
        lines = 0
        with http.get(f"{url}/v1/jobs/{job}/results.jsonl", stream=True, timeout=300) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if line:
                    lines += 1
    seconds = time.monotonic() - started
    api1, worker1 = cpu_seconds(service.stack.api_pids), service.worker_cpu()
    assert lines == len(texts), lines
    http.delete(f"{url}/v1/jobs/{job}", timeout=300)
    return {"requests_per_s": len(texts) / seconds, "seconds": seconds, "requests": len(texts),
            "api_cpu_ms_per_request": 1000 * (api1 - api0) / len(texts),
            "worker_cpu_ms_per_request": service.worker_parts(worker0, worker1, seconds, len(texts)),
            "peak_memory_mb": memory.peak / 2**20}


def openai_batch(service: Any, texts: list[str]) -> dict[str, Any]:
    """The texts as an OpenAI batch of completions (one token each) through the official client."""
    import openai

    client = openai.OpenAI(base_url=f"{service.stack.url}/v1", api_key=service.stack.token, max_retries=0,
                           timeout=600)
    body = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                               "body": {"model": service.model, "prompt": text, "max_tokens": 1, "temperature": 0}})
                   + "\n" for i, text in enumerate(texts))
    worker0, api0 = service.worker_cpu(), cpu_seconds(service.stack.api_pids)
    started = time.monotonic()
    with Memory(stack_pids(service)) as memory:
        uploaded = client.files.create(file=("input.jsonl", io.BytesIO(body.encode())), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.output_file_id, batch
        output = client.files.content(batch.output_file_id).read()
    seconds = time.monotonic() - started
    api1, worker1 = cpu_seconds(service.stack.api_pids), service.worker_cpu()
    lines = output.count(b"\n")
    assert lines == len(texts), lines
    return {"requests_per_s": len(texts) / seconds, "seconds": seconds, "requests": len(texts),
            "api_cpu_ms_per_request": 1000 * (api1 - api0) / len(texts),
            "worker_cpu_ms_per_request": service.worker_parts(worker0, worker1, seconds, len(texts)),
            "peak_memory_mb": memory.peak / 2**20}


def polling(service: Any, busy_prompts: list[str], *, gets: int = 2000, lists: int = 200) -> dict[str, Any]:
    """API CPU per GET of a job and per job listed, while the worker runs a job (the machine
    loaded) and the API does nothing but answer the polls."""
    http, url = service.http, service.stack.url
    ids = [service.submit_job({"prompts": [f"poll me {i}"], "params": {"max_new_tokens": 1}}) for i in range(200)]
    service.watch_jobs(ids, interval_s=0.2)
    busy = service.submit_job({"prompts": busy_prompts, "params": {"max_new_tokens": 64, "min_new_tokens": 64}})
    time.sleep(1.0)
    api0 = cpu_seconds(service.stack.api_pids)
    for _ in range(gets):
        assert http.get(f"{url}/v1/jobs/{ids[0]}", timeout=60).status_code == 200
    api1 = cpu_seconds(service.stack.api_pids)
    small = []
    for _ in range(lists):
        small.append(len(http.get(f"{url}/v1/jobs", params={"limit": 1}, timeout=60).json()["data"]))
    api2 = cpu_seconds(service.stack.api_pids)
    listed = 0
    for _ in range(lists):
        listed += len(http.get(f"{url}/v1/jobs", params={"limit": 100}, timeout=60).json()["data"])
    api3 = cpu_seconds(service.stack.api_pids)
    http.post(f"{url}/v1/jobs/{busy}/cancel", timeout=60)
    per_get = (api1 - api0) / gets
    per_list_call = (api2 - api1) / lists
    # A page of 100 less a page of one: what the 99 more jobs cost, per job.
    per_job_listed = ((api3 - api2) - (api2 - api1)) / (listed - sum(small))
    return {"api_cpu_ms_per_get": 1000 * per_get, "api_cpu_us_per_job_listed": 1e6 * per_job_listed,
            "api_cpu_ms_per_list_call": 1000 * per_list_call, "gets": gets, "lists": lists}


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median requests/s, with every run's figure."""
    ordered = sorted(rows, key=lambda r: r["requests_per_s"])
    return {**ordered[len(ordered) // 2], "runs": [r["requests_per_s"] for r in ordered]}

