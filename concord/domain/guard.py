"""Ordering guard: per (source_system, entity_type, entity_id), drop duplicates and stale events, park gaps.

A cursor is a JSON-able dict kept in a table keyed by ``guard_key``; ``admit`` is pure: it returns the
new cursor, the verdict for the incoming event, and the events to apply now, in sequence order (the
incoming one and any parked ones its arrival makes contiguous).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RECENT_IDS = 16  # event ids remembered per entity, so a late redelivery reads as duplicate, not stale

APPLY, DUPLICATE, STALE, PARK = "apply", "duplicate", "stale", "park"


@dataclass(frozen=True)
class Incoming:
    """What the guard needs of one event; ``ref`` is the caller's handle to it (JSON-able)."""

    seq: int
    event_id: str
    digest: str  # of op + payload: equal digests at equal seq mean the same content
    contiguous: bool
    snapshot: bool
    ref: Any


@dataclass
class Verdict:
    """The guard's decision about one incoming event."""

    kind: str  # apply | duplicate | stale | park
    reason: str
    release: list[Any] = field(default_factory=list)  # refs to apply now, in order


def guard_key(source_system: str, entity_type: str, entity_id: str) -> str:
    """The cursor key of one entity in one source system."""
    return f"{source_system}:{entity_type}:{entity_id}"


def new_cursor() -> dict[str, Any]:
    """A cursor for an entity never seen before."""
    return {"seq": None, "digest": None, "recent": [], "parked": [], "gap_since": None, "gap_exception": None}


def admit(cursor: dict[str, Any] | None, ev: Incoming, now_ms: int) -> tuple[dict[str, Any], Verdict]:
    """Decide what to do with ``ev`` given the entity's cursor; never mutates ``cursor``."""
    cur = dict(cursor) if cursor else new_cursor()
    last = cur["seq"]
    if ev.event_id in cur["recent"] or any(p["event_id"] == ev.event_id for p in cur["parked"]):
        return cur, Verdict(DUPLICATE, f"event {ev.event_id} already seen")
    if last is not None and ev.seq == last:
        if ev.digest == cur["digest"]:
            return cur, Verdict(DUPLICATE, f"seq {ev.seq} already applied with the same content")
        return cur, Verdict(STALE, f"seq {ev.seq} already applied with different content")
    if last is not None and ev.seq < last:
        return cur, Verdict(STALE, f"seq {ev.seq} is older than applied seq {last}")
    expected = 1 if last is None else last + 1
    if ev.contiguous and not ev.snapshot and ev.seq > expected:
        if any(p["seq"] == ev.seq for p in cur["parked"]):
            return cur, Verdict(DUPLICATE, f"seq {ev.seq} is already parked")
        parked = sorted([*cur["parked"], _parked(ev)], key=lambda p: p["seq"])
        cur["parked"] = parked
        if cur["gap_since"] is None:
            cur["gap_since"] = now_ms
        return cur, Verdict(PARK, f"waiting for seq {expected}, got {ev.seq}")
    _applied(cur, ev.seq, ev.event_id, ev.digest)
    release = [ev.ref, *_drain(cur)]
    return cur, Verdict(APPLY, "in order" if len(release) == 1 else f"released {len(release) - 1} parked",
                        release)


def release_parked(cursor: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Give up on the missing sequence numbers: apply every parked event in order (an owner's call)."""
    cur = dict(cursor)
    out = []
    for p in cur["parked"]:
        _applied(cur, p["seq"], p["event_id"], p["digest"])
        out.append(p["ref"])
    cur["parked"] = []
    cur["gap_since"] = None
    cur["gap_exception"] = None
    return cur, out


def gap_overdue(cursor: dict[str, Any], now_ms: int, wait_ms: int) -> bool:
    """Whether this cursor's gap has waited longer than ``wait_ms`` without an exception raised."""
    return (cursor.get("gap_since") is not None and cursor.get("gap_exception") is None
            and now_ms - cursor["gap_since"] >= wait_ms)


def missing_seqs(cursor: dict[str, Any]) -> list[int]:
    """The sequence numbers the parked events are waiting for."""
    if not cursor["parked"]:
        return []
    start = 1 if cursor["seq"] is None else cursor["seq"] + 1
    return [s for s in range(start, cursor["parked"][0]["seq"])]


def _parked(ev: Incoming) -> dict[str, Any]:
    return {"seq": ev.seq, "event_id": ev.event_id, "digest": ev.digest, "ref": ev.ref}


def _applied(cur: dict[str, Any], seq: int, event_id: str, digest: str) -> None:
    cur["seq"] = seq
    cur["digest"] = digest
    cur["recent"] = [*cur["recent"][-(RECENT_IDS - 1):], event_id]


def _drain(cur: dict[str, Any]) -> list[Any]:
    out = []
    parked = cur["parked"]
    while parked and parked[0]["seq"] == cur["seq"] + 1:
        p = parked[0]
        parked = parked[1:]
        _applied(cur, p["seq"], p["event_id"], p["digest"])
        out.append(p["ref"])
    cur["parked"] = parked
    if not parked:
        cur["gap_since"] = None
        cur["gap_exception"] = None
    return out
