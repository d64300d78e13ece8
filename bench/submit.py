"""How long the API takes to accept one big job, and to dispatch it in the background.

    python -m bench.submit [--requests 50000] [--postgres postgresql://postgres@127.0.0.1/postgres]

Runs the real app (in process, Flask's test client: no HTTP server in the measurement) against a
private Redis and SQLite, and PostgreSQL when a server URL is given (a database is created for the
run and dropped after). Prints, per database, the time to the 202 and the time until every
request's message is in Redis.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from cli.processes import start_redis
from core.auth import create_key
from core.db import Database, upgrade
from core.settings import Settings


def measure(url: str, workdir: Path, redis_url: str, n: int) -> tuple[float, float]:
    from webapi import create_app

    upgrade(url)
    db = Database(url)
    with db.write() as session:
        _, token = create_key(session=session, owner="bench")
    registry = workdir / "models.json"
    registry.write_text(json.dumps({"models": [{"name": "m", "path": str(workdir), "chat": False}]}))
    settings = Settings.model_validate({"var_dir": workdir, "database_url": url, "redis_url": redis_url,
                                        "registry_file": registry, "rate_limit_per_minute": 0,
                                        "redis_prefix": f"bench-{uuid.uuid4().hex[:6]}:"})
    app = create_app(settings)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    body = json.dumps({"model": "m", "params": {"max_new_tokens": 64},
                       "prompts": [f"Summarize text number {i}: the quick brown fox jumps over the lazy dog."
                                   for i in range(n)]})
    client.post("/v1/jobs", data=json.dumps({"model": "m", "prompts": ["warm up"]}), content_type="application/json")
    started = time.perf_counter()
    resp = client.post("/v1/jobs", data=body, content_type="application/json")
    accepted = time.perf_counter() - started
    assert resp.status_code == 202, resp.get_data(as_text=True)
    app.extensions["batchgen"].dispatcher.wait_idle()
    dispatched = time.perf_counter() - started
    app.extensions["batchgen"].close()
    db.dispose()
    return accepted, dispatched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=50_000)
    p.add_argument("--postgres", help="admin URL of a PostgreSQL server to measure as well")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="batchgen-submit-"))
    redis, redis_url = start_redis(workdir / "redis")
    databases = {"sqlite": f"sqlite:///{workdir / 'submit.db'}"}
    pg_name = None
    if args.postgres:
        import psycopg
        from sqlalchemy.engine import make_url

        pg_name = f"batchgen_submit_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_name}"')
        databases["postgresql"] = make_url(args.postgres).set(database=pg_name).render_as_string(False)
    try:
        for name, url in databases.items():
            accepted, dispatched = measure(url, workdir, redis_url, args.requests)
            print(f"{name:10} {args.requests} requests: accepted (202) in {accepted:.2f} s, "
                  f"all messages in Redis after {dispatched:.1f} s")
    finally:
        if pg_name:
            import psycopg

            with psycopg.connect(args.postgres, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
