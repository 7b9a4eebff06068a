"""The Monday-morning checklist: what needs an owner's or an operator's attention this week, as data."""

from __future__ import annotations

import hashlib
import html
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from concord.owners.inbox import RUNBOOKS

OPEN_STATES = ("open", "acknowledged", "escalated")
WEEK_MS = 7 * 86_400_000
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
# The customer-to-cash flows and the reasons each can raise; owners come from the routing file.
FLOWS: dict[str, tuple[str, ...]] = {
    "closed-won deal → invoice": ("missing_billing_account", "missing_billing_terms", "unmapped_sku",
                                  "unknown_customer"),
    "closed-won deal → job → invoice": ("unlinked_job", "unmapped_sku", "unbilled_work"),
    "invoice → payment": ("amount_mismatch", "duplicate_invoice", "orphan_invoice", "payment_without_invoice",
                          "payment_failed"),
    "job cancelled after invoicing": ("invoiced_job_cancelled",),
    "ordering of change events": ("sequence_gap", "stale_update", "schema_invalid"),
    "commands to the owning systems": ("command_rejected", "command_unconfirmed"),
}


@dataclass
class Section:
    """One heading of the checklist: its lines, and whether any of them needs attention."""

    name: str
    attention: bool = False
    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checklist:
    """The whole checklist; ``needs_attention`` decides the command's exit status."""

    generated_at: int
    sections: list[Section]

    @property
    def needs_attention(self) -> bool:
        """Whether any section needs someone to act."""
        return any(s.attention for s in self.sections)

    def to_dict(self) -> dict[str, Any]:
        """The checklist as JSON-ready data."""
        return {"generated_at": self.generated_at, "needs_attention": self.needs_attention,
                "sections": [asdict(s) for s in self.sections]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checklist:
        """A checklist back from to_dict()'s JSON."""
        return cls(data["generated_at"], [Section(**s) for s in data["sections"]])


@dataclass(frozen=True)
class Canary:
    """The canary as the worker saw it: whether it runs, its counts, and its last run (ms, outcome)."""

    enabled: bool
    succeeded: float = 0
    failed: float = 0
    last_at: int | None = None
    last_outcome: str | None = None


def build(routing: Any, records: Iterable[dict[str, Any]], canary: Canary, deadletters: dict[str, int] | None,
          now: int, runbooks: Path = RUNBOOKS, config_dir: Path = CONFIG_DIR,
          config_error: str | None = None) -> Checklist:
    """The checklist from the routing file, every exception record, the canary and last week's dead letters."""
    recs = list(records)
    return Checklist(now, [_flows(routing), _past_sla(recs, now), _canary(canary, now),
                           _deadletters(deadletters), _rules(routing, runbooks, config_dir, now, config_error),
                           _runbooks(recs, now, runbooks)])


def _flows(routing: Any) -> Section:
    s = Section("Flows and their owners")
    if routing is None:
        s.lines.append("unknown: the routing file does not load (see the rule-change checks)")
        s.attention = True
        return s
    for flow, reasons in FLOWS.items():
        owners = sorted({routing.route_of({"reason_code": r, "source_system": None}).owner for r in reasons})
        s.lines.append(f"{flow}: {', '.join(owners)}")
        s.data[flow] = {"owners": owners, "reasons": list(reasons)}
    return s


def _past_sla(recs: list[dict[str, Any]], now: int) -> Section:
    s = Section("Exceptions past SLA, per owner")
    late: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        if r["state"] in OPEN_STATES and r["sla_deadline"] < now:
            late.setdefault(r["owner"], []).append(r)
    for owner in sorted(late):
        oldest = min(late[owner], key=lambda r: r["sla_deadline"])
        by_reason: dict[str, int] = {}
        for r in late[owner]:
            by_reason[r["reason_code"]] = by_reason.get(r["reason_code"], 0) + 1
        s.lines.append(f"{owner}: {len(late[owner])} past SLA (oldest {_ago(now - oldest['sla_deadline'])} over, "
                       f"{oldest['reason_code']}); " + ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())))
        s.data[owner] = {"count": len(late[owner]), "by_reason": by_reason}
    s.attention = bool(late)
    if not late:
        s.lines.append("none: every open exception is within its SLA")
    return s


def _canary(c: Canary, now: int) -> Section:
    s = Section("Canary", data=asdict(c))
    if not c.enabled:
        s.lines.append("the canary is off on this worker (CONCORD_CANARY_INTERVAL_S=0)")
        s.attention = True
    elif c.last_at is None:
        s.lines.append("no canary run has finished yet")
        s.attention = True
    else:
        s.lines.append(f"last run {_ago(now - c.last_at)} ago: {c.last_outcome}; "
                       f"{c.succeeded:.0f} succeeded, {c.failed:.0f} failed since the worker started")
        s.attention = c.last_outcome != "succeeded"
    return s


def _deadletters(counts: dict[str, int] | None) -> Section:
    s = Section("Dead letters since last week, by reason")
    if counts is None:
        s.lines.append("not read: the dead-letter topics could not be read")
        s.attention = True
        return s
    s.data = dict(counts)
    for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        s.lines.append(f"{reason}: {n}")
    if not counts:
        s.lines.append("none")
    s.attention = bool(counts)
    return s


def _rules(routing: Any, runbooks: Path, config_dir: Path, now: int, config_error: str | None) -> Section:
    s = Section("Rule-change checks")
    problems = [config_error] if config_error else []
    if routing is not None:
        from concord.contracts.topics import OWNERS

        for reason, route in sorted(routing.reasons.items()):
            if not (runbooks / f"{reason}.md").is_file():
                problems.append(f"{reason} is routed to {route.owner} but has no runbook ({runbooks.name}/{reason}.md)")
            for who in (route.owner, route.backup):
                if who and who not in OWNERS:
                    problems.append(f"{reason}: {who} is not an exception queue")
        raised = {r for reasons in FLOWS.values() for r in reasons}
        for reason in sorted(raised - set(routing.reasons)):  # allowed (the default route takes it), but worth a look
            s.lines.append(f"note: {reason} has no route of its own; it goes to {routing.default.owner}")
    for name in ("flows.yaml", "routing.yaml", "links.yaml"):
        path = config_dir / name
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            changed = _changed_at(path)
        except OSError as exc:
            problems.append(f"{name}: {exc.strerror}")
            continue
        recent = " (changed this week: review its decisions before Monday's deploy)" if now - changed < WEEK_MS else ""
        s.lines.append(f"{name}: {digest}, last changed {_ago(now - changed)} ago{recent}")
        s.data[name] = {"sha256": digest, "changed_at": changed}
    s.lines += [f"problem: {p}" for p in problems]
    s.data["problems"] = problems
    s.attention = bool(problems)
    return s


def _runbooks(recs: list[dict[str, Any]], now: int, runbooks: Path) -> Section:
    s = Section("Runbooks referenced by this week's resolutions")
    used: dict[str, int] = {}
    for r in recs:
        res = r.get("resolution") or {}
        at, by = res.get("at"), res.get("by") or "concord"
        if r["state"] in ("resolved", "discarded") and at and now - at < WEEK_MS and by != "concord":
            used[r["reason_code"]] = used.get(r["reason_code"], 0) + 1
    missing = [reason for reason in used if not (runbooks / f"{reason}.md").is_file()]
    for reason, n in sorted(used.items(), key=lambda kv: (-kv[1], kv[0])):
        where = f"ops/runbooks/reasons/{reason}.md" if reason not in missing else "NO RUNBOOK: write one"
        s.lines.append(f"{reason}: {n} closed · {where}")
    if not used:
        s.lines.append("no owner closed an exception this week")
    s.data = {"closed_by_reason": used, "missing": missing}
    s.attention = bool(missing)
    return s


def _changed_at(path: Path) -> int:
    """When a file last changed: its last commit where it is in a git checkout, else its modification time."""
    import subprocess

    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip() and not _uncommitted(path):
            return int(out.stdout.strip()) * 1000
    except (OSError, subprocess.SubprocessError, ValueError):
        pass  # no git here (an installed package): the file's own time will do
    return int(path.stat().st_mtime * 1000)


def _uncommitted(path: Path) -> bool:
    import subprocess

    out = subprocess.run(["git", "status", "--porcelain", "--", path.name], cwd=path.parent, capture_output=True,
                         text=True, timeout=10)
    return bool(out.stdout.strip())


def _ago(ms: float) -> str:
    minutes = max(0.0, ms / 60_000)
    if minutes < 90:
        return f"{minutes:.0f} min"
    if minutes < 48 * 60:
        return f"{minutes / 60:.1f} h"
    return f"{minutes / 1440:.1f} d"


def render_text(c: Checklist) -> str:
    """The checklist as plain text (what cron mails)."""
    out = [f"Concord checklist, {time.strftime('%Y-%m-%d %H:%M', time.gmtime(c.generated_at / 1000))}Z: "
           + ("needs attention" if c.needs_attention else "all clear")]
    for s in c.sections:
        out.append(f"\n[{'!!' if s.attention else 'ok'}] {s.name}")
        out += [f"    {line}" for line in s.lines]
    return "\n".join(out) + "\n"


def render_html(c: Checklist) -> str:
    """The checklist page's body."""
    parts = [f'<p id=verdict class="{"err" if c.needs_attention else "ok"}">'
             f'{"Needs attention" if c.needs_attention else "All clear"}.</p>'
             "<p class=hint>The same as <code>concord checklist</code> (exit status 1 when something needs attention)."
             "</p>"]
    for i, s in enumerate(c.sections):
        items = "".join(f"<li>{html.escape(line)}</li>" for line in s.lines)
        parts.append(f'<section class="check {"attention" if s.attention else "ok"}" id=check-{i}>'
                     f'<h2>{"⚠ " if s.attention else "✓ "}{html.escape(s.name)}</h2><ul>{items}</ul></section>')
    return "".join(parts)


def read_deadletters(bootstrap: str, since_ms: int, timeout: float = 20.0) -> dict[str, int]:
    """Count dead letters written since ``since_ms``, by stage and error type, reading every dead-letter topic."""
    from confluent_kafka import Consumer, TopicPartition

    from concord.contracts import topics
    from concord.contracts.codec import Codec
    from concord.exceptions import ConcordError

    names = [t.name for t in (*topics.DEADLETTERS, *topics.INGEST_DEADLETTERS, *topics.COMMAND_DEADLETTERS)]
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"concord-checklist-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    codec = Codec()
    counts: dict[str, int] = {}
    try:
        md = c.list_topics(timeout=10)
        tps = [TopicPartition(t, p, since_ms) for t in names if t in md.topics for p in md.topics[t].partitions]
        starts = c.offsets_for_times(tps, timeout=10) if tps else []
        ends = {(tp.topic, tp.partition): c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        todo = [tp for tp in starts if tp.offset >= 0 and tp.offset < ends[(tp.topic, tp.partition)]]
        if not todo:
            return {}
        c.assign(todo)
        left = {(tp.topic, tp.partition) for tp in todo}
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error():
                    continue
                where = (str(m.topic()), int(m.partition() or 0))
                if int(m.offset() or 0) + 1 >= ends[where]:
                    left.discard(where)
                try:
                    _, rec = codec.decode(m.value())
                    reason = f"{rec['stage']}: {rec['error_type']}"
                except (ConcordError, KeyError):
                    reason = "unreadable dead letter"
                counts[reason] = counts.get(reason, 0) + 1
        if left:
            raise ConcordError(f"dead letters not read to the end within {timeout:.0f}s: {sorted(left)}")
    finally:
        c.close()
    return counts
