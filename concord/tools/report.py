"""The reconciliation report: every published record's fate, counted from what came out of the broker."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.domain.flow_config import load_flow_config
from concord.domain.ids import stable_id
from concord.domain.status import ISSUED_INVOICE
from concord.exceptions import DecodeError
from concord.tools.simulator import Published

# The changes topics completed work and its invoices are read back from (on-time invoicing).
WORK_TOPICS = (topics.changes_topic("dispatch", "job"), topics.changes_topic("billing", "invoice"))
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
    followed: dict[str, dict[str, str]] = field(default_factory=dict)  # command id -> type, entity of a followed one
    adapter_outcomes: dict[str, str] = field(default_factory=dict)  # command id -> what its adapter last reported
    confirmed: set[str] = field(default_factory=set)  # command ids an audit decision says the target confirmed
    injected: dict[str, list[str]] = field(default_factory=dict)  # losses put in: kind -> command, job or invoice ids
    on_time_invoicing: float | None = None  # the worker's concord_invoices_total, on time / all (not on the broker)
    # Completed work and its invoices as read back from changes.dispatch.job and changes.billing.invoice:
    # job id -> completed_at, first issued_at of an invoice for it, and the faults its records were published with.
    work: dict[str, dict[str, Any]] = field(default_factory=dict)
    faulted_flows: dict[str, str] = field(default_factory=dict)  # job id -> the flow fault the simulator put in
    on_time_hours: float | None = None  # the policy the figures are held against (flows.yaml on_time_invoice_hours)

    @property
    def unaccounted(self) -> int:
        """Records not accounted for.

        Published records with no decision read back from audit.decisions, and native records the connectors
        gave no outcome (or whose dead letter was not read back).
        """
        return len(self.missing) + len(self.connector_missing)

    def by_owner(self) -> dict[str, dict[str, Any]]:
        """Per owner: opened, resolved automatically or by the owner, escalated, open; MTTR against the SLA.

        ``sla_s`` is the mean SLA of the exceptions the owner resolved (each one's own, from its record), as
        ``concord:kpi_sla_seconds_by_owner:24h`` weights it; ``within_sla`` whether the MTTR is at most that, and
        ``resolved_within_sla`` the share resolved before their own deadline.
        """
        out: dict[str, dict[str, Any]] = {}
        for life in self.lives.values():
            row = out.setdefault(life["owner"], {"opened": 0, "resolved_automatically": 0, "resolved_by_owner": 0,
                                                 "discarded": 0, "escalated": 0, "open": 0, "_seconds": [],
                                                 "_slas": [], "_in_time": 0})
            row["opened"] += 1
            row["escalated"] += life["escalated"]
            if life["state"] == "resolved":
                row["resolved_automatically" if life["by"] == "concord" else "resolved_by_owner"] += 1
                row["_seconds"].append((life["closed_at"] - life["opened_at"]) / 1000)
                if life.get("sla_deadline") is not None:
                    row["_slas"].append((life["sla_deadline"] - life["opened_at"]) / 1000)
                    row["_in_time"] += life["closed_at"] <= life["sla_deadline"]
            elif life["state"] == "discarded":
                row["discarded"] += 1
            else:
                row["open"] += 1
        for row in out.values():
            secs, slas, in_time = row.pop("_seconds"), row.pop("_slas"), row.pop("_in_time")
            row["mttr_s"] = round(sum(secs) / len(secs), 1) if secs else None
            row["sla_s"] = round(sum(slas) / len(slas), 1) if slas else None
            row["within_sla"] = None if row["mttr_s"] is None or row["sla_s"] is None else row["mttr_s"] <= row["sla_s"]
            row["resolved_within_sla"] = round(in_time / len(slas), 3) if slas else None
        return dict(sorted(out.items()))

    def invoicing(self) -> dict[str, Any]:
        """On-time invoicing of completed work, counted from the job and invoice records read back.

        Clean flows are completed jobs the simulator put no fault into: none of their job or invoice records was
        published duplicated, reordered, behind a gap or replaced, and the flow was not made late or unbilled.
        A clean job with no invoice counts as not on time.
        """
        if self.on_time_hours is None:
            return {"clean_flows": 0, "on_time": 0, "ratio": None, "left_out": {}, "late_clean": [],
                    "all_flows_ratio": None}
        limit = self.on_time_hours * 3_600_000
        done = {j: w for j, w in sorted(self.work.items()) if w.get("completed_at") is not None}
        left_out: Counter = Counter()
        clean = []
        for job_id, w in done.items():
            why = self.faulted_flows.get(job_id) or (sorted(w["faults"])[0] if w["faults"] else None)
            if why:
                left_out[why] += 1
            else:
                clean.append(job_id)
        def in_time(j: str) -> bool:
            return done[j].get("issued_at") is not None and done[j]["issued_at"] - done[j]["completed_at"] <= limit

        on_time = [j for j in clean if in_time(j)]
        invoiced = [j for j in done if done[j].get("issued_at") is not None]  # what the worker's counter judges
        return {"clean_flows": len(clean), "on_time": len(on_time),
                "all_flows_ratio": round(sum(map(in_time, invoiced)) / len(invoiced), 3) if invoiced else None,
                "ratio": round(len(on_time) / len(clean), 3) if clean else None, "left_out": dict(sorted(
                    left_out.items())), "late_clean": sorted(set(clean) - set(on_time))[:20]}

    def loss_found(self, kind: str, ref: str) -> bool:
        """Whether an injected loss of ``kind`` (a command, invoice or job id) was raised as an exception."""
        if kind == "amount_changed":
            return stable_id("amount_mismatch", "invoice", ref) in self.lives
        if kind == "unbilled_job":
            return stable_id("unbilled_work", "job", ref) in self.lives
        cmd = self.followed.get(ref)
        return cmd is not None and stable_id("command_unconfirmed", cmd["entity_type"], cmd["entity_id"],
                                             ref) in self.lives

    def closed_loop(self) -> dict[str, Any]:
        """issued, applied, confirmed and unconfirmed followed commands, and the injected losses found."""
        losses = [(k, r) for k, refs in sorted(self.injected.items()) if k != "unbilled_job" for r in refs]
        confirmed = len(self.confirmed & set(self.followed))
        return {"issued": len(self.followed),
                "applied": sum(self.adapter_outcomes.get(c) in ("applied", "duplicate") for c in self.followed),
                "confirmed": confirmed, "unconfirmed": len(self.followed) - confirmed,
                "injected_losses": len(losses), "injected_losses_found": sum(self.loss_found(k, r) for k, r in losses),
                "missed": [f"{k} {r}" for k, r in losses if not self.loss_found(k, r)][:20]}

    def unbilled(self) -> dict[str, Any]:
        """Injected unbilled jobs found, and the money open unbilled_work exceptions hold, by currency."""
        jobs = self.injected.get("unbilled_job", [])
        missed = [j for j in jobs if not self.loss_found("unbilled_job", j)]
        return {"injected": len(jobs), "found": len(jobs) - len(missed),
                # why each was not: no record read back says the job was completed (its source lost that event)
                "missed": {j: "completed, yet no unbilled_work was raised" if self.work.get(j, {}).get("completed_at")
                           else "no record of its completion came out of the broker" for j in missed},
                "amount_cents": self._open_money("unbilled_work"),
                "raised": sum(life["reason"] == "unbilled_work" for life in self.lives.values())}

    def kpi(self) -> dict[str, Any]:
        """The seed KPIs, counted from the records read back (on all flows, on-time invoicing is the worker's count)."""
        lives = list(self.lives.values())
        closed = [(life["closed_at"] - life["opened_at"]) / 1000 for life in lives if life["state"] == "resolved"]
        by_people = sum(1 for life in lives if life["state"] == "discarded" or (
            life["state"] == "resolved" and life["by"] != "concord"))
        replayed = [e for e in self.owner_resolved if self.lives.get(e, {}).get("state") == "resolved"]
        return {"exception_rate_per_1k": round(1000 * len(lives) / self.published, 1) if self.published else None,
                "mttr_s": round(sum(closed) / len(closed), 1) if closed else None, "manual_handoffs": by_people,
                "on_time_invoicing": self.invoicing()["ratio"], "on_time_invoicing_all_flows": self.on_time_invoicing,
                "replay_success": round(len(replayed) / len(self.owner_resolved), 3) if self.owner_resolved else None,
                "revenue_at_risk_cents": self._open_money(None)}

    def _open_money(self, reason: str | None) -> dict[str, int]:
        out: dict[str, int] = {}
        for life in self.lives.values():
            if life["state"] in ("resolved", "discarded") or (reason and life["reason"] != reason):
                continue
            if life.get("amount") is not None:
                cur = life.get("currency") or "unknown"
                out[cur] = out.get(cur, 0) + life["amount"]
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "summary": loop_lines(self), "closed_loop": self.closed_loop(), "unbilled_work": self.unbilled(),
            "kpi": self.kpi(), "on_time_invoicing": self.invoicing(),
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
    from concord.runtime.broker import read_ends

    ends = read_ends(bootstrap, end_offsets(bootstrap, names), quiet_s=0.5)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    # a cluster just started (or just failed over) may not yet have the group's coordinator: ask again a while
    settling = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
                KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.REQUEST_TIMED_OUT}
    deadline = time.monotonic() + 60
    try:
        c.assign([TopicPartition(t, p, o) for (t, p), o in ends.items()])
        while True:
            try:
                c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=False)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not (err.retriable() or err.code() in settling) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        c.close()


def start_deployment_at_end(bootstrap: str, app_id: str) -> topics.Deployment:
    """Create the deployment ``app_id``'s own topics and start its worker group at today's end of all it reads."""
    from concord.runtime.broker import ensure_topics

    names = topics.Deployment(app_id)
    ensure_topics(bootstrap, names.specs)
    start_group_at_end(bootstrap, app_id, list(names.worker_inputs))
    return names


def watched_topics(names: topics.Deployment, native: bool = False) -> list[str]:
    """What the report reads: decisions, commands, the deployment's exceptions, dead letters (and the connectors')."""
    return [topics.AUDIT.name, topics.COMMAND_OUTCOMES.name, *(t.name for t in topics.COMMANDS),
            *names.exception_queues, *WORK_TOPICS,
            *(t.name for t in topics.DEADLETTERS), *(t.name for t in topics.INGEST_DEADLETTERS if native)]


def collect(bootstrap: str, published: list[Published], since: dict[tuple[str, int], int], timeout: float = 120,
            settle: float = 5.0, progress: Callable[[int, int], None] | None = None,
            wait_for: set[str] | None = None, connector: Any = None, follow: Iterable[str] = (),
            until: Callable[[Report], bool] | None = None) -> Report:
    """Read outputs from ``since`` until every published record has a decision and nothing new came for ``settle`` s.

    ``wait_for``: exception ids that must also be seen closed before the count ends. ``connector``: what the
    inbound connectors made of native records (``concord.tools.native.Ingested``); each of its dead letters must be
    read back from ``deadletter.ingest.*`` (include those topics in ``since``) to count as accounted for.
    ``follow``: command types followed to confirmation; ``until``: a further condition on the report before it ends.
    """
    follow = frozenset(follow)
    started = time.monotonic()
    codec = Codec()
    fates: dict[tuple[str, int, int], list[str]] = {(p.topic, p.partition, p.offset): [] for p in published}
    # where each published record landed -> its fault (keyed as the consumer's messages say where they are)
    faults: dict[tuple[str, int | None, int | None], str | None] = {
        (p.topic, p.partition, p.offset): p.fault for p in published}
    report = Report(published=len(published), on_time_hours=load_flow_config().on_time_invoice_hours)
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
                topic = m.topic()
                if topic in WORK_TOPICS:
                    _work(report.work, codec, m, faults.get((topic, m.partition(), m.offset())))
                    continue
                _, rec = codec.decode(m.value())
                if topic == topics.COMMAND_OUTCOMES.name and "command_id" not in rec:
                    continue  # the timer's ticks share the topic: neither news nor an outcome
                last_new = time.monotonic()
                if topic == topics.AUDIT.name:
                    key = (rec["topic"], rec["partition"], rec["offset"])
                    if rec["outcome"] == "confirmed":
                        report.confirmed.update(rec["command_ids"])
                    elif rec["outcome"] == "reconciled":
                        pass  # a tick of the time-driven rules, not a published record's fate
                    elif key in fates:
                        decided += not fates[key]
                        fates[key].append(rec["outcome"])
                elif topic == topics.COMMAND_OUTCOMES.name:
                    report.adapter_outcomes[rec["command_id"]] = rec["outcome"]
                elif topic.startswith("commands."):
                    if rec["type"] in follow:
                        report.followed[rec["command_id"]] = {"type": rec["type"], "entity_type": rec["entity_type"],
                                                              "entity_id": rec["entity_id"]}
                    report.commands[rec["type"]] += 1
                    report.duplicate_command_ids += rec["command_id"] in seen_commands
                    seen_commands.add(rec["command_id"])
                elif topics.is_exception_queue(topic):
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
            if decided == len(fates) and closed and seen_dl >= expected_dl and time.monotonic() - last_new >= settle \
                    and (until is None or until(report)):
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


def _work(work: dict[str, dict[str, Any]], codec: Codec, m: Any, fault: str | None) -> None:
    """Fold one job or invoice record read back into the completed work it belongs to (as the status applies it)."""
    try:
        _, event = codec.decode(m.value())
    except DecodeError:
        return  # bad bytes: the decision read back counts it (dead_lettered)
    payload = event.get("payload")
    if not isinstance(payload, dict) or event.get("entity_type") not in ("job", "invoice"):
        return
    job_id = event["entity_id"] if event["entity_type"] == "job" else payload.get("job_id")
    if not job_id:
        return  # an invoice for a deal, not for work done
    w = work.setdefault(job_id, {"completed_at": None, "issued_at": None, "faults": set()})
    if fault:
        w["faults"].add(fault)
    if event["entity_type"] == "job":
        done = payload.get("completed_at") or (event["occurred_at"] if payload.get("status") == "completed" else None)
        w["completed_at"] = w["completed_at"] or done
    elif payload.get("status") in ISSUED_INVOICE or payload.get("issued_at"):
        issued = payload.get("issued_at") or event["occurred_at"]
        w["issued_at"] = issued if w["issued_at"] is None else min(w["issued_at"], issued)


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
                                             "closed_at": None, "updated_at": 0, "entity_id": rec["entity_id"]}
    if rec.get("amount_at_risk_cents") is not None:
        life["amount"], life["currency"] = rec["amount_at_risk_cents"], rec.get("currency")
    if rec["state"] != "escalated" and rec.get("sla_deadline") is not None:
        life["sla_deadline"] = rec["sla_deadline"]  # the owner's own deadline, not the backup's
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
              "escalated, still open, MTTR against the SLA of what was resolved:"]
    for owner, row in r.by_owner().items():
        mttr = f"{row['mttr_s']:.1f}s" if row["mttr_s"] is not None else "-"
        sla = f"{row['sla_s']:.1f}s" if row["sla_s"] is not None else "-"
        lines.append(f"  {owner:<14} opened {row['opened']:>4}  auto {row['resolved_automatically']:>4}  "
                     f"by owner {row['resolved_by_owner']:>3}  escalated {row['escalated']:>3}  "
                     f"open {row['open']:>4}  MTTR {mttr} / SLA {sla}")
    lines += ["", "dead letters by stage: " + (", ".join(f"{k} {v}" for k, v in sorted(r.dead_letters.items()))
                                               or "none")]
    lines += ["", *loop_lines(r)]
    lines.append(f"unaccounted: {r.unaccounted}")
    return "\n".join(lines)


def _usd(cents: dict[str, int]) -> str:
    return " + ".join(f"{cur} {v / 100:,.2f}" for cur, v in cents.items()) or "USD 0.00"


def _fig(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def loop_lines(r: Report) -> list[str]:
    """The closed loop, unbilled work and the seed KPIs, one line each."""
    loop, unbilled, kpi = r.closed_loop(), r.unbilled(), r.kpi()
    lines = [f"closed loop: issued={loop['issued']} applied={loop['applied']} confirmed={loop['confirmed']} "
             f"unconfirmed={loop['unconfirmed']} injected_losses_found={loop['injected_losses_found']}/"
             f"{loop['injected_losses']}",
             f"unbilled work: found={unbilled['found']}/{unbilled['injected']} amount={_usd(unbilled['amount_cents'])}",
             f"kpi: exception_rate_per_1k={_fig(kpi['exception_rate_per_1k'], 1)} mttr_s={_fig(kpi['mttr_s'], 1)} "
             f"manual_handoffs={kpi['manual_handoffs']} on_time_invoicing={_fig(kpi['on_time_invoicing'])} "
             f"replay_success={_fig(kpi['replay_success'])} revenue_at_risk={_usd(kpi['revenue_at_risk_cents'])}"]
    inv = r.invoicing()
    left = ", ".join(f"{k} {n}" for k, n in inv["left_out"].items()) or "none"
    lines.append(f"on-time invoicing: clean_flows={inv['clean_flows']} on_time={inv['on_time']} "
                 f"ratio={_fig(inv['ratio'])} (faulted flows left out: {left}; all invoiced flows: "
                 f"{_fig(inv['all_flows_ratio'])} read back, {_fig(r.on_time_invoicing)} as the worker counted)")
    owners = [f"{o} mttr_s={_fig(row['mttr_s'], 1)} sla_s={_fig(row['sla_s'], 1)} within="
              + ("n/a" if row["within_sla"] is None else "yes" if row["within_sla"] else "no")
              for o, row in r.by_owner().items() if row["mttr_s"] is not None]
    lines.append("mttr against sla: " + ("; ".join(owners) or "nothing resolved"))
    lines += [f"  missed: {m}" for m in loop["missed"]]
    lines += [f"  unbilled job not found: {j} ({why})" for j, why in unbilled["missed"].items()]
    lines += [f"  late clean flow: {j}" for j in inv["late_clean"]]
    return lines


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
             "fetched": "a gap notice the fetcher answered with the record from the vendor's API",
             "skipped": "tombstones and the like"}
    for o in ("published", "fetched", "duplicate", "rejected", "gap", "skipped"):
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
