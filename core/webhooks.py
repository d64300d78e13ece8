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
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from core.db import Database, connection_of
from core.ids import new_id
from core.tables import ACTIVE_JOB_STATUSES, Batch, Job, UTCDateTime, WebhookEvent, utcnow

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

    A host allowed only by a wildcard (or a public literal address allowed by ``*``) is called on
    the ``ports`` (setting ``webhook_allowed_ports``: 80 and 443), never on a database's or a mail
    server's port; a name or address the operator wrote exactly keeps any port.

    Empty: no webhooks at all (a job that names one is refused).
    """

    any_name: bool = False
    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ports: frozenset[int] = frozenset((80, 443))

    @classmethod
    def parse(cls, text: str, ports: str = "80,443") -> AllowList:
        """The entries of the settings; ``ValueError`` names one that cannot be used."""
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
        return cls(any_name, frozenset(names), tuple(suffixes), tuple(networks), _ports(ports))

    @classmethod
    def of(cls, settings: Any) -> AllowList:
        """The allow-list a ``core.settings.Settings`` describes."""
        return cls.parse(settings.webhook_allowed_hosts, settings.webhook_allowed_ports)

    @property
    def enabled(self) -> bool:
        return self.any_name or bool(self.names or self.suffixes or self.networks)

    def _exact(self, host: str) -> bool:
        """Whether the operator named ``host`` itself: a name, or a single address (a network
        entry of more than one address is held to the ports, as a wildcard is)."""
        literal = _literal(host)
        if literal is None:
            return host in self.names
        return any(literal in net for net in self.networks
                   if net.version == literal.version and net.num_addresses == 1)

    def permits_name(self, host: str, port: int | None = None) -> bool:
        """Whether a URL may name ``host`` (a literal address: whether some entry may cover it),
        and, given ``port``, on that port."""
        if self._exact(host):
            return True
        if port is not None and port not in self.ports:
            return False
        literal = _literal(host)
        if literal is not None:
            return self.any_name or any(literal in net for net in self.networks if net.version == literal.version)
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
        return public(address)


def _ports(text: str) -> frozenset[int]:
    try:
        ports = frozenset(int(p) for p in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"{text!r}: ports are numbers, comma-separated") from None
    if any(not 0 < p < 65536 for p in ports):
        raise ValueError(f"{text!r}: a port is between 1 and 65535")
    return ports


# Addresses that are not public, from IANA's special-purpose registries (those marked not globally
# reachable, and those that embed or tunnel to another address), written out here rather than
# taken from ``ipaddress.is_global``, whose answer has changed between patch releases of Python.
_NOT_PUBLIC_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4"))
# IPv6: only global unicast (2000::/3) can be public, less these; NAT64's well-known prefix is
# decided by the IPv4 address it carries.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_NOT_PUBLIC_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "2001::/23",  # IETF protocol assignments: Teredo (2001::/32), benchmarking, ORCHID, ...
    "2001:db8::/32", "2002::/16",  # documentation; 6to4 (carries an IPv4 address)
    "3fff::/20", "5f00::/16"))  # documentation (2024); SRv6 SIDs
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the local-use 64:ff9b:1::/48 is not public at all


def public(address: Address) -> bool:
    """A public unicast address, also through every IPv6 form that embeds an IPv4 one."""
    if address.version == 4:
        return not any(address in net for net in _NOT_PUBLIC_V4)
    if address.ipv4_mapped is not None:  # type: ignore[union-attr]
        return public(address.ipv4_mapped)  # type: ignore[union-attr]
    if address in _NAT64:
        return public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return address in _GLOBAL_UNICAST and not any(address in net for net in _NOT_PUBLIC_V6)


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
    if not allow.permits_name(target.host, target.port):
        allowed = ", ".join(str(p) for p in sorted(allow.ports)) or "none"
        return (f"webhooks may call {target.host} on ports {allowed} only, not {target.port} "
                "(BATCHGEN_WEBHOOK_ALLOWED_PORTS; a host the operator names exactly keeps any port)")
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
# The job's key moves into its event: the job keeps none once its event is written.
_SET_JOB_STATE = update(Job.__table__).where(_JOBS.id == bindparam("jid")).values(
    webhook=bindparam("state", type_=_JOBS.webhook.type), webhook_secret=None)


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
    batch.webhook_secret = None  # the key moved into the event


def pending_events(conn: Session | Connection, owner: str) -> int:
    """How many of the owner's events wait to be sent, and will be: its pending events and its
    jobs and batches that have not ended and name a webhook (the API's cap on an owner's
    backlog; counting only events written, a tenant could submit any number of such jobs first
    and cancel them all at once)."""
    events = select(func.count()).where(_EVENTS.c.owner == owner, _EVENTS.c.status == "pending")
    jobs = select(func.count()).where(_JOBS.owner == owner, _JOBS.status.in_(ACTIVE_JOB_STATUSES),
                                      _JOBS.webhook.is_not(None))
    b = Batch.__table__.c
    batches = select(func.count()).where(b.owner == owner, b.status.in_(("validating", "in_progress", "cancelling")),
                                         b.webhook.is_not(None))
    return sum(int(conn.execute(q).scalar_one()) for q in (events, jobs, batches))


def purge(*, session: Session | Connection, older_than: datetime, limit: int = 1000) -> int:
    """Delete events that were delivered or failed before ``older_than`` (at most ``limit`` a
    call); returns how many. A subject keeps what its client reads of the delivery."""
    c = _EVENTS.c
    ids = select(c.id).where(c.status.in_(("delivered", "failed")), c.next_attempt_at < older_than).limit(limit)
    conn = connection_of(session)
    found = list(conn.execute(ids).scalars())
    if found:
        conn.execute(delete(_EVENTS).where(c.id.in_(found)))
    return len(found)


# --- delivering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Taken:
    """An event a deliverer holds until its lease lapses."""

    id: str
    subject_id: str
    url: str
    secret: str
    payload: str
    attempts: int  # before this one
    owner: str = ""


_C = _EVENTS.c
_NOW = bindparam("now", type_=UTCDateTime())
_DUE = (select(_C.id).where(_C.status == "pending", _C.next_attempt_at <= _NOW)
        .order_by(_C.next_attempt_at, _C.id).limit(bindparam("limit")))
# Due events, each owner's first few, ranked so that the first of every owner comes before the
# second of any: one owner's thousand due events do not stand before another's one.
_RANKED = (select(_C.id, _C.owner, _C.next_attempt_at,
                  func.row_number().over(partition_by=_C.owner, order_by=(_C.next_attempt_at, _C.id)).label("rank"))
           .where(_C.status == "pending", _C.next_attempt_at <= _NOW).subquery())
_FAIR_DUE = (select(_RANKED.c.id, _RANKED.c.owner).where(_RANKED.c.rank <= bindparam("per_owner"))
             .order_by(_RANKED.c.rank, _RANKED.c.next_attempt_at, _RANKED.c.id).limit(bindparam("limit")))


def any_due(*, session: Session, now: datetime | None = None) -> bool:
    """Whether some event is due to be sent (a read, for the deliverer's idle rounds)."""
    return session.execute(_DUE, {"now": now or utcnow(), "limit": 1}).first() is not None


_TAKE = (update(_EVENTS).where(_C.id == bindparam("eid"), _C.status == "pending", _C.next_attempt_at <= _NOW)
         .values(next_attempt_at=bindparam("lease", type_=UTCDateTime()))
         .returning(_C.id, _C.subject_id, _C.url, _C.secret, _C.payload, _C.attempts, _C.owner))


def take_due(*, session: Session, limit: int, lease_s: float, now: datetime | None = None,
             per_owner: int = 1_000_000, held: Mapping[str, int] | None = None,
             busy: Collection[str] = ()) -> list[Taken]:
    """Take up to ``limit`` events that are due, for ``lease_s`` seconds: fairly, owner by owner
    (round robin), and no more than ``per_owner`` of an owner's at once counting those this
    deliverer already ``held`` (sends in flight, by owner). Events in ``busy`` (being sent here)
    are never taken again."""
    now = now or utcnow()
    held = held or {}
    conn = session.connection()
    candidates = conn.execute(_FAIR_DUE, {"now": now, "per_owner": per_owner,
                                          "limit": limit + len(busy) + len(held) * per_owner}).all()
    counts = dict(held)
    taken = []
    for event_id, owner in candidates:
        if len(taken) >= limit:
            break
        if event_id in busy or counts.get(owner, 0) >= per_owner:
            continue
        row = conn.execute(_TAKE, {"eid": event_id, "now": now, "lease": now + timedelta(seconds=lease_s)}).first()
        if row is not None:  # another deliverer took it between the two statements
            taken.append(Taken(row.id, row.subject_id, row.url, row.secret, row.payload, row.attempts, row.owner))
            counts[owner] = counts.get(owner, 0) + 1
    return taken


_RENEW = (update(_EVENTS).where(_C.id == bindparam("eid"), _C.attempts == bindparam("before"), _C.status == "pending")
          .values(next_attempt_at=bindparam("lease", type_=UTCDateTime())))


def renew(*, session: Session, events: Collection[Taken], lease_s: float, now: datetime | None = None) -> None:
    """Push the leases of events still being sent here, so a send in flight is never taken again
    (one whose attempt was recorded meanwhile is left as the record set it)."""
    if events:
        lease = (now or utcnow()) + timedelta(seconds=lease_s)
        session.connection().execute(_RENEW, [{"eid": e.id, "before": e.attempts, "lease": lease} for e in events])


@dataclass(frozen=True)
class Attempt:
    """What one send gave: the receiver's status code, or why there was none."""

    status_code: int | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def final(status_code: int | None) -> bool:
    """An answer that retrying will not change: a 4xx other than 408 (timeout) and 429 (busy)."""
    return status_code is not None and 400 <= status_code < 500 and status_code not in (408, 429)


def record_attempt(*, session: Session, event: Taken, attempt: Attempt, retry_s: Sequence[float],
                   now: datetime | None = None) -> str | None:
    """Store how a send went, on the event and on its subject; returns the event's status now
    (None if another deliverer recorded this attempt first: its lease had lapsed)."""
    now = now or utcnow()
    attempts = event.attempts + 1
    if attempt.delivered:
        status, next_at = "delivered", None
    elif attempts > len(retry_s) or final(attempt.status_code):
        status, next_at = "failed", None
    else:
        delay = retry_s[attempts - 1]
        status, next_at = "pending", now + timedelta(seconds=delay * random.uniform(1.0, 1.1))
    changed = session.execute(
        update(WebhookEvent).where(WebhookEvent.id == event.id, WebhookEvent.status == "pending",
                                   WebhookEvent.attempts == event.attempts)
        .values(status=status, attempts=attempts, next_attempt_at=next_at or now,
                delivered_at=now if status == "delivered" else None,
                secret=event.secret if status == "pending" else None)).rowcount  # an ended event keeps no key
    if not changed:
        return None
    error = attempt.error
    if error is None and not attempt.delivered:
        error = f"the receiver answered {attempt.status_code}; only 2xx counts as delivered"
        if final(attempt.status_code):
            error += " (a 4xx other than 408 and 429 is not retried: the same send would get the same answer)"
    table: Any = Job if event.subject_id.startswith("job_") else Batch
    subject = session.get(table, event.subject_id, with_for_update=True)
    if subject is not None and subject.webhook is not None:
        subject.webhook = {**subject.webhook, "status": status, "attempts": attempts, "last_attempt_at": _iso(now),
                           "last_response_status": attempt.status_code,
                           "last_error": error[:MAX_ERROR_CHARS] if error else None,
                           "next_attempt_at": _iso(next_at), "delivered_at": _iso(now) if attempt.delivered else None}
    return status


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to an address already checked, never looked up again. ``cut`` is the send's cut-off:
    once it is set, no further step starts."""

    def __init__(self, host: str, port: int, address: str, timeout: float, cut: threading.Event) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address, self._cut = address, cut

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        if self._cut.is_set():
            raise TimeoutError("cut off")


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address already checked; the certificate is checked against the URL's host.

    The TLS handshake runs on a socket the cut-off can already reach: wrapped first, shaken hands
    after (with ``do_handshake_on_connect`` the wrapped socket appears only once the handshake
    ended, and under gevent the handshake's timeout restarts at every byte, so a receiver that
    trickled its handshake held the send for as long as it liked)."""

    _shared_context: ssl.SSLContext | None = None

    def __init__(self, host: str, port: int, address: str, timeout: float, cut: threading.Event) -> None:
        if _PinnedHTTPSConnection._shared_context is None:  # loading the CA bundle costs; once per process
            _PinnedHTTPSConnection._shared_context = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=_PinnedHTTPSConnection._shared_context)
        self._address, self._cut = address, cut

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        try:
            tls = self._context.wrap_socket(sock, server_hostname=self.host,  # type: ignore[attr-defined]
                                            do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        self.sock = tls
        if self._cut.is_set():  # cut before the socket could be reached: it would not see the shutdown
            raise TimeoutError("cut off")
        tls.do_handshake()


_lookups: ThreadPoolExecutor | None = None
_lookups_lock = threading.Lock()
_looking: dict[str, int] = {}  # lookups still running, by owner (those a send gave up on too)
LOOKUP_THREADS = 16
LOOKUPS_PER_OWNER = 2


def _lookup(host: str, port: int, timeout_s: float, owner: str = "") -> list[Any]:
    """``getaddrinfo`` within ``timeout_s``. A resolver can be made as slow as its owner likes,
    and a lookup cannot be stopped: it goes on in its thread while the send goes on without it.
    So one owner has at most ``LOOKUPS_PER_OWNER`` lookups running (its next send fails at once,
    as its own resolver's doing), and a tenant whose name server never answers cannot take the
    threads every other tenant's lookups need."""
    global _lookups
    with _lookups_lock:
        if _lookups is None:  # made on first use: under gevent, after the process was patched
            _lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="webhook-dns")
        if _looking.get(owner, 0) >= LOOKUPS_PER_OWNER:
            raise OSError(f"{LOOKUPS_PER_OWNER} lookups of this owner's hosts are still running")
        _looking[owner] = _looking.get(owner, 0) + 1

    def done(_: Any) -> None:
        with _lookups_lock:
            _looking[owner] -= 1
            if not _looking[owner]:
                del _looking[owner]

    future = _lookups.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    future.add_done_callback(done)
    try:
        return future.result(timeout=max(0.0, timeout_s))
    except FuturesTimeout:
        raise OSError(f"no answer from the resolver within {timeout_s:.3g} s") from None


def resolve(target: Target, allow: AllowList, timeout_s: float = 10.0, owner: str = "") -> list[str]:
    """The addresses to call ``target`` at; ``PermissionError`` if the allow-list forbids the host,
    its port or any address it resolves to.

    A name that cannot be resolved and one that resolves to an address the service may not call
    give the client the same answer: told apart, they would let a tenant map internal host names.
    The log keeps which it was."""
    if not allow.permits_name(target.host, target.port):
        raise PermissionError(f"refused: {target.host} on port {target.port} is not in this service's allow-list "
                              "(BATCHGEN_WEBHOOK_ALLOWED_HOSTS, BATCHGEN_WEBHOOK_ALLOWED_PORTS)")
    unreachable = PermissionError(f"refused: {target.host} does not resolve to an address this service may call "
                                  "(a public one, or one in BATCHGEN_WEBHOOK_ALLOWED_HOSTS)")
    literal = _literal(target.host)
    if literal is not None:
        found = [literal]
    else:
        try:
            infos = _lookup(target.host, target.port, timeout_s, owner)
        except OSError as exc:
            log.warning("webhook refused: cannot resolve %s (%s)", target.host, exc)
            raise unreachable from None
        found = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    refused = [str(a) for a in found if not allow.permits_address(target.host, a)]
    if refused or not found:  # one private address among public ones is enough to refuse (DNS rebinding)
        log.warning("webhook refused: %s resolves to %s", target.host, ", ".join(refused) or "nothing")
        raise unreachable
    return [str(a) for a in found][:MAX_ADDRESSES]


def send(event: Taken, *, allow: AllowList, timeout_s: float, now: float | None = None) -> Attempt:
    """POST one event, signed; what happened (never raises). The whole attempt (the lookup, the
    connection, the TLS handshake, the request, the answer, on each address tried) ends within
    ``timeout_s``, whatever the receiver and its resolver do."""
    deadline = time.monotonic() + timeout_s
    late = f"no answer within {timeout_s:g} s"
    try:
        target = parse_url(event.url)
        addresses = resolve(target, allow, timeout_s, event.owner)
    except (ValueError, PermissionError) as exc:
        return Attempt(error=str(exc))
    except Exception as exc:  # whatever it is, it is this attempt's outcome, never a lost one
        log.exception("webhook %s: resolving its host failed", event.id)
        return Attempt(error=f"could not resolve the host ({type(exc).__name__})")
    body = event.payload.encode()
    timestamp = int(now if now is not None else time.time())
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "webhook-id": event.id,
               "webhook-timestamp": str(timestamp), "webhook-signature": sign(event.secret, event.id, timestamp, body)}
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    error = late
    for address in addresses:
        left = deadline - time.monotonic()
        if left <= 0.05:
            break
        # The socket timeout bounds each read; the cut-off bounds the whole exchange (a receiver
        # trickling a byte at a time would hold the slot, and outlive the lease, without it).
        cut = threading.Event()  # set before the socket is shut: the failure that follows is the cut's
        conn = kind(target.host, target.port, address, left, cut)
        cutoff = threading.Timer(left, _cut, (conn, cut))
        cutoff.daemon = True
        cutoff.start()
        try:
            conn.request("POST", target.path, body=body, headers=headers)
            response = conn.getresponse()
            response.read(RESPONSE_READ_BYTES)
            if cut.is_set():  # the answer came whole, but after the cut-off: it does not count
                raise TimeoutError("cut off")
            return Attempt(status_code=response.status)
        except Exception as exc:  # OSError, HTTPException, ssl errors, anything: this attempt failed
            timed_out = cut.is_set() or isinstance(exc, TimeoutError)
            error = late if timed_out else f"could not deliver: {type(exc).__name__}"
            log.info("webhook %s to %s (%s): %s", event.id, target.host, address, exc)
        finally:
            cutoff.cancel()
            conn.close()
    return Attempt(error=error)


def _cut(conn: http.client.HTTPConnection, cut: threading.Event) -> None:
    """End a send that has run out of time (shutdown wakes a thread blocked on the socket, in the
    handshake or reading the answer). ``cut`` is set first: the timer thread may still be alive
    when the reader sees the failure, and a connection not made yet will not start its next step."""
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
    slow receiver holds one slot rather than every delivery.

    Fair between owners: due events are taken owner by owner, and one owner's events hold at most
    ``per_owner`` of the slots, so a tenant whose receivers are slow or dead slows only its own
    webhooks. Each send ends within ``timeout_s`` (``send``); the events in flight are tracked by
    id and their leases renewed every round, so an event this process is still sending is never
    taken again, here or by another process. Finished events are deleted ``retention_s`` after
    they ended."""

    db: Database
    allow: AllowList
    retry_s: tuple[float, ...]
    timeout_s: float = 10.0
    interval_s: float = 1.0
    concurrency: int = 4
    per_owner: int = 2
    retention_s: float = 7 * 86400.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _pool: ThreadPoolExecutor | None = None
    _inflight: dict[str, tuple[Taken, Future[Any]]] = field(default_factory=dict)  # event id: (event, send)
    _purged_at: float = 0.0

    @property
    def lease_s(self) -> float:
        # Past the longest a send can take (it is cut off at the timeout) and a round or two more:
        # renewed every round while it runs, it lapses only if this process stopped.
        return self.timeout_s + 5 * self.interval_s + 5

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
            try:
                self.purge_once()
            except Exception:
                log.exception("purging old webhook events failed")

    def in_flight(self) -> dict[str, int]:
        """Sends in flight, by owner."""
        self._inflight = {k: v for k, v in self._inflight.items() if not v[1].done()}
        held: dict[str, int] = {}
        for event, _ in self._inflight.values():
            held[event.owner] = held.get(event.owner, 0) + 1
        return held

    def run_once(self) -> int:
        """Renew the leases of sends in flight, then start sending what is due, as far as free
        slots and the owners' shares go; returns how many were taken."""
        held = self.in_flight()
        if self._inflight:
            with self.db.write() as session:
                renew(session=session, events=[e for e, _ in self._inflight.values()], lease_s=self.lease_s)
        free = self.concurrency - len(self._inflight)
        if free <= 0 or self._pool is None:
            return 0
        with self.db.read() as session:  # the usual answer is "nothing": no write lock for it (SQLite)
            if not any_due(session=session):
                return 0
        with self.db.write() as session:
            taken = take_due(session=session, limit=free, lease_s=self.lease_s, per_owner=self.per_owner,
                             held=held, busy=set(self._inflight))
        for event in taken:
            self._inflight[event.id] = (event, self._pool.submit(self.deliver, event))
        return len(taken)

    def purge_once(self, *, every_s: float = 60.0) -> int:
        """Delete events that ended more than ``retention_s`` ago (at most once every ``every_s``)."""
        if time.monotonic() - self._purged_at < every_s:
            return 0
        self._purged_at = time.monotonic()
        with self.db.write() as session:
            gone = purge(session=session, older_than=utcnow() - timedelta(seconds=self.retention_s))
        if gone:
            log.info("deleted %d webhook events that ended over %g s ago", gone, self.retention_s)
        return gone

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
