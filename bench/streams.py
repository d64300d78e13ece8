"""Waiting costs no thread: one API process holding a thousand event streams and a thousand
synchronous calls at once, and its memory as they open.

    python -m bench.streams [--streams 1000] [--calls 1000] [--concurrency 64]

Starts the real stack (one gunicorn process with gevent workers, Redis, SQLite, one worker on the
demo model). Opens ``--streams`` event streams (``GET /v1/jobs/{id}/events`` on a job no worker
serves, so they stay open), then ``--calls`` synchronous completions for that model (they wait
for a worker that never comes), from one client process over plain sockets, printing the API
process's resident memory as they open. Every stream must get its first event and every call
must be holding its connection when counted. Then it closes them all and sends completions to the
served model from ``--concurrency`` clients at once on one key, with the default limits, and
counts the answers: all must be 200.

The per-key rate limit and per-key cap on long calls are off for the first part only (one key
opens everything; those limits are per key by design and are tested in tests/test_tenants.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.flood import rss_mib, tree
from bench.stack import Stack
from bench.workload import ensure_model


async def _open(port: int, request: bytes, expect: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace").splitlines()[0])
    if expect:
        await asyncio.wait_for(reader.readuntil(expect), 60)
    return reader, writer


async def hold(port: int, token: str, job_id: str, streams: int, calls: int, api_pids: list[int]) -> list[str]:
    lines = []
    rss = lambda: sum(rss_mib(p) for pid in api_pids for p in tree(pid))  # noqa: E731
    lines.append(f"{'open':>6} {'streams':>8} {'calls':>6}  API process resident memory")
    lines.append(f"{0:>6} {0:>8} {0:>6}  {rss():7.0f} MiB")
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    stream_req = (f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
    body = json.dumps({"model": "bench-unserved", "prompt": "Once upon a time", "max_tokens": 8}).encode()
    call_req = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    step = 250
    for start in range(0, streams, step):
        held += await asyncio.gather(*[_open(port, stream_req, b"event: progress")
                                       for _ in range(min(step, streams - start))])
        lines.append(f"{len(held):>6} {len(held):>8} {0:>6}  {rss():7.0f} MiB")
    for start in range(0, calls, step):
        n = min(step, calls - start)
        for _ in range(n):  # a synchronous call is answered only at its end: count it once it is in
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(call_req)
            held.append((reader, writer))
        await asyncio.sleep(2)
        lines.append(f"{len(held):>6} {streams:>8} {len(held) - streams:>6}  {rss():7.0f} MiB")
    early = [bytes(r._buffer[:12]) for r, _ in held[streams:] if r.at_eof() or len(r._buffer)]  # noqa: SLF001
    if early:
        lines.append(f"PROBLEM: {len(early)} synchronous calls were answered while they should wait: "
                     + ", ".join(f"{k.decode(errors='replace')} x{v}" for k, v in Counter(early).items()))
    await asyncio.sleep(3)
    lines.append(f"{len(held):>6} {streams:>8} {calls:>6}  {rss():7.0f} MiB  (after 3 s more)")
    for _, writer in held:
        writer.close()
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args()
    model_dir, _ = ensure_model("demo")
    # Room for every long call asked for (the default, BATCHGEN_API_CONNECTIONS 2000 less 100 kept
    # for short calls, holds 1,900 in one process).
    stack = Stack(model_dir=model_dir, model_name="bench", worker_args=[], api_workers=1, rate_limit_per_minute=0,
                  max_long_calls_per_key=0, sync_timeout_s=600,
                  api_connections=max(2000, args.streams + args.calls + 200)).start()
    try:
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {stack.token}"
        job = http.post(f"{stack.url}/v1/jobs", json={"model": "bench-unserved", "prompts": ["waits"]}).json()
        api_pids = stack.api_pids[1:] or stack.api_pids  # the gunicorn worker (the master holds nothing)
        started = time.monotonic()
        lines = asyncio.run(hold(stack.api_port, stack.token, job["id"], args.streams, args.calls, api_pids))
        print(f"one API process (gunicorn, gevent), {args.streams} event streams then {args.calls} waiting "
              f"synchronous calls, opened in {time.monotonic() - started:.0f} s:")
        print("\n".join(lines))
    finally:
        stack.stop()

    # With the default limits: one key, N clients at once, completions on a served model.
    stack = Stack(model_dir=model_dir, model_name="bench", worker_args=[], api_workers=1).start()
    try:
        token = stack.token

        def complete(i: int) -> str:
            resp = requests.post(f"{stack.url}/v1/completions", headers={"Authorization": f"Bearer {token}"},
                                 json={"model": "bench", "prompt": f"Question {i}:", "max_tokens": 16}, timeout=600)
            return str(resp.status_code) if resp.status_code == 200 else f"{resp.status_code} {resp.text[:80]}"

        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = Counter(pool.map(complete, range(4 * args.concurrency)))
        took = time.monotonic() - started
        print(f"{4 * args.concurrency} completions from {args.concurrency} clients at once on one key, default "
              f"limits, in {took:.1f} s: " + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())))
        print("OK: no error" if set(answers) == {"200"} else "PROBLEM: errors above")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
