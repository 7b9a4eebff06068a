"""Deterministic ids: the same decision always gets the same id, different decisions practically never share one."""

from __future__ import annotations

import functools
import hashlib


@functools.lru_cache(maxsize=1 << 17)
def stable_id(*parts: str) -> str:
    """A deterministic id: the same parts always give it, different parts practically never do.

    Cached: every decision recomputes the ids of all of the customer's warranted commands to see which
    were issued, so most calls repeat one made for the customer's previous event.
    """
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def command_id(*parts: str) -> str:
    """A command's idempotency key: deterministic, and marked so that echoes of it are recognised (cmd_...)."""
    return "cmd_" + stable_id(*parts)
