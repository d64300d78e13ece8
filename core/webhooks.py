"""Webhooks: a job or batch may name a URL that is told, signed, when it ends.

The path of an event:

1. A job submitted with ``webhook: {"url"}`` stores the URL (in ``jobs.webhook``, what the client
   reads of the delivery) and an HMAC key (``jobs.webhook_secret``, shown in the create response
   only). A batch does the same on its own row.
2. The transaction that ends the job (``core.jobs.finalize``) or the batch (``core.batches``)
   writes one ``webhook_events`` row holding the URL, the key and the exact body: the outbox. An
   event can only exist if its subject ended, and a subject cannot end without its event.
3. Each API process runs a ``Deliverer`` thread. It takes due rows (pushing ``next_attempt_at``
   past the send's timeout: that is the lease, so a deliverer that dies mid-send leaves the row
   due again), POSTs them and records the outcome on the row and on the subject. A 2xx delivers;
   anything else is retried on the ``webhook_retry_s`` schedule, then the event fails. Delivery is
   at least once: a receiver deduplicates on ``webhook-id``.

Signatures follow Standard Webhooks (standardwebhooks.com), as OpenAI's own webhooks do:
``webhook-id`` (the event id), ``webhook-timestamp`` (Unix seconds), ``webhook-signature``
(``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body`` under the key that follows ``whsec_``).

Outbound addresses: a tenant must not make the service call what only the service can reach (the
database, a cloud metadata address, another tenant's internal service). ``AllowList`` (setting
``webhook_allowed_hosts``) says which host names may be named and which addresses they may resolve
to; the check is made when the job is submitted and again, on the resolved addresses, when each
event is sent, and the connection goes to the address that was checked (no second lookup a DNS
change could redirect). Redirects are not followed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.orm import Session

from core.db import Database, connection_of
from core.ids import new_id
from core.tables import Batch, Job, UTCDateTime, WebhookEvent, utcnow

log = logging.getLogger("batchgen.webhooks")

SECRET_PREFIX = "whsec_"
SECRET_BYTES = (24, 64)  # what Standard Webhooks allows a key to be
MAX_URL_CHARS = 2048
MAX_ERROR_CHARS = 300
RESPONSE_READ_BYTES = 64 * 1024
MAX_ADDRESSES = 2  # of a host's addresses, tried in turn: each may take the whole timeout
USER_AGENT = "batchgen-webhooks/1"

# How a job's end (``jobs.status``) and a batch's end name their events.
JOB_EVENTS = {"completed": "job.completed", "failed": "job.failed", "cancelled": "job.cancelled",
              "expired": "job.expired"}
BATCH_EVENTS = {"completed": "batch.completed", "failed": "batch.failed", "cancelled": "batch.cancelled",
                "expired": "batch.expired"}


def new_secret() -> str:
    """A fresh signing key, ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def check_secret(value: str) -> str:
    """A key a client brought (to use one key for all its jobs), or ``ValueError``."""
    if not value.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        raw = base64.b64decode(value[len(SECRET_PREFIX):], validate=True)
    except ValueError:
        raise ValueError(f"a webhook secret is {SECRET_PREFIX!r} and base64") from None
    low, high = SECRET_BYTES
    if not low <= len(raw) <= high:
        raise ValueError(f"a webhook secret holds {low} to {high} bytes (base64 after {SECRET_PREFIX!r})")
    return value


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of ``body`` sent as ``event_id`` at ``timestamp``."""
    key = base64.b64decode(secret[len(SECRET_PREFIX):])
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# --- which addresses may be called -------------------------------------------------------------

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class AllowList:
    """Where webhooks may go (setting ``webhook_allowed_hosts``, comma-separated entries).

    - ``*``: any host name, as long as every address it resolves to is public.
    - ``*.example.com``: names under example.com, public addresses only.
    - ``hooks.example.com``: that name, wherever it resolves (naming it exactly trusts it).
    - ``10.1.2.0/24``, ``127.0.0.1``, ``::1``: those addresses, literal or resolved, private or not.

    Empty: no webhooks at all (a job that names one is refused).
    """

    any_name: bool = False
    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """The entries of the setting; ``ValueError`` names one that cannot be used."""
        any_name, names, suffixes, networks = False, set(), [], []
        for entry in text.replace(",", " ").split():
            entry = entry.lower().rstrip(".")
            if entry == "*":
                any_name = True
            elif entry.startswith("*."):
                suffixes.append(entry[2:])
            elif "*" in entry:
                raise ValueError(f"{entry!r}: a wildcard is '*' or '*.domain'")
            else:
                try:
                    networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                except ValueError:
                    names.add(entry)
        return cls(any_name, frozenset(names), tuple(suffixes), tuple(networks))

    @property
    def enabled(self) -> bool:
        return self.any_name or bool(self.names or self.suffixes or self.networks)

    def permits_name(self, host: str) -> bool:
        """Whether a URL may name ``host`` (a literal address: whether some entry may cover it)."""
        literal = _literal(host)
        if literal is not None:
            return self.any_name or any(literal in net for net in self.networks if net.version == literal.version)
        if host in self.names:
            return True
        if host == "localhost" or host.endswith(".localhost"):  # loopback by definition (RFC 6761)
            return False
        return self.any_name or any(host.endswith("." + suffix) for suffix in self.suffixes)

    def permits_address(self, host: str, address: Address) -> bool:
        """Whether ``host`` may be reached at ``address`` (one it resolved to, or itself)."""
        if address.version == 6 and address.ipv4_mapped is not None:  # type: ignore[union-attr]
            address = address.ipv4_mapped  # type: ignore[union-attr]
        if any(address in net for net in self.networks if net.version == address.version):
            return True
        if _literal(host) is None and host in self.names:
            return True
        return _public(address)


# IPv6 ranges that carry an IPv4 address a gateway may deliver to (NAT64), or that are deprecated
# or unroutable but which ``is_global`` does not flag on every Python version.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_NEVER = (ipaddress.ip_network("::/96"), ipaddress.ip_network("::ffff:0:0:0/96"), ipaddress.ip_network("fec0::/10"),
          ipaddress.ip_network("2002::/16"), ipaddress.ip_network("2001::/32"))


def _public(address: Address) -> bool:
    """A public unicast address, also through every IPv6 form that embeds an IPv4 one."""
    if not address.is_global or address.is_multicast:
        return False
    if address.version == 6:
        if any(address in net for net in _NEVER):  # IPv4-compatible, SIIT, site-local, 6to4, Teredo
            return False
        if any(address in net for net in _NAT64):
            return _public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return True


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class Target:
    """A parsed webhook URL."""

    scheme: str
    host: str
    port: int
    path: str


def parse_url(url: str) -> Target:
    """The parts of a webhook URL, or ``ValueError`` saying what is wrong with it."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"a webhook URL has at most {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) > 0x7E for c in url):
        raise ValueError("a webhook URL holds no spaces, control or non-ASCII characters (percent-encode them; "
                         "an internationalized host name is written in its xn-- form)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("a webhook URL starts with https:// or http://")
    if not parts.hostname:
        raise ValueError("a webhook URL names a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a webhook URL carries no user or password (sign with the secret instead)")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, parts.hostname.lower().rstrip("."), port or (443 if parts.scheme == "https" else 80),
                  path)


def check_url(url: str, allow: AllowList) -> str | None:
    """Why a job may not name this webhook URL, or None if it may (its name is checked now, the
    addresses it resolves to at each send)."""
    if not allow.enabled:
        return "webhooks are turned off on this service (BATCHGEN_WEBHOOK_ALLOWED_HOSTS is empty)"
    try:
        target = parse_url(url)
    except ValueError as exc:
        return str(exc)
    literal = _literal(target.host)
    if not allow.permits_name(target.host) or (literal is not None and not allow.permits_address(target.host, literal)):
        return (f"webhooks may not call {target.host}: it is not a public address or is not in this "
                "service's allow-list (BATCHGEN_WEBHOOK_ALLOWED_HOSTS)")
    return None


# --- what a client reads -----------------------------------------------------------------------


def initial_state(url: str) -> dict[str, Any]:
    """``jobs.webhook`` / ``batches.webhook`` of a subject that has not ended."""
    return {"url": url, "status": "waiting", "event_id": None, "type": None, "attempts": 0,
            "last_attempt_at": None, "last_response_status": None, "last_error": None, "next_attempt_at": None,
            "delivered_at": None}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


# --- the outbox: written where a subject ends ---------------------------------------------------

_EVENTS = WebhookEvent.__table__
_INSERT_EVENT = _EVENTS.insert()


def _job_payload(job: Any, event_type: str, now: datetime) -> str:
    data = {
        "id": job.id, "object": "job", "status": job.status, "model": job.model, "kind": job.kind,
        "counts": {"total": job.total, "queued": job.queued, "running": job.running, "succeeded": job.succeeded,
                   "failed": job.failed, "cancelled": job.cancelled, "expired": job.expired},
        "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                  "total_tokens": job.prompt_tokens + job.completion_tokens},
        "metadata": job._mapping["metadata"], "created_at": _iso(job.created_at), "completed_at": _iso(job.completed_at),
    }
    return json.dumps({"type": event_type, "timestamp": _iso(now), "data": data}, separators=(",", ":"))


_JOBS = Job.__table__.c
_ENDED_JOBS = select(Job.__table__).where(_JOBS.id.in_(bindparam("ids", expanding=True)),
                                          _JOBS.webhook.is_not(None))
_SET_JOB_STATE = update(Job.__table__).where(_JOBS.id == bindparam("jid")).values(
    webhook=bindparam("state", type_=_JOBS.webhook.type))


def enqueue_job_events(session: Session | Connection, job_ids: Sequence[str], now: datetime) -> None:
    """Write the events of jobs that just ended (and have a webhook), in the caller's transaction."""
    conn = connection_of(session)
    rows = conn.execute(_ENDED_JOBS, {"ids": list(job_ids)}).all()
    events, states = [], []
    for job in rows:
        event_type = JOB_EVENTS.get(job.status)
        if event_type is None or job.webhook_secret is None or job.webhook.get("event_id"):
            continue
        event_id = new_id("evt")
        events.append({"id": event_id, "owner": job.owner, "subject_id": job.id, "type": event_type,
                       "url": job.webhook["url"], "secret": job.webhook_secret,
                       "payload": _job_payload(job, event_type, now), "status": "pending", "attempts": 0,
                       "next_attempt_at": now, "created_at": now, "delivered_at": None})
        states.append({"jid": job.id, "state": {**job.webhook, "status": "pending", "event_id": event_id,
                                                "type": event_type, "next_attempt_at": _iso(now)}})
    if events:
        conn.execute(_INSERT_EVENT, events)
        conn.execute(_SET_JOB_STATE, states)


def enqueue_batch_event(session: Session, batch: Batch, now: datetime) -> None:
    """Write the event of a batch that just ended (if it has a webhook), in the caller's transaction.

    The body is OpenAI's (``{"id", "object": "event", "type": "batch.completed", "created_at",
    "data": {"id"}}``), so OpenAI's SDKs read it (``client.webhooks.unwrap``)."""
    event_type = BATCH_EVENTS.get(batch.status)
    if batch.webhook is None or batch.webhook_secret is None or event_type is None or batch.webhook.get("event_id"):
        return
    event_id = new_id("evt")
    payload = json.dumps({"id": event_id, "object": "event", "type": event_type,
                          "created_at": int(now.timestamp()), "data": {"id": batch.id}}, separators=(",", ":"))
    session.execute(_INSERT_EVENT, [{
        "id": event_id, "owner": batch.owner, "subject_id": batch.id, "type": event_type,
        "url": batch.webhook["url"], "secret": batch.webhook_secret, "payload": payload, "status": "pending",
        "attempts": 0, "next_attempt_at": now, "created_at": now, "delivered_at": None}])
    batch.webhook = {**batch.webhook, "status": "pending", "event_id": event_id, "type": event_type,
                     "next_attempt_at": _iso(now)}


# --- delivering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Taken:
    """An event a deliverer holds until ``lease_until``."""

    id: str
    subject_id: str
    url: str
    secret: str
    payload: str
    attempts: int  # before this one


_C = _EVENTS.c
_NOW = bindparam("now", type_=UTCDateTime())
_DUE = (select(_C.id).where(_C.status == "pending", _C.next_attempt_at <= _NOW)
        .order_by(_C.next_attempt_at, _C.id).limit(bindparam("limit")))


def any_due(*, session: Session, now: datetime | None = None) -> bool:
    """Whether some event is due to be sent (a read, for the deliverer's idle rounds)."""
    return session.execute(_DUE, {"now": now or utcnow(), "limit": 1}).first() is not None
_TAKE = (update(_EVENTS).where(_C.id == bindparam("eid"), _C.status == "pending", _C.next_attempt_at <= _NOW)
         .values(next_attempt_at=bindparam("lease", type_=UTCDateTime()))
         .returning(_C.id, _C.subject_id, _C.url, _C.secret, _C.payload, _C.attempts))


def take_due(*, session: Session, limit: int, lease_s: float, now: datetime | None = None) -> list[Taken]:
    """Take up to ``limit`` events that are due, for ``lease_s`` seconds."""
    now = now or utcnow()
    conn = session.connection()
    taken = []
    for event_id in conn.execute(_DUE, {"now": now, "limit": limit}).scalars().all():
        row = conn.execute(_TAKE, {"eid": event_id, "now": now,
                                   "lease": now + timedelta(seconds=lease_s)}).first()
        if row is not None:  # another deliverer took it between the two statements
            taken.append(Taken(row.id, row.subject_id, row.url, row.secret, row.payload, row.attempts))
    return taken


@dataclass(frozen=True)
class Attempt:
    """What one send gave: the receiver's status code, or why there was none."""

    status_code: int | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def record_attempt(*, session: Session, event: Taken, attempt: Attempt, retry_s: Sequence[float],
                   now: datetime | None = None) -> str | None:
    """Store how a send went, on the event and on its subject; returns the event's status now
    (None if another deliverer recorded this attempt first: its lease had lapsed)."""
    now = now or utcnow()
    attempts = event.attempts + 1
    if attempt.delivered:
        status, next_at = "delivered", None
    elif attempts > len(retry_s):
        status, next_at = "failed", None
    else:
        delay = retry_s[attempts - 1]
        status, next_at = "pending", now + timedelta(seconds=delay * random.uniform(1.0, 1.1))
    changed = session.execute(
        update(WebhookEvent).where(WebhookEvent.id == event.id, WebhookEvent.status == "pending",
                                   WebhookEvent.attempts == event.attempts)
        .values(status=status, attempts=attempts, next_attempt_at=next_at or now,
                delivered_at=now if status == "delivered" else None)).rowcount
    if not changed:
        return None
    error = attempt.error
    if error is None and not attempt.delivered:
        error = f"the receiver answered {attempt.status_code}; only 2xx counts as delivered"
    table: Any = Job if event.subject_id.startswith("job_") else Batch
    subject = session.get(table, event.subject_id, with_for_update=True)
    if subject is not None and subject.webhook is not None:
        subject.webhook = {**subject.webhook, "status": status, "attempts": attempts, "last_attempt_at": _iso(now),
                           "last_response_status": attempt.status_code,
                           "last_error": error[:MAX_ERROR_CHARS] if error else None,
                           "next_attempt_at": _iso(next_at), "delivered_at": _iso(now) if attempt.delivered else None}
    return status


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to an address already checked, never looked up again."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address already checked; the certificate is checked against the URL's host."""

    _shared_context: ssl.SSLContext | None = None

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        if _PinnedHTTPSConnection._shared_context is None:  # loading the CA bundle costs; once per process
            _PinnedHTTPSConnection._shared_context = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=_PinnedHTTPSConnection._shared_context)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def resolve(target: Target, allow: AllowList) -> list[str]:
    """The addresses to call ``target`` at; ``PermissionError`` if the allow-list forbids any."""
    if not allow.permits_name(target.host):
        raise PermissionError(f"refused: {target.host} is not in this service's allow-list "
                              "(BATCHGEN_WEBHOOK_ALLOWED_HOSTS)")
    literal = _literal(target.host)
    if literal is not None:
        found = [literal]
    else:
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except OSError:
            raise ConnectionError(f"cannot resolve {target.host}") from None
        found = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    refused = [str(a) for a in found if not allow.permits_address(target.host, a)]
    if refused:  # one private address among public ones is enough to refuse (DNS rebinding)
        # The client reads this: which internal address a name has is the operator's to know (the log).
        log.warning("webhook refused: %s resolves to %s", target.host, ", ".join(refused))
        raise PermissionError(f"refused: {target.host} resolves to an address that is not public and not in this "
                              "service's allow-list (BATCHGEN_WEBHOOK_ALLOWED_HOSTS)")
    return [str(a) for a in found][:MAX_ADDRESSES]


def send(event: Taken, *, allow: AllowList, timeout_s: float, now: float | None = None) -> Attempt:
    """POST one event, signed; what happened (never raises)."""
    try:
        target = parse_url(event.url)
        addresses = resolve(target, allow)
    except (ValueError, PermissionError, ConnectionError) as exc:
        return Attempt(error=str(exc))
    except Exception as exc:  # whatever it is, it is this attempt's outcome, never a lost one
        log.exception("webhook %s: resolving its host failed", event.id)
        return Attempt(error=f"could not resolve the host ({type(exc).__name__})")
    body = event.payload.encode()
    timestamp = int(now if now is not None else time.time())
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "webhook-id": event.id,
               "webhook-timestamp": str(timestamp), "webhook-signature": sign(event.secret, event.id, timestamp, body)}
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    error = "no address to call"
    for address in addresses:
        conn = kind(target.host, target.port, address, timeout_s)
        # The socket timeout bounds each read; this bounds the whole exchange (a receiver trickling
        # a byte at a time would hold the slot, and outlive the lease, without it).
        cut = threading.Event()  # set before the socket is shut: the failure that follows is the cut's
        cutoff = threading.Timer(timeout_s, _cut, (conn, cut))
        cutoff.start()
        try:
            conn.request("POST", target.path, body=body, headers=headers)
            response = conn.getresponse()
            response.read(RESPONSE_READ_BYTES)
            return Attempt(status_code=response.status)
        except Exception as exc:  # OSError, HTTPException, ssl errors, anything: this attempt failed
            timed_out = cut.is_set() or isinstance(exc, TimeoutError)
            error = (f"no answer within {timeout_s:g} s" if timed_out
                     else f"could not deliver: {type(exc).__name__}")
            log.info("webhook %s to %s (%s): %s", event.id, target.host, address, exc)
        finally:
            cutoff.cancel()
            conn.close()
    return Attempt(error=error)


def _cut(conn: http.client.HTTPConnection, cut: threading.Event) -> None:
    """End a send that has run out of time (shutdown wakes a thread blocked reading the socket).
    ``cut`` is set first: the timer thread may still be alive when the reader sees the failure."""
    cut.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@dataclass
class Deliverer:
    """The webhook thread of one API process: sends due events, ``concurrency`` at a time, so a
    slow receiver holds one slot rather than every delivery."""

    db: Database
    allow: AllowList
    retry_s: tuple[float, ...]
    timeout_s: float = 10.0
    interval_s: float = 1.0
    concurrency: int = 4
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _pool: ThreadPoolExecutor | None = None
    _inflight: set[Future[Any]] = field(default_factory=set)

    def start(self) -> Deliverer:
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # the database may be away; try again next round
                log.exception("delivering webhooks failed")

    def run_once(self) -> int:
        """Start sending what is due, as far as free slots go; returns how many were taken."""
        self._inflight = {f for f in self._inflight if not f.done()}
        free = self.concurrency - len(self._inflight)
        if free <= 0 or self._pool is None:
            return 0
        with self.db.read() as session:  # the usual answer is "nothing": no write lock for it (SQLite)
            if not any_due(session=session):
                return 0
        with self.db.write() as session:
            # Held past the longest a send can take (two addresses, each cut off at the timeout, and
            # the lookup): a lapsed lease means this process died mid-send.
            taken = take_due(session=session, limit=free, lease_s=3 * self.timeout_s + 5)
        for event in taken:
            self._inflight.add(self._pool.submit(self.deliver, event))
        return len(taken)

    def deliver(self, event: Taken) -> str | None:
        """Send one taken event and record the outcome."""
        try:
            attempt = send(event, allow=self.allow, timeout_s=self.timeout_s)
        except Exception as exc:  # send catches what it expects; anything else still ends this attempt
            log.exception("webhook %s: sending failed", event.id)
            attempt = Attempt(error=f"could not deliver: {type(exc).__name__}")
        try:
            with self.db.write() as session:
                status = record_attempt(session=session, event=event, attempt=attempt, retry_s=self.retry_s)
        except Exception:  # the row stays leased, and is due again when the lease lapses
            log.exception("recording a webhook attempt failed (event %s)", event.id)
            return None
        level = logging.INFO if attempt.delivered else logging.WARNING
        log.log(level, "webhook %s to %s: %s (attempt %d, now %s)", event.id, urlsplit(event.url).hostname,
                attempt.status_code if attempt.error is None else attempt.error, event.attempts + 1, status,
                extra={"job_id": event.subject_id})
        return status
