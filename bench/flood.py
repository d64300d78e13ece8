"""A flood: many clients at once, more work than the queue may hold.

    python -m bench.flood [--jobs 1000] [--requests-per-job 10] [--clients 200] [--queue-cap 2000]
    python -m bench.flood --big 32 [--body-mib 60]     # memory: 32 bodies of 60 MiB at once

Starts the real stack (gunicorn API, Redis, one worker on the small demo model, SQLite), then fires
``--jobs`` submissions from ``--clients`` threads at once. Every answer must be ``202`` or ``429``
(with Retry-After), never a 5xx or a dropped connection. It then waits for every accepted job to
finish, sampling the resident memory of each process, and checks each accepted job ended with all
of its requests stored once. The per-key rate limit is off for the run (one key sends everything);
``--queue-cap`` (BATCHGEN_MAX_PENDING_PER_MODEL) is set below the flood so that backpressure shows.

``--big N`` instead sends N job submissions of ``--body-mib`` MiB each at once (prompts of 200,000
characters; each job is refused with 422 only after its whole body is parsed and validated, so
nothing is stored), then a batch input file of 50,000 lines, and prints the API's peak resident
memory against its memory at rest: what many large bodies at once cost.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from sqlalchemy import func, select

from bench.stack import Stack
from bench.workload import ensure_model
from core.tables import Job, JobRequest


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree(pid: int) -> list[int]:
    """A process and its descendants."""
    out = [pid]
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += tree(int(child))
    except OSError:
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--requests-per-job", type=int, default=10)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--queue-cap", type=int, default=2000)
    p.add_argument("--drain-timeout", type=float, default=1800)
    p.add_argument("--big", type=int, default=0, help="N large bodies at once instead of the flood")
    p.add_argument("--body-mib", type=int, default=60)
    p.add_argument("--bodies-at-once", type=int, default=2, help="BATCHGEN_LARGE_BODIES_AT_ONCE for --big")
    args = p.parse_args()
    if args.big:
        big_bodies(args.big, args.body_mib, args.bodies_at_once)
        return

    model_dir, _ = ensure_model("demo")
    stack = Stack(model_dir=model_dir, model_name="bench", worker_args=[], rate_limit_per_minute=0,
                  max_pending_per_model=args.queue_cap).start()
    db = stack.database()
    body = {"model": "bench", "params": {"max_new_tokens": 8},
            "prompts": [f"Question {i}: what is the capital of country number {i}?" for i in range(args.requests_per_job)]}
    statuses: Counter[str] = Counter()
    accepted: list[str] = []
    lock = threading.Lock()
    local = threading.local()

    def submit(_: int) -> None:
        if not hasattr(local, "http"):
            local.http = requests.Session()
            local.http.headers["Authorization"] = f"Bearer {stack.token}"
        try:
            resp = local.http.post(f"{stack.url}/v1/jobs", json=body, timeout=120)
            key = str(resp.status_code)
            if resp.status_code == 429 and "Retry-After" not in resp.headers:
                key = "429 without Retry-After"
        except requests.RequestException as exc:
            key = f"no answer ({type(exc).__name__})"
            resp = None
        with lock:
            statuses[key] += 1
            if resp is not None and resp.status_code == 202:
                accepted.append(resp.json()["id"])

    peaks: dict[str, float] = {}
    names = {"api": stack.procs[1].pid, "worker": stack.procs[2].pid, "redis": stack.procs[0].pid}
    sampling = True

    def sample() -> None:
        while sampling:
            for name, pid in names.items():
                peaks[name] = max(peaks.get(name, 0.0), sum(rss_mib(x) for x in tree(pid)))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        list(pool.map(submit, range(args.jobs)))
    burst = time.monotonic() - started
    print(f"{args.jobs} submissions from {args.clients} clients in {burst:.1f} s: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    queued = len(accepted) * args.requests_per_job
    print(f"accepted {len(accepted)} jobs = {queued} requests queued (cap {args.queue_cap})")

    deadline = time.monotonic() + args.drain_timeout
    while time.monotonic() < deadline:
        with db.read() as s:
            active = s.scalar(select(func.count()).where(Job.status.in_(("queued", "running"))))
        if active == 0:
            break
        time.sleep(1)
    drained = time.monotonic() - started
    sampling = False
    with db.read() as s:
        by_status = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        stored = s.scalar(select(func.count()).where(JobRequest.status == "succeeded"))
        per_job_ok = s.scalar(select(func.count()).where(Job.succeeded == Job.total, Job.status == "completed"))
    print(f"drained in {drained:.0f} s: jobs {by_status}, {stored} results stored "
          f"({stored / max(drained, 1e-9):.0f}/s), {per_job_ok} jobs with every request stored")
    print("peak resident memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items())
          + "; now: " + ", ".join(f"{k} {sum(rss_mib(x) for x in tree(pid)):.0f} MiB" for k, pid in names.items()))
    bad = {k: v for k, v in statuses.items() if k not in ("202", "429")}
    ok = not bad and per_job_ok == len(accepted) and stored == queued
    print("OK: every submission was answered 202 or 429, and every accepted job finished whole" if ok
          else f"PROBLEM: {bad or 'accepted jobs not finished whole'}")
    db.dispose()
    stack.stop()


def big_bodies(n: int, mib: int, at_once: int) -> None:
    """N bodies of ``mib`` MiB at once, then a 50,000-line batch file: peak API memory."""
    model_dir, _ = ensure_model("demo")
    stack = Stack(model_dir=model_dir, model_name="bench", worker_args=[], rate_limit_per_minute=0,
                  max_long_calls_per_key=0, large_bodies_at_once=at_once).start()
    try:
        api = stack.procs[1].pid
        headers = {"Authorization": f"Bearer {stack.token}", "Content-Type": "application/json"}
        requests.get(f"{stack.url}/v1/jobs", headers=headers)  # warm: imports, connections
        time.sleep(1)
        rest = sum(rss_mib(x) for x in tree(api))
        prompt = "word " * 40_000  # 200,000 characters
        count = mib * 1024 * 1024 // len(prompt)
        # Valid all through but for the last field: refused with 422 after the whole body is parsed.
        body = ('{"model": "bench-unserved", "prompts": [' + ",".join(f'"{prompt}"' for _ in range(count))
                + '], "params": {"max_new_tokens": 0}}').encode()
        peak = [rest]
        sampling = True

        def sample() -> None:
            while sampling:
                peak[0] = max(peak[0], sum(rss_mib(x) for x in tree(api)))
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=n) as pool:
            codes = Counter(pool.map(lambda _: str(requests.post(f"{stack.url}/v1/jobs", data=body, headers=headers,
                                                                 timeout=600).status_code), range(n)))
        took = time.monotonic() - started
        bodies_peak = peak[0]
        print(f"{n} bodies of {len(body) / 2**20:.0f} MiB at once in {took:.1f} s: "
              + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())))
        lines = "".join(f'{{"custom_id": "c{i}", "method": "POST", "url": "/v1/completions", "body": '
                        f'{{"model": "bench-unserved", "prompt": "Question {i}: what is the capital of country {i}?"}}}}\n'
                        for i in range(50_000)).encode()
        upload = requests.post(f"{stack.url}/v1/files", headers={"Authorization": headers["Authorization"]},
                               data={"purpose": "batch"}, files={"file": ("big.jsonl", lines)}, timeout=600).json()
        batch = requests.post(f"{stack.url}/v1/batches", headers=headers, timeout=600,
                              json={"input_file_id": upload["id"], "endpoint": "/v1/completions",
                                    "completion_window": "24h"}).json()
        sampling = False
        print(f"a batch input file of 50,000 lines ({len(lines) / 2**20:.1f} MiB): {batch.get('status')}, "
              f"{batch.get('request_counts', {}).get('total')} requests")
        print(f"API resident memory (gunicorn, {stack.api_workers} processes): at rest {rest:.0f} MiB, "
              f"peak with {n} x {mib} MiB bodies {bodies_peak:.0f} MiB, peak overall {peak[0]:.0f} MiB "
              f"(BATCHGEN_LARGE_BODIES_AT_ONCE={at_once}: bodies over 1 MiB parsed at once per process)")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
