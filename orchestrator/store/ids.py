"""Object IDs and timestamps, as Docker's swarm mode makes them."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_id() -> str:
    """25 lower-case base-36 characters from 128+ random bits (swarmkit identity.NewID)."""
    raw = bytearray(os.urandom(17))
    raw[0] |= 0x80  # fixes the length: the leading digit is never 0
    n = int.from_bytes(raw, "big")
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))[1:26]


def new_raft_id() -> int:
    """A manager's Raft member ID: random, never 0 (Raft's "nobody"), never reused."""
    return int.from_bytes(os.urandom(8), "big") >> 1 or 1


def now_rfc3339(ns: int | None = None) -> str:
    """UTC with nanoseconds, like 2026-11-30T03:44:14.159755344Z."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp (nanoseconds kept to microseconds)."""
    main, _, frac = text.rstrip("Z").partition(".")
    base = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return base + (float("0." + frac) if frac else 0.0)
