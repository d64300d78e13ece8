"""Metrics every batchgen process keeps, and their Prometheus exposition.

One scrape must see every process (API processes under gunicorn, workers on many machines) with no
pushgateway and no shared directory. So each process keeps its counters and histograms in memory
and publishes a snapshot to Redis every few seconds, under a key that expires if the process stops
(``<prefix>metrics:<process>``); ``GET /metrics`` on any API process reads every snapshot and
renders them together, each with a ``process`` label, next to gauges read from the database.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

# name -> (type, help, histogram buckets)
DEFINITIONS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "batchgen_submit_seconds": ("histogram", "Time to accept a job (validate, store, dispatch).",
                                (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)),
    "batchgen_http_requests_total": ("counter", "HTTP requests answered, by route and status.", ()),
    "batchgen_batch_size": ("histogram", "Requests per generate_batch call.", (1, 2, 4, 8, 16, 32, 64, 128)),
    "batchgen_batch_tokens": ("histogram", "Prompt + new tokens per batch.",
                              (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)),
    "batchgen_generated_tokens_total": ("counter", "Tokens generated.", ()),
    "batchgen_prefix_tokens_saved_total": ("counter", "Prompt tokens not computed again: a prefix every "
                                           "request of a batch shares is computed once.", ()),
    "batchgen_generation_seconds_total": ("counter", "Time spent in generate_batch (summed over slots).", ()),
    "batchgen_generation_tokens_per_second": ("gauge", "Generated tokens per second of the last batch.", ()),
    "batchgen_queue_wait_seconds": ("histogram", "From a request reaching a worker to its batch starting.",
                                    (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300)),
    "batchgen_time_to_result_seconds": ("histogram", "From a request's submission to its result stored.",
                                        (0.1, 0.5, 1, 5, 15, 60, 300, 1800, 3600, 86400)),
    "batchgen_model_load_seconds": ("gauge", "Time the worker took to load its model.", ()),
    "batchgen_batch_limit": ("gauge", "Batch limits in force in a worker (max_batch_tokens, max_batch_size, "
                                      "slots), from its calibration and what it has seen since.", ()),
    "batchgen_calibration_ratio": ("gauge", "Output tokens/s a worker sees over what its calibration expects "
                                            "for batches of that shape (recent average).", ()),
    "batchgen_batch_limit_moves_total": ("counter", "Times a worker moved its token budget.", ()),
    "batchgen_calibration_seconds": ("gauge", "Time the worker spent measuring its device (0: from the cache).", ()),
    "batchgen_worker_info": ("gauge", "A worker's device, compute type, thread layout and where its limits "
                                      "came from (value 1).", ()),
    "batchgen_worker_cpu_seconds_total": ("counter", "A worker's CPU time: part=engine for CTranslate2's own "
                                                     "threads, part=service for everything else, and that split "
                                                     "(broker, database, tokenizer, scheduling, generation, other; "
                                                     "worker/cpu.py).", ()),
    "batchgen_device_memory_bytes": ("gauge", "Memory in use on the worker's device (RSS on CPU).", ()),
    "batchgen_jobs": ("gauge", "Jobs by status.", ()),
    "batchgen_requests": ("gauge", "Requests by status.", ()),
    "batchgen_queue_depth": ("gauge", "Messages waiting in a model's queue (each carries up to "
                                      "BATCHGEN_REQUESTS_PER_MESSAGE request ids).", ()),
}


_KEYS: dict[tuple[tuple[str, str], ...], str] = {}


def _key(labels: Mapping[str, str]) -> str:
    """A series' key: its labels as sorted JSON, made once per label set (a counter moves on every
    HTTP answer; label sets are few: routes, statuses, models)."""
    items = tuple(labels.items())
    key = _KEYS.get(items)
    if key is None:
        if len(_KEYS) > 10_000:
            _KEYS.clear()
        key = _KEYS[items] = json.dumps(sorted(items))
    return key


class Metrics:
    """The counters, gauges and histograms of one process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[str, Any]] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            series = self._values.setdefault(name, {})
            key = _key(labels)
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values.setdefault(name, {})[_key(labels)] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.observe_many(name, (value,), **labels)

    def observe_many(self, name: str, values: Iterable[float], **labels: str) -> None:
        """Observe several values of one histogram at once (a batch's requests): one lock, one key."""
        buckets = DEFINITIONS[name][2]
        key = _key(labels)
        with self._lock:
            series = self._values.setdefault(name, {})
            h = series.setdefault(key, {"counts": [0] * (len(buckets) + 1), "sum": 0.0, "count": 0})
            counts = h["counts"]
            for value in values:
                counts[bisect.bisect_left(buckets, value)] += 1
                h["sum"] += value
                h["count"] += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Everything, as JSON-ready data."""
        with self._lock:
            return json.loads(json.dumps(self._values))


class _Snapshots:
    """A prometheus_client collector of ``{process: snapshot}``: the library does the exposition
    (names, escaping, number formats); a process of "" adds no label."""

    def __init__(self, snapshots: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        by_name: dict[str, list[tuple[str, str, Any]]] = {}
        for process, snap in self.snapshots.items():
            for name, series in snap.items():
                for key, value in series.items():
                    by_name.setdefault(name, []).append((process, key, value))
        for name in sorted(by_name):
            kind, help_text, buckets = DEFINITIONS.get(name, ("gauge", "", ()))
            # A counter family is named without "_total"; its samples carry it.
            family = Metric(name.removesuffix("_total") if kind == "counter" else name, help_text, kind)
            for process, key, value in by_name[name]:
                labels = dict(json.loads(key))
                if process:
                    labels["process"] = process
                if kind != "histogram":
                    family.add_sample(name, labels, value)
                    continue
                cumulative = 0
                for bound, count in zip([*buckets, math.inf], value["counts"], strict=True):
                    cumulative += count
                    family.add_sample(f"{name}_bucket", {**labels, "le": floatToGoString(bound)}, cumulative)
                family.add_sample(f"{name}_sum", labels, value["sum"])
                family.add_sample(f"{name}_count", labels, value["count"])
            yield family


def render(snapshots: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Prometheus text format for ``{process: snapshot}``; a process of "" adds no label."""
    return generate_latest(_Snapshots(snapshots)).decode()  # type: ignore[arg-type]


class RedisExporter:
    """Publishes a process's snapshot to Redis every ``interval_s``; the key expires if it stops."""

    def __init__(self, metrics: Metrics, redis: Any, key: str, interval_s: float = 5.0,
                 before_publish: Any = None) -> None:
        self.metrics, self.redis, self.key, self.interval_s = metrics, redis, key, interval_s
        self.before_publish = before_publish
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)

    def start(self) -> RedisExporter:
        self._thread.start()
        return self

    def publish(self) -> None:
        if self.before_publish is not None:
            self.before_publish()
        self.redis.set(self.key, json.dumps(self.metrics.snapshot()), ex=max(10, int(self.interval_s * 6)))

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except Exception:  # Redis away: the next round tries again
                pass
