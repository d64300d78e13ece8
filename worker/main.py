"""``python -m worker``: one worker process = one model on one device.

    python -m worker --model demo --device cpu
    python -m worker --model meta-llama/Llama-2-7b-chat-hf --device cuda --device-index 1

The process pins itself to its GPU before CTranslate2 loads, loads the model once, and runs a
Celery worker with a thread pool (no fork ever happens after the model is loaded) that consumes
only its model's queue.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from core.settings import Settings, SettingsError

log = logging.getLogger("batchgen.worker")


EXAMPLES = """examples:
  batchgen worker --model demo                                  # the demo model on the CPU
  batchgen worker --model meta-llama/Llama-2-7b-chat-hf --device cuda --device-index 1
  BATCHGEN_REDIS_URL=redis://queue:6379/0 BATCHGEN_DATABASE_URL=postgresql://... batchgen worker --model demo
"""


def parse_args(argv: list[str] | None, prog: str = "python -m worker") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="registered model name or alias (default: BATCHGEN_MODEL or demo)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: BATCHGEN_DEVICE or cpu")
    p.add_argument("--device-index", type=int, help="GPU index on this machine (default 0)")
    p.add_argument("--compute-type", help="CTranslate2 compute type (default: int8 on CPU, "
                                          "int8_float16 on CUDA)")
    p.add_argument("--inter-threads", type=int, help="CTranslate2 replicas (default: per device)")
    p.add_argument("--intra-threads", type=int, help="threads per replica (default: per device)")
    p.add_argument("--max-batch-size", type=int, help="requests per batch (default: per device)")
    p.add_argument("--max-batch-tokens", type=int, help="prompt+new tokens per batch (default: per device)")
    p.add_argument("--max-wait-ms", type=float, help="longest a request waits for a batch to fill")
    p.add_argument("--inflight", type=int, help="messages a worker holds at once (default 256)")
    p.add_argument("--ready-file", type=Path, help="touch this file once the worker consumes")
    p.add_argument("--events", action="store_true", help="send Celery's worker events (for Flower; requests are not Celery tasks here)")
    p.add_argument("--loglevel", help="default: BATCHGEN_LOG_LEVEL or INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m worker") -> int:
    """Start the worker; returns the exit status."""
    args = parse_args(argv, prog)
    try:
        settings = Settings.from_env(
            model=args.model, device=args.device, device_index=args.device_index,
            compute_type=args.compute_type, inter_threads=args.inter_threads,
            intra_threads=args.intra_threads, max_batch_size=args.max_batch_size,
            max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
            worker_inflight=args.inflight, log_level=args.loglevel,
        )
    except SettingsError as exc:
        print(f"batchgen worker: {exc}", file=sys.stderr)
        return 2

    from core.logs import configure_logging

    configure_logging(settings.log_level, process="worker", fmt=settings.log_format)
    if not settings.redis_url:
        log.error("BATCHGEN_REDIS_URL is not set; a worker needs the broker the API publishes to")
        return 2

    from worker.device import pin_cuda_device, plan_device

    if settings.device == "cuda":
        pin_cuda_device(settings.device_index)  # before anything can initialise CUDA
        log.info("pinned to GPU %d (CUDA_VISIBLE_DEVICES=%s)", settings.device_index,
                 os.environ["CUDA_VISIBLE_DEVICES"])
    plan = plan_device(settings)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from core.db import Database, current_revision, head_revision
    from core.errors import UnknownModelError
    from core.registry import load_registry

    registry = load_registry(settings)
    try:
        spec = registry.resolve(settings.model)
    except UnknownModelError as exc:
        log.error("%s", exc.message)
        return 2
    model_dir = registry.directory(spec)
    if not registry.is_installed(spec):
        hint = ("build it with `batchgen build-model --preset demo`" if spec.name == "demo" else
                f"convert it with `batchgen convert {spec.source or '<checkpoint>'} --name {spec.name}`")
        log.error("model %s is not installed in %s; %s", spec.name, model_dir, hint)
        return 2

    db = Database(settings.database_url)
    if current_revision(db.engine) != head_revision():
        log.error("the database is not migrated to the current schema; run `batchgen migrate`")
        return 2

    from worker.batcher import Batcher
    from worker.celery_app import create_celery
    from worker.device import apply_choice, fully_explicit
    from worker.runner import ModelRunner
    from worker.scheduling import BatchPolicy

    calibration = None
    if settings.calibrate != "off" and not fully_explicit(settings):
        from worker import calibration as calibration_service

        try:
            calibration = calibration_service.for_worker(
                model=spec.name, model_dir=model_dir, device=plan.device, device_index=plan.device_index,
                physical_index=plan.physical_index, context_length=spec.context_length,
                compute_type=settings.compute_type, inter_threads=settings.inter_threads,
                intra_threads=settings.intra_threads, cache_dir=settings.calibration_dir,
                mode=settings.calibrate, budget_s=settings.calibration_budget_s)
            plan = apply_choice(plan, calibration.choice, settings, calibration.source)
        except Exception:  # no model library quirk may keep a worker from serving
            log.exception("calibration failed; serving with the device defaults")

    try:
        runner = ModelRunner(model_dir, spec, device=plan.device, device_index=plan.device_index,
                             compute_type=plan.compute_type, inter_threads=plan.inter_threads,
                             intra_threads=plan.intra_threads, fault_kill_on=settings.fault_kill_on,
                             fault_generate_s=settings.fault_generate_s)
    except (RuntimeError, ValueError) as exc:  # no CUDA driver, no such GPU, bad compute type
        log.error("cannot load %s on %s:%d (%s): %s", spec.name, plan.device, plan.physical_index,
                  plan.compute_type, exc)
        return 2
    policy = BatchPolicy(max_batch_size=plan.max_batch_size, max_batch_tokens=plan.max_batch_tokens,
                         max_wait_ms=settings.max_wait_ms, slots=plan.slots, batch_seconds=plan.batch_seconds)
    # The batcher keeps measuring and moves its token budget, unless the budget was given
    # explicitly or calibration is off (fixed defaults, as tests and benchmarks may want).
    from worker.calibration import BATCH_OVERHEAD_S
    from worker.tuning import OnlineTuner

    tuner = OnlineTuner(budget=plan.max_batch_tokens, max_batch_size=plan.max_batch_size,
                        expected=calibration.expected if calibration is not None else None,
                        batch_seconds=plan.batch_seconds, slots=plan.slots, replicas=plan.inter_threads,
                        overhead_s=BATCH_OVERHEAD_S, size_cap=settings.max_batch_size,
                        # never beyond the largest batch calibration ran without error
                        max_budget=calibration.largest_batch() if calibration is not None else 4 * plan.max_batch_tokens,
                        frozen=bool(settings.max_batch_tokens) or settings.calibrate == "off")
    log.info("batching (%s): %s", plan.source, policy)
    from worker.streaming import Publisher

    publisher = Publisher(settings)
    from core.metrics import Metrics, RedisExporter
    from worker.device import memory_in_use

    metrics = Metrics()
    metrics.set("batchgen_model_load_seconds", runner.load_seconds, model=spec.name)
    metrics.set("batchgen_worker_info", 1, model=spec.name, device=f"{plan.device}{plan.physical_index}",
                compute_type=plan.compute_type, inter_threads=str(plan.inter_threads),
                intra_threads=str(plan.intra_threads), source=plan.source)
    metrics.set("batchgen_calibration_seconds",
                calibration.seconds if calibration is not None and calibration.source == "measured" else 0.0,
                model=spec.name)
    batcher = Batcher(runner=runner, db=db, policy=policy, announcer=publisher, lease_s=settings.lease_s,
                      max_attempts=settings.max_attempts, metrics=metrics, tuner=tuner,
                      labels={"model": spec.name}).start()
    app = create_celery(settings)
    queue = settings.queue_for(spec.name)
    import redis

    from core.queueing import redis_client as pooled_redis
    from worker.batcher import Requeue
    from worker.consumer import Consumer, install

    # The model's queue is taken in bulk beside Celery (worker/consumer.py); Celery's own
    # consumer listens on a queue nothing is published to, for its process model: remote
    # control, events, and kombu's restore of messages a dead worker left unacked (kombu runs
    # that only for a channel that consumes).
    consumer = Consumer(pooled_redis(settings.redis_url, socket_timeout=10, max_connections=8), settings,
                        spec.name, batcher.submit, inflight=settings.worker_inflight, requeue=Requeue,
                        kill_before_ack=settings.fault_kill_before_ack)
    install(app, consumer)

    from worker.janitor import Janitor

    redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    janitor = Janitor(db, interval_s=settings.reconcile_interval_s, settings=settings, model=spec.name,
                      redis=redis_client).start()
    node = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec.name)
    process_name = f"worker:{socket.gethostname()}:{os.getpid()}"

    from worker.cpu import CpuSplit

    cpu = CpuSplit(lambda: batcher.tokenizer_s).start()

    def _device_memory() -> None:
        used = memory_in_use(plan.device, plan.physical_index)
        if used is not None:
            metrics.set("batchgen_device_memory_bytes", used, device=f"{plan.device}{plan.physical_index}")
        for part, seconds in cpu.read().items():
            metrics.set("batchgen_worker_cpu_seconds_total", seconds, part=part)

    exporter = RedisExporter(metrics, redis_client, f"{settings.redis_prefix}metrics:{process_name}",
                             interval_s=settings.metrics_interval_s, before_publish=_device_memory)
    try:
        exporter.publish()  # at once: GET /v1/models counts this worker from its first snapshot
    except Exception as exc:
        log.warning("could not publish metrics: %s", exc)
    exporter.start()

    from celery.signals import worker_shutting_down

    @worker_shutting_down.connect(weak=False)
    def _hand_back(**_: object) -> None:
        # Warm shutdown (SIGTERM): batches that run finish and are stored, the rest go back.
        consumer.stop_fetching()
        batcher.hand_back()

    if args.ready_file is not None:
        from celery.signals import worker_ready

        ready_file: Path = args.ready_file

        @worker_ready.connect(weak=False)
        def _ready(**_: object) -> None:
            ready_file.write_text(str(os.getpid()))

    argv_celery = [
        "worker", "--pool=threads", "--concurrency=1", f"--queues={queue}.celery",
        f"--hostname={node}.{plan.device}{plan.physical_index}.{os.getpid()}@{socket.gethostname()}",
        "--without-gossip", "--without-mingle", f"--loglevel={settings.log_level}",
        *(["--task-events"] if args.events else []),
    ]
    log.info("consuming %s on %s:%d", queue, plan.device, plan.physical_index)
    try:
        app.worker_main(argv_celery)
    finally:
        consumer.stop_fetching(wait_s=5.0)  # nothing taken from now on reaches the batcher
        exporter.stop()
        janitor.stop()
        batcher.stop()
        consumer.close()
        publisher.close()
        db.dispose()
    return 0
