"""API keys: created and revoked by operators, kept only as salted hashes.

A key reads ``key_<id>.<secret>``: the id finds the row, the secret is checked against the stored
``sha256(salt + secret)`` with a constant-time comparison. Secrets are 256 random bits, so a fast
hash is enough; a slow password hash would only cost time on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.errors import NotFoundError
from core.ids import looks_like, new_id
from core.tables import ApiKey, utcnow

MAX_OWNER_CHARS = 128


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner of the jobs they may see, and whether they may see all."""

    key_id: str
    owner: str
    admin: bool

    @property
    def owner_filter(self) -> str | None:
        """The owner to restrict queries to; None for an admin."""
        return None if self.admin else self.owner


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def create_key(*, session: Session, owner: str, name: str = "", admin: bool = False) -> tuple[ApiKey, str]:
    """A new key for ``owner``; returns the row and the token, which is shown this once."""
    if not owner or len(owner) > MAX_OWNER_CHARS:
        raise ValueError(f"owner must have 1 to {MAX_OWNER_CHARS} characters")
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    key = ApiKey(id=new_id("key"), owner=owner, name=name[:128], salt=salt, secret_hash=_digest(salt, secret),
                 admin=admin, created_at=utcnow())
    session.add(key)
    session.flush()
    return key, f"{key.id}.{secret}"


def authenticate(*, session: Session, token: str) -> Principal | None:
    """The principal of a valid, unrevoked token; None otherwise."""
    key_id, _, secret = token.partition(".")
    if not secret or not looks_like(key_id, "key"):
        return None
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        # Compare anyway so a miss takes as long as a wrong secret.
        hmac.compare_digest(_digest("00" * 16, secret), "0" * 64)
        return None
    if not hmac.compare_digest(_digest(key.salt, secret), key.secret_hash):
        return None
    return Principal(key_id=key.id, owner=key.owner, admin=key.admin)


def list_keys(*, session: Session) -> list[ApiKey]:
    """Every key, newest first (hashes only; secrets are never stored)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id.desc())))


def revoke_key(*, session: Session, key_id: str) -> ApiKey:
    """Revoke a key; revoking twice is harmless."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFoundError(f"no key {key_id!r}")
    if key.revoked_at is None:
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
        session.refresh(key)
    return key
