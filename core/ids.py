"""Prefixed, time-ordered random identifiers (``job_…``, ``req_…``, ``run_…``).

The body is a ULID-style string: 48 bits of milliseconds then 80 random bits, in lowercase
Crockford base32, so ids of one kind sort by creation time (useful for "newest first" paging)
and cannot be guessed.
"""

from __future__ import annotations

import base64
import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


# base64's RFC 4648 base32 alphabet, symbol for symbol onto ours: the value order is kept.
_FROM_RFC4648 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET)


def new_id(prefix: str) -> str:
    """Return ``<prefix>_<26 chars>``: 10 chars of timestamp, 16 chars of randomness."""
    return new_ids(prefix, 1)[0]


def new_ids(prefix: str, count: int) -> list[str]:
    """``count`` ids made at once (a job's requests): one clock read, one call for the randomness."""
    head = f"{prefix}_{_encode(time.time_ns() // 1_000_000, 10)}"
    # 10 random bytes are exactly 16 base32 symbols, so one encoding slices into ``count`` bodies.
    tails = base64.b32encode(secrets.token_bytes(10 * count)).decode().translate(_FROM_RFC4648)
    return [head + tails[i : i + 16] for i in range(0, 16 * count, 16)]


def floor_id(prefix: str, *, margin_s: float = 0.0) -> str:
    """An id-shaped string that sorts at or below every id of ``prefix`` made from ``margin_s``
    seconds ago on (and above those made earlier): ``id >= floor_id(...)`` selects what is newer,
    also on another machine whose clock is up to ``margin_s`` behind this one's."""
    return f"{prefix}_{_encode(time.time_ns() // 1_000_000 - int(margin_s * 1000), 10)}"


def looks_like(value: str, prefix: str) -> bool:
    """True if ``value`` has the shape of an id made by ``new_id(prefix)``."""
    body = value[len(prefix) + 1 :]
    return value.startswith(prefix + "_") and len(body) == 26 and all(c in _ALPHABET for c in body)
