"""Operating the service: readiness and metrics (both public: no user data, for probes and
Prometheus; keep them inside your network).

- ``GET /readyz``: 200 when the database answers, Redis answers and the schema is at the newest
  migration; 503 with what failed otherwise.
- ``GET /metrics``: Prometheus text. Jobs and requests by status and queue depth per model, read
  at scrape time; with every process's own counters and histograms (API processes, workers on any
  machine), which each publishes to Redis (see ``core.metrics``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from sqlalchemy import func, select, text

from core import queueing
from core.db import current_revision, head_revision
from core.metrics import Metrics, RedisExporter, render
from core.queueing import redis_client
from core.tables import Job
from webapi.services import services

log = logging.getLogger("batchgen.api")
bp = Blueprint("ops", __name__)
REQUEST_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")


def init_app(app: Flask) -> None:
    """Count every answer, time submissions, and publish this process's metrics to Redis."""
    svc = app.extensions["batchgen"]
    svc.metrics = Metrics()
    svc.metrics_page = Cached(max(1.0, svc.settings.metrics_interval_s))

    @app.before_request
    def _start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        svc.metrics.inc("batchgen_http_requests_total", route=route, method=request.method,
                        status=str(response.status_code))
        if request.endpoint == "jobs.create_job" and "started" in g:
            svc.metrics.observe("batchgen_submit_seconds", time.perf_counter() - g.started)
        return response

    if svc.settings.redis_url:
        key = f"{svc.settings.redis_prefix}metrics:api:{socket.gethostname()}:{os.getpid()}"
        svc.exporter = RedisExporter(svc.metrics, redis_client(svc.settings.redis_url, socket_timeout=2),
                                     key, interval_s=svc.settings.metrics_interval_s).start()


def _redis() -> Any:
    svc = services()
    if getattr(svc, "_ops_redis", None) is None:
        svc._ops_redis = redis_client(svc.settings.redis_url, socket_timeout=2)
    return svc._ops_redis


def live_workers() -> dict[str, list[dict[str, Any]]] | None:
    """Workers alive now, per model, each with its device and the batch limits it has in force,
    from the snapshots workers publish to Redis (a snapshot expires when its worker stops); None
    when Redis cannot be asked."""
    svc = services()
    if not svc.settings.redis_url:
        return None
    prefix = f"{svc.settings.redis_prefix}metrics:"
    found: dict[str, list[dict[str, Any]]] = {}
    try:
        client = _redis()
        for key in client.scan_iter(match=prefix + "worker:*", count=500):
            raw = client.get(key)
            if not raw:
                continue
            snapshot = json.loads(raw)
            for labels in snapshot.get("batchgen_model_load_seconds", {}):
                model = dict(json.loads(labels)).get("model")
                if model:
                    found.setdefault(model, []).append(_serving(key.decode()[len(prefix):], model, snapshot))
    except Exception as exc:
        log.warning("worker heartbeats unavailable: %s", exc)
        return None
    return found


def _serving(process: str, model: str, snapshot: dict[str, Any]) -> dict[str, Any]:
    """What one worker's snapshot says about how it serves ``model``."""
    info: dict[str, str] = {}
    for labels in snapshot.get("batchgen_worker_info", {}):
        found = dict(json.loads(labels))
        if found.get("model") == model:
            info = found
    limits: dict[str, float] = {}
    for labels, value in snapshot.get("batchgen_batch_limit", {}).items():
        found = dict(json.loads(labels))
        if found.get("model") == model:
            limits[found.get("limit", "")] = value
    ratio = next((v for labels, v in snapshot.get("batchgen_calibration_ratio", {}).items()
                  if dict(json.loads(labels)).get("model") == model), None)

    def whole(name: str) -> int | None:
        return int(limits[name]) if name in limits else None

    return {"worker": process, "device": info.get("device", ""), "compute_type": info.get("compute_type", ""),
            "inter_threads": int(info.get("inter_threads", 0) or 0),
            "intra_threads": int(info.get("intra_threads", 0) or 0),
            "max_batch_tokens": whole("max_batch_tokens"), "max_batch_size": whole("max_batch_size"),
            "slots": whole("slots"), "source": info.get("source", ""),
            "calibration_ratio": round(ratio, 3) if ratio is not None else None}


@bp.get("/readyz")
def readyz() -> tuple[dict[str, Any], int]:
    """Ready to serve: database, Redis, schema."""
    svc = services()
    checks: dict[str, str] = {}
    try:
        with svc.db.read() as session:
            session.execute(text("SELECT 1"))
        revision = current_revision(svc.db.engine)
        checks["database"] = "ok"
        checks["migrations"] = "ok" if revision == head_revision() else f"at {revision}, head is {head_revision()}"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
        checks["migrations"] = "unknown"
    try:
        _redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return {"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503


class Cached:
    """A value recomputed at most once per ``ttl_s`` in this process, by one caller at a time;
    callers arriving while it is recomputed get the previous value instead of waiting (or
    recomputing it too). ``/metrics`` is public: a scraper in a loop must not be able to make
    every call an aggregate over the jobs table."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._value: Any = None
        self._at = float("-inf")

    def get(self, compute: Callable[[], Any]) -> Any:
        if time.monotonic() - self._at < self.ttl_s:
            return self._value
        if not self._lock.acquire(blocking=self._value is None):
            return self._value  # someone is recomputing it: the previous value will do
        try:
            if time.monotonic() - self._at >= self.ttl_s:
                self._value, self._at = compute(), time.monotonic()
            return self._value
        finally:
            self._lock.release()


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus exposition of every batchgen process, and of the jobs in the database
    (recomputed at most every ``metrics_interval_s`` per API process: processes publish their
    own figures that often anyway)."""
    svc = services()
    return Response(svc.metrics_page.get(_render_metrics), mimetype="text/plain; version=0.0.4")


def _render_metrics() -> str:
    svc = services()
    shared = Metrics()
    with svc.db.read() as session:
        for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
            shared.set("batchgen_jobs", count, status=status)
        sums = session.execute(select(*[func.coalesce(func.sum(getattr(Job, s)), 0) for s in REQUEST_STATUSES
                                        if s != "succeeded"], func.coalesce(func.sum(Job.succeeded), 0))).one()
    for status, value in zip([s for s in REQUEST_STATUSES if s != "succeeded"] + ["succeeded"], sums, strict=True):
        shared.set("batchgen_requests", value, status=status)
    snapshots: dict[str, Any] = {"": shared.snapshot()}
    try:
        client = _redis()
        for spec in svc.registry():
            shared.set("batchgen_queue_depth", sum(client.llen(k) for k in queueing.queue_keys(svc.settings, spec.name)),
                       model=spec.name)
        snapshots[""] = shared.snapshot()
        prefix = f"{svc.settings.redis_prefix}metrics:"
        for key in client.scan_iter(match=prefix + "*", count=500):
            raw = client.get(key)
            if raw:
                snapshots[key.decode()[len(prefix):]] = json.loads(raw)
    except Exception as exc:  # Redis away: the database gauges still go out
        log.warning("metrics from Redis unavailable: %s", exc)
    return render(snapshots)
