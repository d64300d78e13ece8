"""Who is calling: every route but health, documentation and the web page's files needs ``Authorization: Bearer <key>``.

Valid keys are cached for a few seconds per process, so a poll does not cost a database read; a
revoked key stops working within ``CACHE_SECONDS``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
import time
from collections.abc import Callable

from flask import Flask, current_app, g, request

from core.auth import Principal, authenticate
from webapi.errors import ApiError
from webapi.services import services

PUBLIC_ENDPOINTS = {"health.healthz", "ops.readyz", "ops.metrics", "docs.openapi_json", "docs.docs_page",
                    "web.index", "web.asset"}
# Public unless BATCHGEN_TOKENIZER_ROUTES=key.
TOKENIZER_ENDPOINTS = {"tokenizer.tokenizer_info", "tokenizer.tokenize", "tokenizer.detokenize"}
CACHE_SECONDS = 10.0


class KeyCache:
    """Recently validated tokens -> principal; and which tokens were ever valid here, so that the
    limit on failed keys never holds back a key that works (clients behind one proxy or NAT share
    an address with whoever floods it with made-up keys)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def known(self, token: str) -> bool:
        with self._lock:
            return _digest(token) in self._known

    def get(self, token: str) -> Principal | None:
        with self._lock:
            entry = self._entries.get(token)
            if entry is None or entry[1] < time.monotonic():
                self._entries.pop(token, None)
                return None
            return entry[0]

    def put(self, token: str, principal: Principal) -> None:
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            if len(self._known) > 100_000:
                self._known.clear()
            self._entries[token] = (principal, time.monotonic() + CACHE_SECONDS)
            self._known.add(_digest(token))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def client_address() -> str:
    """Whom to count failed keys against: the peer's address, an IPv6 one by its /64 (one
    client holds a whole /64)."""
    address = request.remote_addr or "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def init_app(app: Flask) -> None:
    cache = KeyCache()

    @app.before_request
    def _authenticate() -> None:
        if request.endpoint is None or request.endpoint in PUBLIC_ENDPOINTS:
            return  # unknown routes answer 404 whoever asks
        if request.endpoint in TOKENIZER_ENDPOINTS and services().settings.tokenizer_routes == "public":
            services().limits.check_address_rate(client_address())  # they answer anyone: per address
            return
        header = request.headers.get("Authorization", "").strip()
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not token and header.startswith("key_"):
            scheme, token = "bearer", header  # PAI-EAS clients send the bare token
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "send an API key: Authorization: Bearer <key>")
        principal = cache.get(token)
        if principal is None:
            limits = services().limits
            client = client_address()
            if not cache.known(token):  # before the database is asked; never for a key that worked
                limits.check_auth_failures(client)
            with services().db.read() as session:
                principal = authenticate(session=session, token=token)
            if principal is None:
                limits.note_auth_failure(client)
                raise ApiError(401, "unauthorized", "the API key is not valid (or was revoked)")
            cache.put(token, principal)
        g.principal = principal
        g.token = token
        services().limits.check_rate(principal)

    app.extensions["batchgen.keys"] = cache


def key_still_valid() -> Callable[[], bool]:
    """For a call that lasts (an event stream): a check that the caller's key is still valid,
    answered from the key cache, so a revoked key's streams end within ``CACHE_SECONDS``."""
    token, cache, svc = g.token, current_app.extensions["batchgen.keys"], services()

    def check() -> bool:
        if cache.get(token) is not None:
            return True
        with svc.db.read() as session:
            principal = authenticate(session=session, token=token)
        if principal is None:
            return False
        cache.put(token, principal)
        return True

    return check


def current_principal() -> Principal:
    """The authenticated caller of the current request."""
    return g.principal  # type: ignore[no-any-return]
