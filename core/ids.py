"""Prefixed, time-ordered random identifiers (``job_…``, ``req_…``, ``run_…``).

The body is a ULID-style string: 48 bits of milliseconds then 80 random bits, in lowercase
Crockford base32, so ids of one kind sort by creation time (useful for "newest first" paging)
and cannot be guessed.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    """Return ``<prefix>_<26 chars>``: 10 chars of timestamp, 16 chars of randomness."""
    millis = time.time_ns() // 1_000_000
    return f"{prefix}_{_encode(millis, 10)}{_encode(secrets.randbits(80), 16)}"


def looks_like(value: str, prefix: str) -> bool:
    """True if ``value`` has the shape of an id made by ``new_id(prefix)``."""
    body = value[len(prefix) + 1 :]
    return value.startswith(prefix + "_") and len(body) == 26 and all(c in _ALPHABET for c in body)
