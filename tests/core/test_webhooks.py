"""Webhooks in core: signatures, the allow-list, the outbox written where jobs end, sends and retries.

The sends here go to a real HTTP server on this machine (``tests.support.Receiver``).
"""

import base64
import ipaddress
import json
import socket
from datetime import timedelta

import openai
import pytest
from sqlalchemy import func, select

from core import jobs, runs, webhooks
from core.db import Database
from core.errors import InvalidRequestError
from core.jobs import Limits
from core.runs import Outcome
from core.registry import ModelSpec
from core.schemas import JobCreate
from core.tables import Job, WebhookEvent, utcnow
from core.webhooks import AllowList, Attempt, check_url
from tests.support import Receiver

CHAT = ModelSpec(name="m", path="m", chat=True, context_length=128, defaults={"max_new_tokens": 16})
LOCAL = Limits(max_requests=10, max_prompt_chars=100, webhooks=AllowList.parse("127.0.0.1"))


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    yield database
    database.dispose()


def test_signature_matches_the_standard_webhooks_test_vector_and_openais_verifier():
    # The example of the Standard Webhooks reference libraries.
    secret, msg_id, ts, body = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, \
        b'{"test": 2432232314}'
    assert webhooks.sign(secret, msg_id, ts, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    fresh = webhooks.new_secret()
    assert webhooks.check_secret(fresh) == fresh
    import time

    now = int(time.time())
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(now),
               "webhook-signature": webhooks.sign(fresh, "evt_1", now, b'{"a":1}')}
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9")
    client.webhooks.verify_signature(b'{"a":1}', headers, secret=fresh)  # raises if it does not match
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(b'{"a":2}', headers, secret=fresh)
    for bad in ("abc", "whsec_???", "whsec_" + "QUJD"):  # no prefix, not base64, 3 bytes
        with pytest.raises(ValueError):
            webhooks.check_secret(bad)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://localhost:8000/", "http://app.localhost/", "http://169.254.169.254/latest",
    "http://[::1]:80/", "http://10.0.0.5/", "http://192.168.1.1/", "http://[::ffff:127.0.0.1]/",
    "http://100.64.0.1/", "http://0.0.0.0/", "ftp://example.com/", "http://user:pw@example.com/",
    "https:///path", "http://example.com:99999/", "http://exa mple.com/", "https://example.com/hoök",
    # IPv6 forms that carry an IPv4 address (NAT64 reaches it; the others are deprecated or tunnels)
    "http://[64:ff9b::a9fe:a9fe]/", "http://[64:ff9b::a00:5]/", "http://[2002:a9fe:a9fe::]/", "http://[::a9fe:a9fe]/",
    "http://[::ffff:0:a9fe:a9fe]/", "http://[fec0::1]/", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
])
def test_the_default_allow_list_refuses_what_is_not_a_public_http_address(url):
    assert check_url(url, AllowList.parse("*")) is not None


def test_allow_list_entries():
    public = ["https://hooks.example.com/x?y=1", "http://93.184.216.34:8080/", "http://[2606:4700::1111]/",
              "http://[64:ff9b::5db8:d822]/"]  # NAT64 of a public IPv4 address
    assert all(check_url(u, AllowList.parse("*")) is None for u in public)
    assert check_url("http://127.0.0.1:9/", AllowList.parse("127.0.0.1")) is None
    assert check_url("http://10.1.2.3/", AllowList.parse("10.0.0.0/8")) is None
    assert check_url("http://[::1]:9/", AllowList.parse("::1")) is None
    assert check_url("http://localhost:9/", AllowList.parse("localhost")) is None  # named exactly
    only = AllowList.parse("*.example.com, hooks.internal")
    assert check_url("https://a.example.com/", only) is None and check_url("https://hooks.internal/", only) is None
    assert check_url("https://example.com/", only) and check_url("https://other.org/", only)
    assert "turned off" in check_url("https://hooks.example.com/", AllowList.parse(""))
    with pytest.raises(ValueError):
        AllowList.parse("ho*st")


def _loopback_name() -> str:
    """A host name other than localhost that this machine resolves to loopback or private addresses."""
    name = socket.gethostname()
    try:
        found = {ipaddress.ip_address(i[4][0]) for i in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        found = set()
    if not found or any(a.is_global for a in found):
        pytest.skip(f"this machine's name {name!r} does not resolve to private addresses only")
    return name


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_timeout():
    """The socket timeout bounds each read; the send as a whole is bounded too, so a receiver that
    answers a byte at a time cannot hold a delivery slot past its lease."""
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
            if stop.wait(0.4):
                break
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
        conn.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    event = webhooks.Taken("evt_t", "job_t", f"http://127.0.0.1:{server.getsockname()[1]}/", webhooks.new_secret(),
                           "{}", 0)
    started = time.monotonic()
    attempt = webhooks.send(event, allow=AllowList.parse("127.0.0.1"), timeout_s=1.5)
    took = time.monotonic() - started
    stop.set()
    thread.join(5)
    server.close()
    assert attempt.status_code is None and "no answer within 1.5 s" in attempt.error, attempt
    assert took < 4, took


def test_a_name_the_wildcard_allows_is_not_called_when_it_resolves_to_a_private_address():
    """DNS decides at send time: a public-looking name pointed at an internal address is refused then,
    and nothing is sent."""
    name = _loopback_name()
    with Receiver() as receiver:
        url = f"http://{name}:{receiver.port}/hook"
        assert check_url(url, AllowList.parse("*")) is None  # a name: only its addresses can tell
        event = webhooks.Taken("evt_x", "job_x", url, webhooks.new_secret(), "{}", 0)
        attempt = webhooks.send(event, allow=AllowList.parse("*"), timeout_s=2)
        assert attempt.status_code is None and "not public" in attempt.error
        assert "127.0.0.1" not in attempt.error  # the client reads it: internal addresses stay in the log
        # Literal addresses too, if the allow-list changed after the job was submitted.
        literal = webhooks.Taken("evt_y", "job_x", f"http://127.0.0.1:{receiver.port}/", webhooks.new_secret(), "{}", 0)
        assert "not public" in webhooks.send(literal, allow=AllowList.parse("*"), timeout_s=2).error
        assert receiver.requests == []
        # Allowed, the same send arrives, signed.
        assert webhooks.send(literal, allow=AllowList.parse("127.0.0.1"), timeout_s=2).status_code == 200
        assert len(receiver.requests) == 1 and receiver.requests[0].headers["webhook-id"] == "evt_y"


def _submit(db, payload, limits=LOCAL):
    with db.write() as s:
        return jobs.create_job(session=s, spec=JobCreate.model_validate(payload), model=CHAT, limits=limits,
                               owner="alice")


def _events(db, subject_id):
    with db.read() as s:
        return list(s.scalars(select(WebhookEvent).where(WebhookEvent.subject_id == subject_id)))


def test_a_refused_webhook_is_a_problem_of_the_job_and_nothing_is_stored(db):
    with pytest.raises(InvalidRequestError) as err:
        _submit(db, {"model": "m", "prompts": ["a"], "webhook": {"url": "http://169.254.169.254/"}},
                limits=Limits(max_requests=10, max_prompt_chars=100, webhooks=AllowList.parse("*")))
    assert [(d["loc"], d["type"]) for d in err.value.details] == [("webhook.url", "webhook_url_not_allowed")]
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_the_transaction_that_ends_a_job_writes_its_event_once(db):
    job, ids = _submit(db, {"model": "m", "prompts": ["a", "b"], "webhook": {"url": "http://127.0.0.1:9/h"},
                            "metadata": {"k": "v"}})
    assert job.webhook_secret.startswith("whsec_") and job.webhook["status"] == "waiting"
    longest = "whsec_" + base64.b64encode(bytes(range(64))).decode()  # the longest key a client may bring
    own, _ = _submit(db, {"model": "m", "prompts": ["a"], "webhook": {"url": "http://127.0.0.1:9/", "secret": longest}})
    with db.read() as s:
        assert s.get(Job, own.id).webhook_secret == longest
    with db.write() as s:
        runs.claim(session=s, request_ids=ids, run_id="run_1")
    with db.write() as s:
        runs.record(session=s, run_id="run_1", outcomes=[Outcome(ids[0], job.id, text="x", prompt_tokens=3,
                                                                 completion_tokens=1)])
    assert _events(db, job.id) == []  # one request still runs: the job has not ended
    with db.write() as s:
        runs.record(session=s, run_id="run_1", outcomes=[Outcome(ids[1], job.id, error_code="e", error_message="m")])
    [event] = _events(db, job.id)
    body = json.loads(event.payload)
    assert (event.type, event.status, event.url, event.secret) == ("job.completed", "pending", "http://127.0.0.1:9/h",
                                                                   job.webhook_secret)
    assert body["type"] == "job.completed" and body["data"]["id"] == job.id
    assert body["data"]["counts"]["succeeded"] == 1 and body["data"]["counts"]["failed"] == 1
    assert body["data"]["usage"]["total_tokens"] == 4 and body["data"]["metadata"] == {"k": "v"}
    with db.read() as s:
        state = s.get(Job, job.id).webhook
    assert (state["status"], state["event_id"], state["type"]) == ("pending", event.id, "job.completed")
    with db.write() as s:  # a job ends once: nothing more is written when nothing changes
        jobs.finalize(s, [job.id], utcnow())
    assert len(_events(db, job.id)) == 1
    with db.write() as s:  # deleting the job deletes its event (it carries the job's key)
        jobs.delete_job(session=s, job_id=job.id, owner="alice")
    assert _events(db, job.id) == []


def test_cancelled_and_expired_jobs_send_their_events(db):
    cancelled, _ = _submit(db, {"model": "m", "prompts": ["a"], "webhook": {"url": "http://127.0.0.1:9/"}})
    expiring, _ = _submit(db, {"model": "m", "prompts": ["a"], "webhook": {"url": "http://127.0.0.1:9/"}})
    plain, _ = _submit(db, {"model": "m", "prompts": ["a"]})
    with db.write() as s:
        jobs.cancel_job(session=s, job_id=cancelled.id, owner="alice")
        jobs.cancel_job(session=s, job_id=plain.id, owner="alice")
    with db.write() as s:
        jobs.expire_due(session=s, now=utcnow() + timedelta(days=2))
    assert [e.type for e in _events(db, cancelled.id)] == ["job.cancelled"]
    assert [e.type for e in _events(db, expiring.id)] == ["job.expired"]
    assert _events(db, plain.id) == []


def test_a_send_that_fails_is_retried_on_the_schedule_then_fails(db):
    job, _ = _submit(db, {"model": "m", "prompts": ["a"], "webhook": {"url": "http://127.0.0.1:9/"}})
    with db.write() as s:
        jobs.cancel_job(session=s, job_id=job.id, owner="alice")
    now = utcnow()
    for attempt_no, expected in ((1, "pending"), (2, "pending"), (3, "failed")):
        with db.write() as s:
            [taken] = webhooks.take_due(session=s, limit=5, lease_s=60, now=now)
            assert webhooks.take_due(session=s, limit=5, lease_s=60, now=now) == []  # leased
        with db.write() as s:
            status = webhooks.record_attempt(session=s, event=taken, attempt=Attempt(status_code=503),
                                             retry_s=(10, 20), now=now)
        assert status == expected and taken.attempts == attempt_no - 1
        with db.write() as s:  # a deliverer whose lease lapsed cannot record the same attempt again
            assert webhooks.record_attempt(session=s, event=taken, attempt=Attempt(status_code=200),
                                           retry_s=(10, 20), now=now) is None
        now += timedelta(seconds=30)
    with db.read() as s:
        state = s.get(Job, job.id).webhook
    assert (state["status"], state["attempts"], state["last_response_status"]) == ("failed", 3, 503)
    assert "503" in state["last_error"] and state["next_attempt_at"] is None
