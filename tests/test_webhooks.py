"""Webhooks end to end: a real worker ends jobs, the API's deliverer POSTs signed events to a real
receiver, and what a client reads of the delivery follows; OpenAI batches through the official SDK,
whose own verifier (``client.webhooks.unwrap``) checks our signatures; the API process that was
sending dies mid-send and the event still arrives."""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid

import openai
import pytest

from core.settings import Settings
from core.webhooks import new_secret
from tests.conftest import make_key
from tests.support import ApiServer, GunicornApi, Receiver, WorkerProcess, children_running, wait_until

FAST = {"webhook_allowed_hosts": "127.0.0.1", "webhook_retry_s": "0.3,0.3,0.3", "webhook_interval_s": 0.1,
        "webhook_timeout_s": 3.0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server, registry_file, sqlite_template):
    """The API over HTTP (webhooks allowed to 127.0.0.1, retried fast) with a tiny-chat worker."""
    from webapi import create_app

    var = tmp_path_factory.mktemp("webhooks")
    shutil.copy(sqlite_template, var / "batchgen.db")
    settings = Settings.model_validate({
        "var_dir": var, "database_url": f"sqlite:///{var / 'batchgen.db'}", "redis_url": redis_server.url,
        "redis_prefix": f"test-{uuid.uuid4().hex[:8]}:", "registry_file": registry_file, "max_wait_ms": 5.0,
        "model": "tiny-chat", "calibrate": "off", **FAST})
    app = create_app(settings)
    token = make_key(settings.database_url)
    api = ApiServer(app, token).start()
    worker = WorkerProcess(settings, "tiny-chat").start()
    sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key=token, max_retries=0, timeout=60)
    yield api, settings, sdk
    worker.stop()
    api.stop()
    app.extensions["batchgen"].close()


def _verified(sdk: openai.OpenAI, got: Receiver.Got, secret: str) -> dict:
    sdk.webhooks.verify_signature(got.body, got.headers, secret=secret)  # OpenAI's verifier, not ours
    return json.loads(got.body)


def _webhook_of(api, path: str) -> dict:
    return api.http.get(f"{api.url}{path}", timeout=10).json()["webhook"]


def test_a_job_webhook_is_retried_until_delivered_signed_and_visible_on_the_job(stack):
    api, _, sdk = stack
    with Receiver(answers=(500, 200)) as receiver:
        resp = api.http.post(f"{api.url}/v1/jobs", json={
            "model": "tiny-chat", "prompts": ["Hello", "Bonjour"], "params": {"max_new_tokens": 4},
            "metadata": {"run": "7"}, "webhook": {"url": receiver.url + "?source=batchgen"}}, timeout=30)
        assert resp.status_code == 202, resp.text
        job = resp.json()
        secret = job["webhook"]["secret"]
        assert secret.startswith("whsec_") and job["webhook"]["status"] == "waiting"
        assert _webhook_of(api, f"/v1/jobs/{job['id']}")["secret"] is None  # shown once
        wait_until(lambda: _webhook_of(api, f"/v1/jobs/{job['id']}")["status"] == "delivered", 60,
                   what="the webhook to be delivered")
        state = _webhook_of(api, f"/v1/jobs/{job['id']}")
        first, second = receiver.requests
    assert (state["attempts"], state["last_response_status"], state["last_error"]) == (2, 200, None)
    assert state["type"] == "job.completed" and state["delivered_at"] is not None
    assert first.path == second.path == "/hook?source=batchgen"
    # One event, sent twice: the same webhook-id, each send signed afresh.
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == state["event_id"]
    assert first.body == second.body
    body = _verified(sdk, second, secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.verify_signature(second.body, second.headers, secret=new_secret())
    assert body["type"] == "job.completed" and body["data"]["id"] == job["id"]
    assert body["data"]["status"] == "completed" and body["data"]["counts"]["succeeded"] == 2
    assert body["data"]["metadata"] == {"run": "7"} and body["data"]["usage"]["completion_tokens"] > 0
    listed = api.http.get(f"{api.url}/v1/jobs", timeout=10).json()["data"]
    assert next(j for j in listed if j["id"] == job["id"])["webhook"]["status"] == "delivered"


def test_a_cancelled_job_is_told_and_a_receiver_that_never_answers_2xx_ends_failed(stack):
    api, _, sdk = stack
    with Receiver(answers=(500, 429, 503, 500)) as receiver:  # answers worth retrying (a 404 is final)
        resp = api.http.post(f"{api.url}/v1/jobs", json={
            "model": "tiny-chat", "prompts": ["Hi"] * 3, "completion_window": "1h",
            "webhook": {"url": receiver.url}}, timeout=30)
        job = resp.json()
        api.http.post(f"{api.url}/v1/jobs/{job['id']}/cancel", timeout=10)
        wait_until(lambda: _webhook_of(api, f"/v1/jobs/{job['id']}")["status"] == "failed", 60,
                   what="the webhook to give up")
        state = _webhook_of(api, f"/v1/jobs/{job['id']}")
        assert len(receiver.requests) == 4  # the first send and the 3 retries of the schedule
    assert (state["attempts"], state["last_response_status"]) == (4, 500) and "500" in state["last_error"]
    body = _verified(sdk, receiver.requests[-1], job["webhook"]["secret"])
    assert body["type"] in ("job.cancelled", "job.completed")  # requests already running finish
    assert body["type"] == state["type"]


def test_an_openai_batch_webhook_is_read_by_the_official_sdk(stack):
    api, _, sdk = stack
    secret = new_secret()  # a client's own key, one for all its batches
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny-chat", "max_tokens": 4, "messages": [{"role": "user", "content": f"Hi {i}"}]}}
             for i in range(3)]
    upload = sdk.files.create(file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch")
    with Receiver() as receiver:
        batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                                   extra_body={"webhook": {"url": receiver.url, "secret": secret}})
        assert batch.model_extra["webhook"]["status"] == "waiting"
        wait_until(lambda: (sdk.batches.retrieve(batch.id).model_extra["webhook"] or {})["status"] == "delivered",
                   90, what="the batch's webhook to be delivered")
        [got] = receiver.requests
    event = sdk.webhooks.unwrap(got.body, got.headers, secret=secret)
    assert event.type == "batch.completed" and event.data.id == batch.id and event.object == "event"
    assert event.id == got.headers["webhook-id"]
    done = sdk.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id is not None
    assert isinstance(done.model_extra["webhook"]["delivered_at"], int)  # Unix seconds, as OpenAI's times are


def test_a_batch_whose_file_fails_validation_is_told_at_once(stack):
    api, _, sdk = stack
    upload = sdk.files.create(file=("bad.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
    with Receiver() as receiver:
        batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h",
                                   extra_body={"webhook": {"url": receiver.url}})
        assert batch.status == "failed"
        secret = batch.model_extra["webhook"]["secret"]
        wait_until(lambda: len(receiver.requests) == 1, 30, what="the batch.failed event")
        event = sdk.webhooks.unwrap(receiver.requests[0].body, receiver.requests[0].headers, secret=secret)
    assert event.type == "batch.failed" and event.data.id == batch.id
    assert sdk.batches.retrieve(batch.id).model_extra["webhook"]["secret"] is None


def test_webhooks_the_service_may_not_call_are_refused_with_each_interface_s_error(stack):
    api, _, sdk = stack
    refused = ["http://169.254.169.254/latest/meta-data", "http://localhost:6379/", "http://10.0.0.1/",
               "file:///etc/passwd", f"http://{os.uname().nodename}:80/"]
    for url in refused:
        resp = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny-chat", "prompts": ["a"],
                                                         "webhook": {"url": url}}, timeout=10)
        assert resp.status_code == 422, (url, resp.text)
        [detail] = resp.json()["error"]["details"]
        assert detail["loc"] == "webhook.url" and detail["type"] == "webhook_url_not_allowed", detail
    resp = api.http.post(f"{api.url}/v1/jobs", json={"model": "tiny-chat", "prompts": ["a"],
                                                     "webhook": {"url": "http://127.0.0.1:9/", "secret": "hunter2"}},
                         timeout=10)
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["loc"] == "webhook.secret"
    upload = sdk.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h",
                           extra_body={"webhook": {"url": "http://169.254.169.254/"}})
    assert err.value.body["param"] == "webhook.url"


def test_an_event_survives_the_api_process_that_was_sending_it(make_settings, sqlite_url):
    """The receiver holds the first send; the API process sending it is killed (SIGKILL, workers and
    all). The event stays in the outbox under a lease; a new API process sends it again once the
    lease lapses: delivered at least once, under the same webhook-id."""
    settings = make_settings(sqlite_url, **{**FAST, "webhook_timeout_s": 1.0})
    token = make_key(sqlite_url)
    worker = WorkerProcess(settings, "tiny-chat").start()
    first = GunicornApi(settings, token).start()
    second = None
    try:
        with Receiver(answers=("hang", 200)) as receiver:
            resp = first.http.post(f"{first.url}/v1/jobs", json={
                "model": "tiny-chat", "prompts": ["Hello"], "webhook": {"url": receiver.url}}, timeout=30)
            assert resp.status_code == 202, resp.text
            job = resp.json()
            wait_until(lambda: len(receiver.requests) == 1, 60, what="the first send")
            for pid in [*children_running(first.pid, "cli"), first.pid]:
                os.kill(pid, signal.SIGKILL)
            first.kill()
            receiver.release()
            second = GunicornApi(settings, token).start()
            wait_until(lambda: _webhook_of(second, f"/v1/jobs/{job['id']}")["status"] == "delivered", 60,
                       what="the event to be sent again")
            assert len(receiver.requests) == 2
            assert receiver.requests[0].headers["webhook-id"] == receiver.requests[1].headers["webhook-id"]
            sdk = openai.OpenAI(base_url=f"{second.url}/v1", api_key=token, max_retries=0)
            assert _verified(sdk, receiver.requests[1], job["webhook"]["secret"])["data"]["id"] == job["id"]
    finally:
        for process in (second, first, worker):
            if process is not None:
                process.stop()
