"""The reconciliation report: every published record's fate, counted from what came out of the broker."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from streams import topics
from streams.serde import Codec
from streams.simulator import Published

# Outcomes in the order the report lists them.
OUTCOMES = ("applied", "exception", "duplicate", "stale", "parked", "dead_lettered")


@dataclass
class Report:
    """What happened to every published record, and what Concord emitted because of them."""

    published: int = 0
    outcomes: Counter = field(default_factory=Counter)
    released_after_park: int = 0
    by_fault: dict[str, Counter] = field(default_factory=dict)
    commands: Counter = field(default_factory=Counter)
    duplicate_command_ids: int = 0
    exceptions_opened: Counter = field(default_factory=Counter)  # (owner, reason)
    exceptions_resolved: Counter = field(default_factory=Counter)  # (owner, reason)
    dead_letters: Counter = field(default_factory=Counter)  # stage
    missing: list[tuple[str, int, int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def unaccounted(self) -> int:
        """Published records with no decision read back from audit.decisions."""
        return len(self.missing)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "published": self.published, "outcomes": dict(self.outcomes), "unaccounted": self.unaccounted,
            "released_after_park": self.released_after_park,
            "by_fault": {k: dict(v) for k, v in sorted(self.by_fault.items())},
            "commands": dict(self.commands), "duplicate_command_ids": self.duplicate_command_ids,
            "exceptions_opened": {f"{o}/{r}": n for (o, r), n in sorted(self.exceptions_opened.items())},
            "exceptions_resolved": {f"{o}/{r}": n for (o, r), n in sorted(self.exceptions_resolved.items())},
            "dead_letters": dict(self.dead_letters), "missing": self.missing[:20], "seconds": round(self.seconds, 1),
        }


def end_offsets(bootstrap: str, names: Iterable[str]) -> dict[tuple[str, int], int]:
    """The high watermark of every partition of ``names`` (where reading should start)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"concord-report-{uuid.uuid4().hex[:8]}"})
    try:
        md = c.list_topics(timeout=10)
        return {(t, p): c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                for t in names for p in md.topics[t].partitions}
    finally:
        c.close()


def watched_topics() -> list[str]:
    """The topics the report reads: decisions, commands, exceptions and dead letters."""
    return [topics.AUDIT.name, *(t.name for t in topics.COMMANDS), *(t.name for t in topics.EXCEPTIONS),
            *(t.name for t in topics.DEADLETTERS)]


def collect(bootstrap: str, published: list[Published], since: dict[tuple[str, int], int], timeout: float = 120,
            settle: float = 5.0, progress: Callable[[int, int], None] | None = None) -> Report:
    """Read outputs from ``since`` until every published record has a decision and nothing new came for ``settle`` s."""
    started = time.monotonic()
    codec = Codec()
    fates: dict[tuple[str, int, int], list[str]] = {(p.topic, p.partition, p.offset): [] for p in published}
    report = Report(published=len(published))
    seen_commands: set[str] = set()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"concord-report-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    c.assign([TopicPartition(t, p, o) for (t, p), o in since.items()])
    decided = 0
    last_new = time.monotonic()
    try:
        while time.monotonic() - started < timeout:
            batch = c.consume(1000, 0.25)
            for m in batch:
                if m.error():
                    continue
                last_new = time.monotonic()
                _, rec = codec.decode(m.value())
                topic = m.topic()
                if topic == topics.AUDIT.name:
                    key = (rec["topic"], rec["partition"], rec["offset"])
                    if key in fates:
                        decided += not fates[key]
                        fates[key].append(rec["outcome"])
                elif topic.startswith("commands."):
                    report.commands[rec["type"]] += 1
                    report.duplicate_command_ids += rec["command_id"] in seen_commands
                    seen_commands.add(rec["command_id"])
                elif topic.startswith("exceptions."):
                    bucket = report.exceptions_resolved if rec["state"] == "resolved" else report.exceptions_opened
                    bucket[(rec["owner"], rec["reason_code"])] += 1
                elif topic.startswith("deadletter."):
                    report.dead_letters[rec["stage"]] += 1
            if progress:
                progress(decided, len(fates))
            if decided == len(fates) and time.monotonic() - last_new >= settle:
                break
    finally:
        c.close()
    for p in published:
        seen = fates[(p.topic, p.partition, p.offset)]
        if not seen:
            report.missing.append((p.topic, p.partition, p.offset))
            continue
        final = next((o for o in reversed(seen) if o != "parked"), "parked")
        report.released_after_park += "parked" in seen and final != "parked"
        report.outcomes[final] += 1
        report.by_fault.setdefault(p.fault or "clean", Counter())[final] += 1
    report.seconds = time.monotonic() - started
    return report


def render(r: Report) -> str:
    """The report as text for a terminal."""
    w = max(len(o) for o in OUTCOMES)
    lines = [f"reconciliation: {r.published} records published", "", "outcome of every published record:"]
    for o in OUTCOMES:
        extra = f"  ({r.released_after_park} released after a gap filled)" if o == "applied" and \
            r.released_after_park else ""
        lines.append(f"  {o:<{w}}  {r.outcomes.get(o, 0):>6}{extra}")
    lines.append(f"  {'unaccounted':<{w}}  {r.unaccounted:>6}")
    lines += ["", "injected faults and what became of them:"]
    for fault, c in sorted(r.by_fault.items()):
        if fault != "clean":
            lines.append(f"  {fault:<16} {sum(c.values()):>5}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    lines += ["", "commands issued by type:"]
    lines += [f"  {t:<28} {n:>6}" for t, n in sorted(r.commands.items())] or ["  (none)"]
    if r.duplicate_command_ids:
        lines.append(f"  command ids seen twice (at-least-once redelivery): {r.duplicate_command_ids}")
    lines += ["", "exceptions by owner and reason (opened / resolved automatically):"]
    keys = sorted(set(r.exceptions_opened) | set(r.exceptions_resolved))
    lines += [f"  {o:<14} {reason:<26} {r.exceptions_opened.get((o, reason), 0):>5} / "
              f"{r.exceptions_resolved.get((o, reason), 0)}" for o, reason in keys] or ["  (none)"]
    lines += ["", "dead letters by stage: " + (", ".join(f"{k} {v}" for k, v in sorted(r.dead_letters.items()))
                                               or "none")]
    lines.append(f"unaccounted: {r.unaccounted}")
    return "\n".join(lines)
