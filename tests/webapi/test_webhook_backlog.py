"""An owner whose webhook events pile up (receivers that are slow, dead or refuse) cannot add more:
past ``webhook_max_pending`` waiting events, a job or batch naming a webhook is refused with 429
``webhook_backlog``; without a webhook, or for another owner, submitting goes on."""

from __future__ import annotations

import io
import json

from tests.conftest import authed, make_key


def test_a_pile_of_waiting_webhook_events_refuses_more_webhooks_of_that_owner(make_settings, sqlite_url):
    from webapi import create_app

    # The deliverer is off (its thread would send the events away): they wait, as for dead receivers.
    app = create_app(make_settings(sqlite_url, webhook_allowed_hosts="127.0.0.1", webhook_max_pending=2,
                                   webhook_interval_s=3600, rate_limit_per_minute=0))
    alice, bob = authed(app, make_key(sqlite_url)), authed(app, make_key(sqlite_url, owner="bob"))
    job = {"model": "tiny", "prompts": ["a"], "webhook": {"url": "http://127.0.0.1:9/hook"}}
    for _ in range(2):  # two jobs end (cancelled): their events wait to be sent
        made = alice.post("/v1/jobs", json=job)
        assert made.status_code == 202, made.get_json()
        assert alice.post(f"/v1/jobs/{made.get_json()['id']}/cancel").status_code == 200
    refused = alice.post("/v1/jobs", json=job)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"
    assert refused.get_json()["error"]["code"] == "webhook_backlog" and "2 webhook events" in \
        refused.get_json()["error"]["message"]
    assert alice.post("/v1/jobs", json={"model": "tiny", "prompts": ["a"]}).status_code == 202  # no webhook: fine
    assert bob.post("/v1/jobs", json=job).status_code == 202  # another owner: fine
    # An OpenAI batch naming a webhook is refused the same way, in OpenAI's shape.
    line = json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tiny-base", "prompt": "x"}}) + "\n"
    upload = alice.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(line.encode()), "in.jsonl")})
    batch = alice.post("/v1/batches", json={"input_file_id": upload.get_json()["id"], "endpoint": "/v1/completions",
                                            "completion_window": "24h", "webhook": {"url": "http://127.0.0.1:9/h"}})
    assert batch.status_code == 429 and batch.get_json()["error"]["code"] == "webhook_backlog", batch.get_json()
