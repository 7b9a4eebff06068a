"""The reconciliation report: every published record's fate, counted from what came out of the broker."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.tools.simulator import Published

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
    lives: dict[str, dict[str, Any]] = field(default_factory=dict)  # exception id -> its life so far
    owner_resolved: list[str] = field(default_factory=list)  # ids the demo resolved as their owner would
    missing: list[tuple[str, int, int]] = field(default_factory=list)
    seconds: float = 0.0
    ingest_dead_letters: Counter = field(default_factory=Counter)  # (topic, stage) read from deadletter.ingest.*
    connector: Any = None  # concord.tools.native.Ingested when native records went through the connectors
    connector_missing: list[str] = field(default_factory=list)  # native records without a counted outcome

    @property
    def unaccounted(self) -> int:
        """Records not accounted for.

        Published records with no decision read back from audit.decisions, and native records the connectors
        gave no outcome (or whose dead letter was not read back).
        """
        return len(self.missing) + len(self.connector_missing)

    def by_owner(self) -> dict[str, dict[str, Any]]:
        """Per owner: opened, resolved automatically, resolved by the owner and replayed, escalated, open, MTTR."""
        out: dict[str, dict[str, Any]] = {}
        for life in self.lives.values():
            row = out.setdefault(life["owner"], {"opened": 0, "resolved_automatically": 0, "resolved_by_owner": 0,
                                                 "discarded": 0, "escalated": 0, "open": 0, "_seconds": []})
            row["opened"] += 1
            row["escalated"] += life["escalated"]
            if life["state"] == "resolved":
                row["resolved_automatically" if life["by"] == "concord" else "resolved_by_owner"] += 1
                row["_seconds"].append((life["closed_at"] - life["opened_at"]) / 1000)
            elif life["state"] == "discarded":
                row["discarded"] += 1
            else:
                row["open"] += 1
        for row in out.values():
            secs = row.pop("_seconds")
            row["mttr_s"] = round(sum(secs) / len(secs), 1) if secs else None
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "published": self.published, "outcomes": dict(self.outcomes), "unaccounted": self.unaccounted,
            "released_after_park": self.released_after_park,
            "by_fault": {k: dict(v) for k, v in sorted(self.by_fault.items())},
            "commands": dict(self.commands), "duplicate_command_ids": self.duplicate_command_ids,
            "exceptions_opened": {f"{o}/{r}": n for (o, r), n in sorted(self.exceptions_opened.items())},
            "exceptions_resolved": {f"{o}/{r}": n for (o, r), n in sorted(self.exceptions_resolved.items())},
            "dead_letters": dict(self.dead_letters), "by_owner": self.by_owner(),
            "resolved_by_demo_owners": len(self.owner_resolved), "missing": self.missing[:20],
            "seconds": round(self.seconds, 1),
            **({"connector": self.connector.to_dict(), "connector_missing": self.connector_missing[:20],
                "connector_dead_letters": {f"{t}/{s}": n for (t, s), n in sorted(self.ingest_dead_letters.items())}}
               if self.connector is not None else {}),
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


def start_group_at_end(bootstrap: str, group: str, names: list[str]) -> None:
    """Commit ``group``'s offsets at today's real end of ``names`` (past the embedded broker's early end)."""
    ends = end_offsets(bootstrap, names)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                  "fetch.wait.max.ms": 50})
    try:
        c.assign([TopicPartition(t, p, o) for (t, p), o in ends.items()])
        quiet_until = time.monotonic() + 0.5
        while time.monotonic() < quiet_until:
            m = c.poll(0.05)
            if m is not None and not m.error():
                ends[(m.topic(), m.partition())] = max(ends[(m.topic(), m.partition())], m.offset() + 1)
                quiet_until = time.monotonic() + 0.5
        c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=False)
    finally:
        c.close()


def watched_topics(native: bool = False) -> list[str]:
    """The topics the report reads: decisions, commands, exceptions and dead letters (and the connectors')."""
    return [topics.AUDIT.name, *(t.name for t in topics.COMMANDS), *(t.name for t in topics.EXCEPTIONS),
            *(t.name for t in topics.DEADLETTERS), *(t.name for t in topics.INGEST_DEADLETTERS if native)]


def collect(bootstrap: str, published: list[Published], since: dict[tuple[str, int], int], timeout: float = 120,
            settle: float = 5.0, progress: Callable[[int, int], None] | None = None,
            wait_for: set[str] | None = None, connector: Any = None) -> Report:
    """Read outputs from ``since`` until every published record has a decision and nothing new came for ``settle`` s.

    ``wait_for``: exception ids that must also be seen closed before the count ends. ``connector``: what the
    inbound connectors made of native records (``concord.tools.native.Ingested``); each of its dead letters must be
    read back from ``deadletter.ingest.*`` (include those topics in ``since``) to count as accounted for.
    """
    started = time.monotonic()
    codec = Codec()
    fates: dict[tuple[str, int, int], list[str]] = {(p.topic, p.partition, p.offset): [] for p in published}
    report = Report(published=len(published))
    seen_commands: set[str] = set()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"concord-report-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    c.assign([TopicPartition(t, p, o) for (t, p), o in since.items()])
    decided = 0
    expected_dl = set(connector.deadletters) if connector is not None else set()
    seen_dl: set[tuple[str, int, int]] = set()
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
                    _follow(report.lives, rec)
                elif topic.startswith("deadletter.ingest."):
                    report.ingest_dead_letters[(topic, rec["stage"])] += 1
                    if (topic, m.partition(), m.offset()) in expected_dl:
                        seen_dl.add((topic, m.partition(), m.offset()))
                elif topic.startswith("deadletter."):
                    report.dead_letters[rec["stage"]] += 1
            if progress:
                progress(decided, len(fates))
            closed = all(report.lives.get(e, {}).get("state") in ("resolved", "discarded") for e in wait_for or ())
            if decided == len(fates) and closed and seen_dl >= expected_dl and time.monotonic() - last_new >= settle:
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
    if connector is not None:
        report.connector = connector
        report.connector_missing = list(connector.missing) + [
            f"dead letter {t}[{p}]@{o} not read back" for t, p, o in sorted(expected_dl - seen_dl)]
    for life in report.lives.values():
        report.exceptions_opened[(life["owner"], life["reason"])] += 1
        if life["state"] == "resolved" and life["by"] == "concord":
            report.exceptions_resolved[(life["owner"], life["reason"])] += 1
    report.seconds = time.monotonic() - started
    return report


def _follow(lives: dict[str, dict[str, Any]], rec: dict[str, Any]) -> None:
    """Fold one exception record into the life of its exception (owner, escalations, how it closed).

    Queues are read in no particular order across topics, so an escalated copy (owner = the backup,
    backup_owner = the original owner) may come first.
    """
    owner = rec["backup_owner"] if rec["state"] == "escalated" and rec.get("backup_owner") else rec["owner"]
    life = lives.get(rec["exception_id"])
    if life is None or rec["opened_at"] > life["opened_at"]:
        life = lives[rec["exception_id"]] = {"owner": owner, "reason": rec["reason_code"], "state": "open",
                                             "opened_at": rec["opened_at"], "escalated": 0, "by": None,
                                             "closed_at": None, "updated_at": 0}
    if rec["opened_at"] < life["opened_at"]:
        return  # an earlier life of the same id, closed before it was raised again
    if rec["state"] == "escalated":
        life["escalated"] = 1
    closing = rec["state"] in ("resolved", "discarded")
    if closing or (life["state"] not in ("resolved", "discarded") and rec["updated_at"] >= life["updated_at"]):
        life["state"], life["updated_at"] = rec["state"], rec["updated_at"]
        if closing:
            life["by"] = (rec.get("resolution") or {}).get("by")
            life["closed_at"] = rec["updated_at"]


def render(r: Report) -> str:
    """The report as text for a terminal."""
    w = max(len(o) for o in OUTCOMES)
    lines = _render_connector(r) if r.connector is not None else []
    lines += [f"reconciliation: {r.published} records published"
              + (" (canonical events from the connectors)" if r.connector is not None else ""), "",
              "outcome of every published record:"]
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
    lines += ["", "exceptions per owner: opened, resolved automatically, resolved by the owner (and replayed), "
              "escalated, still open, MTTR:"]
    for owner, row in r.by_owner().items():
        mttr = f"{row['mttr_s']:.1f}s" if row["mttr_s"] is not None else "-"
        lines.append(f"  {owner:<14} opened {row['opened']:>4}  auto {row['resolved_automatically']:>4}  "
                     f"by owner {row['resolved_by_owner']:>3}  escalated {row['escalated']:>3}  "
                     f"open {row['open']:>4}  MTTR {mttr}")
    lines += ["", "dead letters by stage: " + (", ".join(f"{k} {v}" for k, v in sorted(r.dead_letters.items()))
                                               or "none")]
    lines.append(f"unaccounted: {r.unaccounted}")
    return "\n".join(lines)


def _render_connector(r: Report) -> list[str]:
    """The connectors' part of a native run: every native record's outcome, faults, dead letters read back."""
    ing = r.connector
    read_back = sum(r.ingest_dead_letters.values())
    lines = [f"native records delivered to the connectors: {ing.records} ("
             + ", ".join(f"{s} {n}" for s, n in sorted(ing.by_source.items())) + ")",
             "", "connector outcome of every native record:"]
    notes = {"published": f"-> {len(ing.published)} canonical events, counted below",
             "duplicate": "dropped by the connector's dedupe",
             "rejected": "dead-lettered with the original bytes", "gap": "no field data: dead-lettered as gap",
             "skipped": "tombstones and the like"}
    for o in ("published", "duplicate", "rejected", "gap", "skipped"):
        lines.append(f"  {o:<13} {ing.outcomes.get(o, 0):>6}  ({notes[o]})")
    lines.append(f"  {'unaccounted':<13} {len(r.connector_missing):>6}")
    lines += ["", "native faults and what the connectors did with them:"]
    for fault, c in sorted(ing.by_fault.items()):
        if fault != "clean":
            lines.append(f"  {fault:<16} {sum(c.values()):>5}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    lines += ["", f"connector dead letters read back ({read_back}): "
              + (", ".join(f"{t} {s} {n}" for (t, s), n in sorted(r.ingest_dead_letters.items())) or "none")]
    lines += [f"  e.g. {e}" for e in ing.errors[:3]]
    return lines + [""]
