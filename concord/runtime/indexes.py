"""Small per-partition indexes over the worker's tables, derived from table state and rebuilt from it.

Gauges and timers read these instead of counters kept beside the tables: after a restart, a rebalance or an
escalation they are rebuilt from the recovered tables, so a gauge always equals what the tables (and the
owners' queues) hold on the partitions a worker is active for. Each index keeps only the keys that weigh
something (parked events, open exceptions), so reading it costs in proportion to those, not to the table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

Weigh = Callable[[Any], dict[Any, int]]

OPEN_STATES = ("open", "acknowledged", "escalated")


def parked_in_cursor(cursor: Any) -> dict[Any, int]:
    """A guard cursor's events parked behind a sequence gap."""
    n = len(cursor.get("parked") or ()) if isinstance(cursor, dict) else 0
    return {"parked": n} if n else {}


def parked_in_status(status: Any) -> dict[Any, int]:
    """A customer status's events parked behind an open exception."""
    if not isinstance(status, dict):
        return {}
    n = sum(len(queue) for queue in (status.get("parked") or {}).values())
    return {"parked": n} if n else {}


def open_exception(rec: Any) -> dict[Any, int]:
    """An exception record that is still open, counted under (owner, reason)."""
    if isinstance(rec, dict) and rec.get("state") in OPEN_STATES:
        return {(rec.get("owner") or "?", rec.get("reason_code") or "?"): 1}
    return {}


class TableIndex:
    """partition -> key -> weight, for the keys of one table whose value weighs something."""

    def __init__(self, weigh: Weigh) -> None:
        self.weigh = weigh
        self._parts: dict[int, dict[bytes, dict[Any, int]]] = {}
        self._built: set[int] = set()

    def clear(self) -> None:
        """Forget everything (the partitions were reassigned): rebuild before reading again."""
        self._parts.clear()
        self._built.clear()

    def built(self, partitions: Iterable[int]) -> bool:
        """Whether every one of ``partitions`` was rebuilt since the last clear."""
        return set(partitions) <= self._built

    def rebuild(self, partitions: Iterable[int], items: Iterable[tuple[int, bytes, Any]]) -> None:
        """Index ``partitions`` afresh from (partition, key, value) items of the table."""
        wanted = set(partitions) - self._built
        if not wanted:
            return
        for p in wanted:
            self._parts[p] = {}
        for p, key, value in items:
            if p in wanted:
                self.put(p, key, value)
        self._built |= wanted

    def put(self, partition: int, key: bytes, value: Any) -> None:
        """The table's value for ``key`` is now ``value``."""
        weight = self.weigh(value)
        keys = self._parts.setdefault(partition, {})
        if weight:
            keys[key] = weight
        else:
            keys.pop(key, None)

    def keys(self, partitions: Iterable[int]) -> list[bytes]:
        """The weighing keys on ``partitions``, sorted."""
        return sorted(k for p in partitions for k in self._parts.get(p, {}))

    def keys_by_partition(self) -> dict[int, set[bytes]]:
        """Partition -> the weighing keys held there."""
        return {p: set(keys) for p, keys in self._parts.items()}

    def total(self, partitions: Iterable[int]) -> Counter:
        """The summed weights over ``partitions``."""
        out: Counter = Counter()
        for p in partitions:
            for weight in self._parts.get(p, {}).values():
                out.update(weight)
        return out
