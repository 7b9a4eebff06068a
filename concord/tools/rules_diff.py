"""``concord rules diff`` and ``concord rules apply``: what a configuration change would have decided, and its record.

``diff`` replays a recorded history (canonical events as JSON lines, or the changes topics since a time) through
the current and the proposed flow and routing configuration in process, and compares what each decided:
commands added, removed or changed by type; exceptions by reason and owner; owners' workload; revenue at risk.
``apply`` installs a proposed configuration and records who approved it, when, and that diff on
audit.config_changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.contracts.validate import validate_change
from concord.domain import flow_config
from concord.domain import routing as routing_mod
from concord.domain.flow_config import FlowConfig
from concord.domain.governance import config_change, config_digest
from concord.domain.reconcile import amount_at_risk
from concord.domain.routing import Routing, parse_duration
from concord.domain.yamlconf import load_model
from concord.exceptions import ConcordError, DecodeError, ValidationError
from concord.runtime.harness import InProcess
from connectors.inbound import canonical
from connectors.inbound import common as c

EXIT_OK, EXIT_TOO_MANY, EXIT_BAD_INPUT = 0, 1, 2
EXAMPLES = 3


class HistoryError(ConcordError):
    """A history that cannot be replayed: unreadable, or an event that breaks the contract."""


@dataclass
class Replay:
    """What one configuration decided over a history."""

    commands: dict[str, dict[str, Any]] = field(default_factory=dict)  # command_id -> command
    opened: dict[str, dict[str, Any]] = field(default_factory=dict)  # exception_id -> routed record when opened
    open_at_end: dict[str, dict[str, Any]] = field(default_factory=dict)  # exception_id -> latest record
    at_risk_cents: dict[str, int] = field(default_factory=dict)  # exception_id -> money it holds up
    events: int = 0


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Canonical change events, one JSON object a line (``concord ingest --dry-run`` writes them)."""
    ctx = c.Context(clock=lambda: 0)
    out = []
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise HistoryError(f"cannot read {path}: {exc.strerror or exc}") from None
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            out += [m.event for m in canonical.map_record(json.loads(raw), raw, ctx).events]
        except (ValueError, c.BadInput) as exc:
            raise HistoryError(f"{path} line {n}: {exc}") from None
    return out


def replay(events: Iterable[dict[str, Any]], cfg: FlowConfig, routing: Routing, now: int | None = None) -> Replay:
    """Run ``events`` through guard, status table and rules with this configuration, in process.

    ``now`` (default: the latest ``occurred_at``) is the clock the rules see; give it to stream a long history.
    """
    if now is None:
        events = list(events)
        now = max((e["occurred_at"] for e in events), default=0)
    harness = InProcess(cfg, routing, now=now)
    out = Replay()
    codec = harness.codec
    for e in events:
        harness.feed_event(e)
        for o in harness.out:  # keep what the diff compares, drop the rest as it comes (a month is millions)
            if o.topic.startswith("commands."):
                cmd = codec.decode(o.value)[1]
                out.commands[cmd["command_id"]] = cmd
            elif o.topic in harness.names.exception_queues:
                rec = codec.decode(o.value)[1]
                if rec["state"] == "open" and rec["exception_id"] not in out.opened:
                    out.opened[rec["exception_id"]] = rec
                if rec["state"] in ("resolved", "discarded"):
                    out.open_at_end.pop(rec["exception_id"], None)
                else:
                    out.open_at_end[rec["exception_id"]] = rec
        harness.out.clear()
    for eid, rec in out.open_at_end.items():
        key = (rec["customer_id"] or f"unknown:{rec['entity_type']}:{rec['entity_id']}").encode()
        st = harness.statuses.get(key)
        out.at_risk_cents[eid] = amount_at_risk(st, rec["entity_type"], rec["entity_id"]) if st else 0
    out.events = sum(v + 1 for v in harness.offsets.values())
    return out


def _amount(cmd: dict[str, Any]) -> int:
    try:
        return int(json.loads(cmd["payload"]).get("amount_cents") or 0)
    except (ValueError, AttributeError):
        return 0


def _group(items: list[dict[str, Any]], key: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for it in items:
        g = groups.setdefault("/".join(str(it[k]) for k in key), {"count": 0, "examples": [], "ids": []})
        g["count"] += 1
        g["ids"].append(it.get("command_id") or it.get("exception_id"))
        if len(g["examples"]) < EXAMPLES and it.get("trace_id") and it["trace_id"] not in g["examples"]:
            g["examples"].append(it["trace_id"])
    return dict(sorted(groups.items()))


def diff(old: Replay, new: Replay) -> dict[str, Any]:
    """What the proposed configuration decides differently from the current one."""
    added = [new.commands[k] for k in sorted(set(new.commands) - set(old.commands))]
    removed = [old.commands[k] for k in sorted(set(old.commands) - set(new.commands))]
    changed = [new.commands[k] for k in sorted(set(old.commands) & set(new.commands))
               if old.commands[k]["payload"] != new.commands[k]["payload"]]
    ex_added = [new.opened[k] for k in sorted(set(new.opened) - set(old.opened))]
    ex_removed = [old.opened[k] for k in sorted(set(old.opened) - set(new.opened))]
    ex_rerouted = [{**new.opened[k], "was": f"{old.opened[k]['owner']}/{old.opened[k]['severity']}"}
                   for k in sorted(set(old.opened) & set(new.opened))
                   if (old.opened[k]["owner"], old.opened[k]["severity"], old.opened[k]["sla_deadline"])
                   != (new.opened[k]["owner"], new.opened[k]["severity"], new.opened[k]["sla_deadline"])]

    def workload(r: Replay) -> dict[str, int]:
        return dict(Counter(x["owner"] for x in r.open_at_end.values()))

    owners = sorted(set(workload(old)) | set(workload(new)))
    by_reason_owner = sorted({(x["reason_code"], x["owner"]) for x in [*old.opened.values(), *new.opened.values()]})
    count = Counter((x["reason_code"], x["owner"]) for x in old.opened.values())
    count_new = Counter((x["reason_code"], x["owner"]) for x in new.opened.values())

    def invoiced(r: Replay) -> int:
        return sum(_amount(cmd) for cmd in r.commands.values() if cmd["type"] == "create_invoice")

    return {
        "commands": {"added": _group(added, ("type",)), "removed": _group(removed, ("type",)),
                     "changed": _group(changed, ("type",)), "before": len(old.commands), "after": len(new.commands)},
        "exceptions": {"added": _group(ex_added, ("reason_code", "owner")),
                       "removed": _group(ex_removed, ("reason_code", "owner")),
                       "rerouted": _group(ex_rerouted, ("reason_code", "was", "owner")),
                       "by_reason_owner": [{"reason": r, "owner": o, "before": count[(r, o)],
                                            "after": count_new[(r, o)]} for r, o in by_reason_owner
                                           if count[(r, o)] != count_new[(r, o)]]},
        "workload": {o: {"before": workload(old).get(o, 0), "after": workload(new).get(o, 0)} for o in owners},
        "revenue": {"at_risk_cents": {"before": sum(old.at_risk_cents.values()),
                                      "after": sum(new.at_risk_cents.values())},
                    "invoiced_cents": {"before": invoiced(old), "after": invoiced(new)}},
        "changes": len(added) + len(removed) + len(changed) + len(ex_added) + len(ex_removed) + len(ex_rerouted),
    }


def render(doc: dict[str, Any]) -> str:
    """The diff for people."""
    lines = [f"rules diff: {doc['changes']} decision(s) change over {doc['events']} events "
             f"(config {doc['digest_before']} -> {doc['digest_after']})"]
    for title, part, what in (("commands", doc["commands"], ("added", "removed", "changed")),
                              ("exceptions", doc["exceptions"], ("added", "removed", "rerouted"))):
        lines.append(f"{title}:" + ("" if any(part[w] for w in what) else " no change"))
        for w in what:
            for key, g in part[w].items():
                lines.append(f"  {w:<9} {key:<40} {g['count']:>6}   e.g. trace {', '.join(g['examples']) or '-'}")
    if doc["exceptions"]["by_reason_owner"]:
        lines.append("exceptions opened by reason and owner (before -> after):")
        lines += [f"  {r['reason']:<26} {r['owner']:<14} {r['before']:>6} -> {r['after']}"
                  for r in doc["exceptions"]["by_reason_owner"]]
    lines.append("owners' workload, open at the end (before -> after):")
    lines += [f"  {o:<14} {w['before']:>6} -> {w['after']}" for o, w in doc["workload"].items()] or ["  none"]
    risk, inv = doc["revenue"]["at_risk_cents"], doc["revenue"]["invoiced_cents"]
    lines.append(f"revenue at risk: {risk['before'] / 100:,.2f} -> {risk['after'] / 100:,.2f}; "
                 f"invoiced: {inv['before'] / 100:,.2f} -> {inv['after'] / 100:,.2f}")
    return "\n".join(lines)


def compare(events: list[dict[str, Any]], current: tuple[FlowConfig, Routing],
            proposed: tuple[FlowConfig, Routing]) -> dict[str, Any]:
    """Replay ``events`` through both configurations; the diff with the digests and the history's size."""
    doc = diff(replay(events, *current), replay(events, *proposed))
    return {"digest_before": config_digest(*current), "digest_after": config_digest(*proposed),
            "events": len(events), **doc}


def history_from_topics(bootstrap: str, since_ms: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every change event on the changes topics from ``since_ms`` (record time) to their current end."""
    from confluent_kafka import Consumer, TopicPartition

    codec = Codec()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"concord-rules-diff-{os.getpid()}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    got: list[tuple[int, dict[str, Any]]] = []
    try:
        meta = consumer.list_topics(timeout=timeout).topics
        parts = [TopicPartition(t.name, p, since_ms) for t in topics.CHANGES if t.name in meta
                 for p in meta[t.name].partitions]
        starts = consumer.offsets_for_times(parts, timeout=timeout) if parts else []
        todo: dict[tuple[str, int], int] = {}
        assign = []
        for tp in starts:
            _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout)
            if 0 <= tp.offset < high:
                todo[(tp.topic, tp.partition)] = high
                assign.append(tp)
        consumer.assign(assign)
        deadline = time.monotonic() + timeout
        while todo and time.monotonic() < deadline:
            for m in consumer.consume(500, 0.5):
                if m.error():
                    continue
                try:  # what the workers would take: the topic's own schema, the change-event contract
                    event = codec.decode_topic(m.topic(), m.value())[1]
                    validate_change(event, m.topic())
                    got.append((m.timestamp()[1], event))
                except (DecodeError, ValidationError):  # the workers dead-lettered these; a replay skips them too
                    pass
                if m.offset() + 1 >= todo.get((m.topic(), m.partition()), 0):
                    todo.pop((m.topic(), m.partition()), None)
        if todo:
            raise HistoryError(f"{len(todo)} partition(s) not read to their end within {timeout:.0f}s")
    finally:
        consumer.close()
    got.sort(key=lambda x: x[0])
    return [e for _, e in got]


def _configs(args: argparse.Namespace) -> tuple[tuple[FlowConfig, Routing], tuple[FlowConfig, Routing]]:
    # Read from disk every time (not the loaders' cache): apply may just have replaced the current files.
    def flows(path: str | None) -> FlowConfig:
        return load_model(Path(path or flow_config.DEFAULT_PATH), FlowConfig)

    def routes(path: str | None) -> Routing:
        return load_model(Path(path or routing_mod.DEFAULT_PATH), Routing)

    current = (flows(args.current_flows), routes(args.current_routing))
    proposed = (flows(args.flows) if args.flows else current[0], routes(args.routing) if args.routing else current[1])
    return current, proposed


def _events(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.history:
        return read_history(args.history)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        raise HistoryError("--from-topics reads the broker at KAFKA_BOOTSTRAP_SERVERS, which is not set")
    return history_from_topics(bootstrap, int(time.time() * 1000) - parse_duration(args.since) * 1000)


def run_diff(args: argparse.Namespace) -> int:
    """The ``concord rules diff`` command."""
    if not args.flows and not args.routing:
        print("concord rules diff: error: give --flows and/or --routing (the proposed configuration)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        current, proposed = _configs(args)
        doc = compare(_events(args), current, proposed)
    except (HistoryError, ConcordError, ValueError) as exc:
        print(f"concord rules diff: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(doc, indent=1, sort_keys=True) if args.json else render(doc))
    if args.max_changes is not None and doc["changes"] > args.max_changes:
        print(f"concord rules diff: {doc['changes']} changes exceed --max-changes {args.max_changes}", file=sys.stderr)
        return EXIT_TOO_MANY
    return EXIT_OK


def summary_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The diff without its id lists: what an audit record keeps."""
    def strip(groups: dict[str, Any]) -> dict[str, Any]:
        return {k: {"count": g["count"], "examples": g["examples"]} for k, g in groups.items()}

    return {**doc, "commands": {k: strip(v) if isinstance(v, dict) else v for k, v in doc["commands"].items()},
            "exceptions": {k: strip(v) if isinstance(v, dict) else v for k, v in doc["exceptions"].items()}}


def run_apply(args: argparse.Namespace) -> int:
    """The ``concord rules apply`` command."""
    from concord.runtime.broker import ensure_topics

    if not args.flows and not args.routing:
        print("concord rules apply: error: give --flows and/or --routing", file=sys.stderr)
        return EXIT_BAD_INPUT
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print("concord rules apply: error: the change is recorded on audit.config_changes at "
              "KAFKA_BOOTSTRAP_SERVERS, which is not set; nothing applied", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        current, proposed = _configs(args)
        events = read_history(args.history) if args.history else []
        doc = compare(events, current, proposed)
    except (HistoryError, ConcordError, ValueError) as exc:
        print(f"concord rules apply: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if doc["digest_before"] == doc["digest_after"]:
        print(f"concord rules apply: configuration {doc['digest_after']} is already in place; nothing recorded")
        return EXIT_OK
    installs = [(src, Path(dst)) for src, dst in ((args.flows, args.current_flows or flow_config.DEFAULT_PATH),
                                                  (args.routing, args.current_routing or routing_mod.DEFAULT_PATH))
                if src]
    record = config_change(before=doc["digest_before"], after=doc["digest_after"], approved_by=args.approved_by,
                           approved_at=int(time.time() * 1000), reason=args.reason or "",
                           summary=summary_of(doc),
                           files={str(d): hashlib.sha256(Path(s).read_bytes()).hexdigest() for s, d in installs})
    from concord.runtime.producer import new_producer

    ensure_topics(bootstrap, [topics.CONFIG_CHANGES])
    producer = new_producer(bootstrap)
    errors: list[str] = []
    producer.produce(topics.CONFIG_CHANGES.name, key=record["digest_after"].encode(),
                     value=Codec().encode("config_change", record, topics.CONFIG_CHANGES.name),
                     on_delivery=lambda err, msg: errors.append(str(err)) if err else None)
    if producer.flush(30) or errors:
        print(f"concord rules apply: error: the broker did not acknowledge the record ({errors}); nothing applied",
              file=sys.stderr)
        return EXIT_TOO_MANY
    for src, dst in installs:  # recorded first: a change is never live without its approval on record
        shutil.copyfile(src, dst)
    print(f"concord rules apply: {doc['digest_before']} -> {doc['digest_after']} approved by {record['approved_by']}, "
          f"recorded on {topics.CONFIG_CHANGES.name}; installed {', '.join(str(d) for _, d in installs)}. "
          "Restart the workers to run it.")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``concord rules diff`` and ``concord rules apply``."""
    p = sub.add_parser("rules", help="test a flow or routing change against history, and apply it with approval",
                       description="Replay recorded history through the current and a proposed configuration "
                       "in process (no worker), and apply a configuration with its approval on record.")
    rsub = p.add_subparsers(dest="rules_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--flows", help="the proposed flows.yaml")
        q.add_argument("--routing", help="the proposed routing.yaml")
        q.add_argument("--current-flows", default=os.environ.get("CONCORD_FLOWS"),
                       help="the current flows.yaml (default $CONCORD_FLOWS, else concord/config/flows.yaml)")
        q.add_argument("--current-routing", default=os.environ.get("CONCORD_ROUTING"),
                       help="the current routing.yaml (default $CONCORD_ROUTING, else concord/config/routing.yaml)")

    d = rsub.add_parser("diff", help="what a proposed configuration would have decided differently",
                        description="Print commands added, removed or changed by type, exceptions by reason and "
                        "owner, owners' workload and revenue at risk, with example trace ids. Exit status: 0 done; "
                        "1 the change exceeds --max-changes; 2 bad configuration or history.")
    common(d)
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--history", help="canonical change events, one JSON object a line")
    src.add_argument("--from-topics", action="store_true",
                     help="read the changes topics at KAFKA_BOOTSTRAP_SERVERS (from --since ago to their end)")
    d.add_argument("--since", default="30d", help="how far back --from-topics reads (90s, 30m, 4h, 30d; default 30d)")
    d.add_argument("--json", action="store_true", help="print the diff as JSON (with every changed id)")
    d.add_argument("--max-changes", type=int, help="exit 1 when more decisions than this change (a CI gate)")
    d.set_defaults(func=run_diff)
    a = rsub.add_parser("apply", help="install a configuration, recording who approved it on audit.config_changes",
                        description="Validate the proposed configuration, replay --history through it to summarize "
                        "the change, record approver, time and summary on audit.config_changes, then install the "
                        "files over the current ones. Exit status: 0 applied (or already in place); 1 the record "
                        "was not acknowledged (nothing installed); 2 bad input.")
    common(a)
    a.add_argument("--approved-by", required=True, help="who approved the change")
    a.add_argument("--reason", help="why the change is made")
    a.add_argument("--history", help="canonical change events to summarize the change with")
    a.set_defaults(func=run_apply)
