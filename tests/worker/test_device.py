"""Device plans, GPU pinning, and a worker consuming only its own model's queue."""

import os
import subprocess
import sys

import pytest

from core.settings import Settings
from tests.conftest import make_key
from tests.support import ROOT, ApiServer, WorkerProcess, queued_request_ids
from worker.device import plan_device


def test_cpu_defaults_one_single_threaded_replica_per_core():
    plan = plan_device(Settings.from_env({}))
    cores = len(os.sched_getaffinity(0))
    assert (plan.device, plan.compute_type, plan.intra_threads) == ("cpu", "int8", 1)
    assert plan.inter_threads == plan.slots == min(cores, 8)


def test_cuda_defaults_and_explicit_settings_win():
    plan = plan_device(Settings.from_env({"BATCHGEN_DEVICE": "cuda", "BATCHGEN_DEVICE_INDEX": "3"}))
    assert (plan.compute_type, plan.device_index, plan.physical_index) == ("int8_float16", 0, 3)
    assert plan.slots == 2  # one generating, one queued behind it
    plan = plan_device(Settings.from_env({"BATCHGEN_INTER_THREADS": "1", "BATCHGEN_INTRA_THREADS": "2",
                                          "BATCHGEN_COMPUTE_TYPE": "int8_float32", "BATCHGEN_MAX_BATCH_SIZE": "5"}))
    assert (plan.inter_threads, plan.intra_threads, plan.compute_type, plan.max_batch_size) == (1, 2, "int8_float32", 5)


def test_a_cuda_worker_pins_its_gpu_before_loading_and_fails_clearly_without_one(make_settings, sqlite_url):
    settings = make_settings(sqlite_url)
    proc = subprocess.run([sys.executable, "-m", "worker", "--model", "tiny-chat", "--device", "cuda",
                           "--device-index", "3"], env={**os.environ, **settings.to_env()}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        pytest.skip("this machine has a GPU 3")
    assert proc.returncode == 2, proc.stderr
    assert "pinned to GPU 3 (CUDA_VISIBLE_DEVICES=3)" in proc.stderr
    assert "cannot load tiny-chat on cuda:3" in proc.stderr


@pytest.mark.slow
def test_each_worker_consumes_only_its_model_queue(make_settings, sqlite_url):
    from webapi import create_app

    settings = make_settings(sqlite_url)
    app = create_app(settings)
    api = ApiServer(app, make_key(sqlite_url)).start()
    chat_worker = WorkerProcess(settings, "tiny-chat").start()
    base_worker = None
    try:
        job = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny-base", "prompts": ["a", "b"],
                                                        "params": {"max_new_tokens": 3}}).json()
        # A job for the chat worker's own model, submitted after: once it is done, the chat worker
        # has long seen what is queued, and left the other model's job alone.
        marker = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny-chat", "prompts": ["c"],
                                                           "params": {"max_new_tokens": 3}}).json()
        assert api.wait_for_job(marker["id"])["status"] == "completed"
        assert api.http.get(f"{api.url}/v1/jobs/{job['id']}").json()["status"] == "queued"
        assert sorted(queued_request_ids(settings, "tiny-base")) == sorted(
            r["id"] for r in api.http.get(f"{api.url}/v1/jobs/{job['id']}/results").json()["data"])
        base_worker = WorkerProcess(settings, "tiny-base").start()
        assert api.wait_for_job(job["id"])["status"] == "completed"
    finally:
        for w in (chat_worker, base_worker):
            if w is not None:
                w.stop()
        api.stop()
