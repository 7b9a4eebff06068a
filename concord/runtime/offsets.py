"""Concord's own offset bookkeeping: which input records were decided, and so which offsets may be committed.

faust keeps its own list of acknowledged offsets and treats any jump in what it fetched as acknowledged, so a
restart or rebalance could commit offsets of records nobody processed. The ledger is the only authority the
commit path asks: a partition's committable offset is the offset after the last record that was processed,
in order, from the committed offset it was assigned at, and whose outputs the broker acknowledged.
Pure (no faust, no clock of its own), so every case is tested without a broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROCESS, SKIP, SEEK = "process", "skip", "seek"

# A jump that is still there after this many seeks back, this many seconds apart, is taken as offsets that
# hold no record (a compacted or transactional topic), never as records to skip.
GAP_SEEKS = 3
GAP_SEEK_EVERY_S = 1.0


@dataclass
class _Partition:
    """What the ledger knows of one assigned partition."""

    pending: bool = True  # assigned, but its committed offset not read yet: nothing is processed meanwhile
    next: int | None = None  # the offset the next processed record must have (None: the first one seen)
    done: int | None = None  # committable: the offset after the last record whose outputs were acknowledged
    lowest_skipped: int | None = None  # the lowest offset delivered while pending
    seek_target: int | None = None  # the offset asked for by the last seek back
    seeks: int = 0
    last_seek_at: float = 0.0
    holes: dict[int, int] = field(default_factory=dict)  # accepted runs of offsets with no record: start -> end


@dataclass(frozen=True)
class Verdict:
    """What to do with one delivered record: process it, skip it, or skip it and seek back to ``offset``."""

    action: str
    offset: int | None = None
    reason: str = ""


class OffsetLedger:
    """Per-partition frontier of decided records, keyed by any hashable partition id (faust's TP in the worker)."""

    def __init__(self) -> None:
        self._parts: dict[Any, _Partition] = {}

    def assigned(self, tps: Any) -> None:
        """Partitions newly assigned: hold their records until their committed offsets are known."""
        for tp in tps:
            self._parts[tp] = _Partition()

    def revoked(self, tps: Any) -> None:
        """Partitions taken away: forget them (their records are another worker's now)."""
        for tp in tps:
            self._parts.pop(tp, None)

    def committed_known(self, offsets: dict[Any, int | None]) -> dict[Any, int]:
        """The consumer sought to these committed offsets; return the partitions that must seek elsewhere."""
        seeks: dict[Any, int] = {}
        for tp, offset in offsets.items():
            part = self._parts.setdefault(tp, _Partition())
            part.pending = False
            if offset is not None and offset >= 0:
                part.next = part.done = offset
            elif part.lowest_skipped is not None:  # nothing committed yet: start where delivery started
                part.next = part.done = part.lowest_skipped
                seeks[tp] = part.lowest_skipped
            else:
                part.next = part.done = None
            part.lowest_skipped, part.seek_target, part.seeks = None, None, 0
        return seeks

    def admit(self, tp: Any, offset: int, now: float) -> Verdict:
        """Whether the record at ``offset`` is the next one to process on ``tp``."""
        part = self._parts.get(tp)
        if part is None:  # delivered before its assignment was seen: hold it like a pending one
            part = self._parts[tp] = _Partition()
        if part.pending:
            part.lowest_skipped = offset if part.lowest_skipped is None else min(part.lowest_skipped, offset)
            return Verdict(SKIP, reason="committed offset not known yet")
        if part.next is None:
            part.next = part.done = offset
        if offset == part.next:
            part.next += 1
            part.seek_target, part.seeks = None, 0
            return Verdict(PROCESS)
        if offset < part.next:
            return Verdict(SKIP, reason="already processed")
        # offset > next: records in between were not delivered; fetch them again rather than pass over them
        if part.seek_target == part.next and part.seeks >= GAP_SEEKS:
            if now - part.last_seek_at >= GAP_SEEK_EVERY_S:
                empty = f"offsets {part.next}..{offset - 1} hold no record"
                part.holes[part.next] = offset
                part.next = offset + 1
                part.seek_target, part.seeks = None, 0
                return Verdict(PROCESS, reason=empty)
            return Verdict(SKIP, reason="waiting for the seek back")
        if part.seek_target == part.next and now - part.last_seek_at < GAP_SEEK_EVERY_S:
            return Verdict(SKIP, reason="waiting for the seek back")
        part.seek_target = part.next
        part.seeks += 1
        part.last_seek_at = now
        return Verdict(SEEK, part.next, reason=f"expected offset {part.next}, got {offset}")

    def done(self, tp: Any, offset: int) -> None:
        """The record at ``offset`` was processed and its outputs acknowledged; the frontier moves only in order."""
        part = self._parts.get(tp)
        if part is None or part.pending:
            return
        if part.done is None:
            part.done = offset
        while part.done in part.holes:
            part.done = part.holes.pop(part.done)
        if offset == part.done:
            part.done = offset + 1

    def committable(self, tp: Any) -> int | None:
        """The offset that may be committed for ``tp``, or None while nothing is known."""
        part = self._parts.get(tp)
        return None if part is None or part.pending else part.done

    def partitions(self) -> list[Any]:
        """The partitions the ledger follows."""
        return list(self._parts)
