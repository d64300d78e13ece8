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
from core.registry import ModelSpec
from core.runs import Outcome
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
    # NAT64's local-use prefix: not public, whatever the last 32 bits decode to (127.0.0.1 in the
    # /48 layout; 8.8.8.8 read with the /96 one, as Python's ipaddress does)
    "http://[64:ff9b:1:7f00:0:100:808:808]/", "http://[64:ff9b:1::808:808]/",
    # special-purpose ranges some Python releases call global
    "http://[100::1]/", "http://[2001:db8::1]/", "http://[3fff::1]/", "http://[5f00::1]/", "http://[2001:2::1]/",
    "http://[ff0e::1]/", "http://[fc00::1]/", "http://[fe80::1]/", "http://198.18.0.1/", "http://240.0.0.1/",
    "http://192.0.0.171/", "http://255.255.255.255/", "http://224.0.0.1/",
])
def test_the_default_allow_list_refuses_what_is_not_a_public_http_address(url):
    assert check_url(url, AllowList.parse("*")) is not None


def test_allow_list_entries():
    public = ["https://hooks.example.com/x?y=1", "http://93.184.216.34/", "http://[2606:4700::1111]/",
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


def test_which_addresses_are_public_is_our_list_not_the_interpreter_s():
    """``public`` decides from the special-purpose registries written out in core.webhooks: the
    same answers on every Python (``ipaddress.is_global`` changed between patch releases)."""
    cases = {"8.8.8.8": True, "93.184.216.34": True, "2606:4700::1111": True, "64:ff9b::808:808": True,
             "64:ff9b::7f00:1": False, "64:ff9b:1::808:808": False, "::ffff:8.8.8.8": True, "::ffff:10.0.0.1": False,
             "10.0.0.1": False, "100.64.0.1": False, "192.0.2.1": False, "::1": False, "::": False,
             "2001:db8::1": False, "2002:808:808::1": False, "2001::1": False, "3fff::1": False, "fd00::1": False,
             "ff02::1": False, "4000::1": False}
    assert {a: webhooks.public(ipaddress.ip_address(a)) for a in cases} == cases


def test_a_wildcard_host_is_called_on_web_ports_only_an_exact_one_on_any():
    wide = AllowList.parse("*")
    assert check_url("https://hooks.example.com/", wide) is None and check_url("http://hooks.example.com:80/", wide) is None
    for url in ("http://hooks.example.com:6379/", "https://hooks.example.com:25/", "http://93.184.216.34:5432/"):
        refused = check_url(url, wide)
        assert refused and "port" in refused, url
    suffix = AllowList.parse("*.example.com", "80,443,8443")
    assert check_url("https://a.example.com:8443/", suffix) is None and check_url("https://a.example.com:22/", suffix)
    exact = AllowList.parse("*, hooks.internal, 127.0.0.1, 10.0.0.0/8")
    for url in ("http://hooks.internal:6379/", "http://127.0.0.1:9/", "http://10.1.2.3/"):
        assert check_url(url, exact) is None, url
    # A network entry is a range, not a host named exactly: held to the ports (its database's 5432 too).
    assert "port" in check_url("http://10.1.2.3:5432/", exact)
    with pytest.raises(ValueError):
        AllowList.parse("*", "80,http")
    # Checked again at each send: a port refused there sends nothing.
    with Receiver() as receiver:
        event = webhooks.Taken("evt_p", "job_p", f"http://localhost.example.invalid:{receiver.port}/",
                               webhooks.new_secret(), "{}", 0)
        attempt = webhooks.send(event, allow=wide, timeout_s=2)
        assert attempt.status_code is None and "port" in attempt.error and receiver.requests == []


def test_a_name_that_does_not_resolve_and_one_that_is_internal_read_the_same():
    """A tenant cannot tell "no such name" from "an internal name" by the webhook's last_error."""
    name = _loopback_name()
    wide = AllowList.parse("*")
    internal = webhooks.send(webhooks.Taken("evt_i", "job_i", f"http://{name}/", webhooks.new_secret(), "{}", 0),
                             allow=wide, timeout_s=5)
    missing = webhooks.send(webhooks.Taken("evt_m", "job_m", "http://no-such-host.invalid/", webhooks.new_secret(),
                                           "{}", 0), allow=wide, timeout_s=5)
    assert internal.error == missing.error.replace("no-such-host.invalid", name), (internal, missing)
    assert "resolve" in internal.error


def send_to_a_trickler(scheme: str, answer: bytes, every_s: float) -> tuple[Attempt, float]:
    """Send an event, with a 1.5 s timeout, to a server that takes what the client sends first (a
    request, a TLS ClientHello), then answers ``answer`` a byte every ``every_s`` seconds; returns
    the attempt and how long it took."""
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        for byte in answer:
            if stop.wait(every_s):
                break
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    event = webhooks.Taken("evt_t", "job_t", f"{scheme}://127.0.0.1:{server.getsockname()[1]}/", webhooks.new_secret(),
                           "{}", 0)
    started = time.monotonic()
    try:
        attempt = webhooks.send(event, allow=AllowList.parse("127.0.0.1"), timeout_s=1.5)
        return attempt, time.monotonic() - started
    finally:
        stop.set()
        server.close()


def test_a_receiver_that_trickles_its_tls_handshake_is_cut_off_at_the_timeout():
    attempt, took = send_to_a_trickler("https", b"\x16\x03\x03\x40\x00" + b"\x02" * 200, 0.3)  # a handshake record
    assert attempt.status_code is None and "no answer within 1.5 s" in attempt.error and took < 5, (attempt, took)


GEVENT_SEND = """
from gevent import monkey; monkey.patch_all()
import json
from tests.core.test_webhooks import send_to_a_trickler
attempt, took = send_to_a_trickler("https", bytes.fromhex("1603034000") + bytes([2]) * 100, 0.3)
print(json.dumps({"took": took, "error": attempt.error}))
"""


def test_under_gevent_a_trickled_handshake_is_cut_off_too():
    """The API serves under gunicorn's gevent workers, where the handshake's timeout restarts at
    every byte: before the fix this send took the whole trickle (30 s), not 1.5 s."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", GEVENT_SEND], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "no answer within 1.5 s" in result["error"] and result["took"] < 5, result  # not the trickle's 30 s


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
    attempt, took = send_to_a_trickler("http", b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100, 0.4)
    assert attempt.status_code is None and "no answer within 1.5 s" in attempt.error, attempt
    assert took < 5, took


def test_a_name_the_wildcard_allows_is_not_called_when_it_resolves_to_a_private_address():
    """DNS decides at send time: a public-looking name pointed at an internal address is refused then,
    and nothing is sent."""
    name = _loopback_name()
    with Receiver() as receiver:
        url = f"http://{name}:{receiver.port}/hook"
        wide = AllowList.parse("*", str(receiver.port))  # the receiver's port is allowed: its address decides
        assert check_url(url, wide) is None  # a name: only its addresses can tell
        event = webhooks.Taken("evt_x", "job_x", url, webhooks.new_secret(), "{}", 0)
        attempt = webhooks.send(event, allow=wide, timeout_s=2)
        assert attempt.status_code is None and "may call" in attempt.error
        assert "127.0.0.1" not in attempt.error  # the client reads it: internal addresses stay in the log
        # Literal addresses too, if the allow-list changed after the job was submitted.
        literal = webhooks.Taken("evt_y", "job_x", f"http://127.0.0.1:{receiver.port}/", webhooks.new_secret(), "{}", 0)
        assert "may call" in webhooks.send(literal, allow=wide, timeout_s=2).error
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


def _ended_with_webhook(db, url: str, owner: str = "alice") -> str:
    with db.write() as s:
        job, _ = jobs.create_job(session=s, spec=JobCreate.model_validate(
            {"model": "m", "prompts": ["a"], "webhook": {"url": url}}), model=CHAT, limits=LOCAL, owner=owner)
    with db.write() as s:
        jobs.cancel_job(session=s, job_id=job.id, owner=owner)
    return job.id


def test_an_event_still_being_sent_is_never_taken_again(db):
    """Its lease lapsing mid-send (a send under gevent could outlast it) put the same event in a
    second slot, and a second copy on the wire; a deliverer now renews the leases of what it sends
    and never takes an event it holds."""
    import time

    with Receiver(("hang",)) as receiver:
        job_id = _ended_with_webhook(db, receiver.url)
        deliverer = webhooks.Deliverer(db, AllowList.parse("127.0.0.1"), (5.0,), timeout_s=30, interval_s=0.2)
        deliverer._pool = webhooks.ThreadPoolExecutor(4)
        try:
            assert deliverer.run_once() == 1
            deadline = time.monotonic() + 5
            while not receiver.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            # The lease lapses while the send still runs (as if it had taken longer than the lease).
            with db.write() as s:
                s.execute(WebhookEvent.__table__.update().values(next_attempt_at=utcnow() - timedelta(seconds=1)))
            assert deliverer.run_once() == 0
            with db.read() as s:
                [event] = s.scalars(select(WebhookEvent).where(WebhookEvent.subject_id == job_id))
                assert event.next_attempt_at > utcnow() + timedelta(seconds=10)  # renewed: no other process takes it
            time.sleep(0.3)
            assert len(receiver.requests) == 1
        finally:
            receiver.release()
            deliverer._pool.shutdown(wait=True)


def test_one_owner_s_dead_receivers_do_not_hold_everyone_s_webhooks(db):
    """Owner A's ten events (older, to a receiver that never answers) came first in, first out and
    took every slot; now each owner holds at most ``per_owner`` and B's event goes out at once."""
    import time

    with Receiver(("hang",) * 10) as slow, Receiver() as fast:
        for _ in range(10):
            _ended_with_webhook(db, slow.url, owner="alice")
        later = _ended_with_webhook(db, fast.url, owner="bob")
        deliverer = webhooks.Deliverer(db, AllowList.parse("127.0.0.1"), (5.0,), timeout_s=30, per_owner=2)
        deliverer._pool = webhooks.ThreadPoolExecutor(4)
        try:
            assert deliverer.run_once() == 3  # two of alice's, bob's one; a slot stays free
            deadline = time.monotonic() + 10
            while not fast.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(fast.requests) == 1 and fast.requests[0].headers["webhook-id"].startswith("evt_")
            assert deliverer.run_once() == 0  # alice has her two in flight; nobody else waits
            assert len(slow.requests) <= 2
            with db.read() as s:
                assert s.get(Job, later).webhook["status"] in ("pending", "delivered")
        finally:
            slow.release()
            deliverer._pool.shutdown(wait=True)


def test_an_answer_that_will_not_change_is_not_retried_and_ended_events_drop_their_key(db):
    with Receiver((404, 429)) as receiver:
        gone = _ended_with_webhook(db, receiver.url)
        busy = _ended_with_webhook(db, receiver.url)
        with db.read() as s:  # the key moved into the event when the job ended
            assert s.get(Job, gone).webhook_secret is None
        deliverer = webhooks.Deliverer(db, AllowList.parse("127.0.0.1"), (5.0, 10.0), timeout_s=5)
        for event in _events(db, gone) + _events(db, busy):
            assert event.secret.startswith("whsec_")
            deliverer.deliver(webhooks.Taken(event.id, event.subject_id, event.url, event.secret, event.payload,
                                             event.attempts, event.owner))
    [ended] = _events(db, gone)
    [again] = _events(db, busy)
    assert (ended.status, ended.attempts, ended.secret) == ("failed", 1, None)  # 404: final
    assert (again.status, again.secret is not None) == ("pending", True)  # 429: the receiver was busy
    with db.read() as s:
        state = s.get(Job, gone).webhook
    assert state["status"] == "failed" and "not retried" in state["last_error"]


def test_ended_events_are_purged_after_the_retention(db):
    job_id = _ended_with_webhook(db, "http://127.0.0.1:9/")
    pending_id = _ended_with_webhook(db, "http://127.0.0.1:9/")
    [event] = _events(db, job_id)
    with db.write() as s:
        webhooks.record_attempt(session=s, event=webhooks.Taken(event.id, job_id, event.url, event.secret,
                                                                event.payload, 0, "alice"),
                                attempt=Attempt(status_code=200), retry_s=(1.0,), now=utcnow() - timedelta(days=8))
    deliverer = webhooks.Deliverer(db, AllowList.parse("127.0.0.1"), (5.0,), retention_s=7 * 86400)
    assert deliverer.purge_once() == 1
    assert _events(db, job_id) == [] and len(_events(db, pending_id)) == 1
    with db.read() as s:  # the job keeps what its client reads of the delivery
        assert s.get(Job, job_id).webhook["status"] == "delivered"
