"""`concord exceptions ...` (an owner's queue from the command line) and `concord trace TRACE_ID`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from concord.exceptions import ConcordError


class ApiError(ConcordError):
    """A worker refused a request; the message is the worker's reason."""


def call_api(base_url: str, token: str, method: str, path: str, query: Any = None) -> Any:
    """One request to a worker's owners' API; ApiError carries the worker's reason for a refusal."""
    url = f"{base_url.rstrip('/')}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"},
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            body = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            pass
        raise ApiError(f"{exc.code}: {body}") from None
    except OSError as exc:
        raise ConcordError(f"cannot reach a worker at {base_url}: {exc}") from None


def _call(args: argparse.Namespace, method: str, path: str, query: list[tuple[str, str]] | None = None) -> Any:
    token = args.token or os.environ.get("CONCORD_TOKEN")
    if not token:
        raise ConcordError("no team credential: pass --token or set CONCORD_TOKEN")
    return call_api(args.url, token, method, path, query)


def _list(args: argparse.Namespace) -> int:
    from concord.owners.desk import render_record

    query = [(k, v) for k, v in (("owner", args.owner), ("reason", args.reason), ("state", args.state)) if v]
    recs = _call(args, "GET", "/exceptions", query)
    if args.json:
        print(json.dumps(recs, indent=2, sort_keys=True))
    else:
        print("\n".join(render_record(r) for r in recs) or "no exceptions in this queue")
    return 0


def _show(args: argparse.Namespace) -> int:
    from concord.owners.desk import render_record

    rec = _call(args, "GET", f"/exceptions/{urllib.parse.quote(args.exception_id)}")
    print(json.dumps(rec, indent=2, sort_keys=True) if args.json else render_record(rec))
    return 0


def _act(args: argparse.Namespace, action: str) -> int:
    before = _call(args, "GET", f"/exceptions/{urllib.parse.quote(args.exception_id)}")
    query = [("customer", before["customer_key"])]
    query += [("set", s) for s in getattr(args, "set", None) or []]
    if getattr(args, "choose", None):
        query.append(("choose", str(args.choose)))
    note = getattr(args, "why", None) or getattr(args, "note", None) or ""
    query += [("note", note)] + ([("user", args.user)] if args.user else [])
    accepted = _call(args, "POST", f"/exceptions/{urllib.parse.quote(args.exception_id)}/{action}", query)
    print(f"concord exceptions: {action} accepted ({json.dumps(accepted.get('patch') or {})}); waiting for the "
          "replay", file=sys.stderr)
    want = {"acknowledge": ("acknowledged",), "resolve": ("resolved",), "discard": ("discarded",)}[action]
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        rec = _call(args, "GET", f"/exceptions/{urllib.parse.quote(args.exception_id)}")
        if rec["state"] in want:
            print(f"{args.exception_id}: {rec['state']} by {(rec.get('resolution') or {}).get('by', '?')}")
            return 0
        time.sleep(0.3)
    print(f"concord exceptions: not {want[0]} within {args.wait:.0f}s; see `concord exceptions show "
          f"{args.exception_id}`", file=sys.stderr)
    return 1


def _checklist(args: argparse.Namespace) -> int:
    from concord.owners.checklist import Checklist, render_text

    data = _call(args, "GET", "/checklist")
    checklist = Checklist.from_dict(data)
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else render_text(checklist), end="" if not args.json
          else "\n")
    return 1 if checklist.needs_attention else 0


def _trace(args: argparse.Namespace) -> int:
    import uuid

    from confluent_kafka import Consumer, TopicPartition

    from concord.contracts import topics
    from concord.contracts.codec import Codec

    bootstrap = args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        raise ConcordError("no broker: pass --bootstrap or set KAFKA_BOOTSTRAP_SERVERS")
    queues = topics.Deployment(args.app_id).exception_queues
    names = [topics.AUDIT.name, *(t.name for t in topics.COMMANDS), topics.COMMAND_OUTCOMES.name, *queues]
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"concord-trace-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    codec = Codec()
    rows: list[tuple[int, str]] = []
    try:
        md = c.list_topics(timeout=10)
        missing = [t for t in names if t not in md.topics]
        if missing:  # a wrong --app-id names exception queues no worker created
            raise ConcordError(f"no topic {', '.join(missing)} on {bootstrap}: is --app-id {args.app_id!r} the "
                               "worker's app id?")
        ends = {(t, p): c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                for t in names for p in md.topics[t].partitions}
        c.assign([TopicPartition(t, p, 0) for (t, p) in ends])
        left = {tp for tp, end in ends.items() if end > 0}
        seen = 0
        quiet_since = None
        # Past the reported ends, read on until a second passes with nothing new: some brokers (the embedded
        # one) report a partition's end as the start of its last batch + 1.
        while left or quiet_since is None or time.monotonic() - quiet_since < 1.0:
            batch = c.consume(1000, 0.5)
            if not left and not batch:
                quiet_since = quiet_since or time.monotonic()
            for m in batch:
                if m.error():
                    continue
                seen += 1
                if m.offset() + 1 >= ends[(m.topic(), m.partition())]:
                    left.discard((m.topic(), m.partition()))
                try:
                    _, rec = codec.decode(m.value())
                except ConcordError:
                    continue
                if rec.get("trace_id") == args.trace_id:
                    rows.append(_trace_row(m.topic(), rec, m.topic() in queues))
            print(f"trace: read {seen} records", file=sys.stderr)
    finally:
        c.close()
    if not rows:
        print(f"trace {args.trace_id}: nothing found", file=sys.stderr)
        return 1
    for _, line in sorted(rows):
        print(line)
    return 0


def _trace_row(topic: str, rec: dict[str, Any], exception: bool) -> tuple[int, str]:
    from concord.contracts import topics
    from concord.owners.desk import _ts

    if topic.startswith("commands."):
        return rec["issued_at"], f"{_ts(rec['issued_at'])}  command   {rec['type']} -> {rec['target_system']} " \
                                 f"{rec['entity_type']} {rec['entity_id']} ({rec['command_id'][:12]})"
    if topic == topics.COMMAND_OUTCOMES.name:  # what the adapter reported; a "confirmed" decision follows
        ref = f" -> {rec['target_ref']}" if rec["target_ref"] else ""
        said = f": {rec['detail']}" if rec["detail"] else ""
        return rec["reported_at"], f"{_ts(rec['reported_at'])}  outcome   {rec['type']} {rec['outcome']} by " \
                                   f"{rec['adapter'] or rec['target_system']}{ref} ({rec['command_id'][:12]}){said}"
    if exception:
        who = rec.get("resolution") or {}
        by = f" by {who['by']}" + (f" patch {json.dumps(who.get('patch'))}" if who.get("patch") else "") \
            if who else ""
        return rec["updated_at"], f"{_ts(rec['updated_at'])}  exception {rec['reason_code']} {rec['state']}" \
                                  f" ({rec['owner']}){by}: {rec['message']}"
    where = f"{rec['topic']}/{rec['partition']}/{rec['offset']}"
    actor = f" by {rec['actor']}" if rec.get("actor") else ""
    return rec["decided_at"], f"{_ts(rec['decided_at'])}  decision  {where} {rec['outcome']}{actor}: {rec['reason']}"


def register(sub: Any) -> None:
    """Add `concord exceptions` and `concord trace`."""
    p = sub.add_parser("exceptions", help="list, show, acknowledge, resolve or discard your team's exceptions",
                       description="Work an owner team's exception queue through a running worker's API. "
                       "The team is the one whose credential you pass (--token or CONCORD_TOKEN).")
    p.add_argument("--url", default=os.environ.get("CONCORD_URL", "http://127.0.0.1:6066"),
                   help="a worker's web address (default $CONCORD_URL or http://127.0.0.1:6066)")
    p.add_argument("--token", help="the team's credential (default $CONCORD_TOKEN)")
    p.add_argument("--user", help="your name, recorded with the resolution")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    ls = verbs.add_parser("list", help="your queue, soonest SLA first")
    ls.add_argument("--owner", help="must be your team (a team sees its own queue only)")
    ls.add_argument("--reason", help="only this reason code")
    ls.add_argument("--state", help="only this state (default: open, acknowledged, escalated)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)
    show = verbs.add_parser("show", help="one exception with its suggestions")
    show.add_argument("exception_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)
    for verb, helptext in (("ack", "acknowledge: you are on it"), ("resolve", "fix the data and replay"),
                           ("discard", "close without a replay")):
        v = verbs.add_parser(verb, help=helptext)
        v.add_argument("exception_id")
        v.add_argument("--wait", type=float, default=30, help="seconds to wait for the outcome (default 30)")
        if verb == "resolve":
            g = v.add_mutually_exclusive_group(required=True)
            g.add_argument("--set", action="append", metavar="FIELD=VALUE", help="a field of the record to patch")
            g.add_argument("--choose", type=int, metavar="N", help="apply suggestion N (see `show`)")
            v.add_argument("--note", default="", help="a note kept with the resolution")
        if verb == "discard":
            v.add_argument("--why", required=True, help="why it needs no replay")
        action = {"ack": "acknowledge", "resolve": "resolve", "discard": "discard"}[verb]
        v.set_defaults(func=lambda a, action=action: _act(a, action))
    c = sub.add_parser("checklist", help="the Monday-morning checklist from a running worker (exit 1: needs attention)",
                       description="Flows and their owners, exceptions past SLA per owner, the last canary run, dead "
                       "letters since last week by reason, rule-change checks and the runbooks this week's "
                       "resolutions used. Exit status 0 when all is clear, 1 when something needs attention (so cron "
                       "can mail it), 2 on a usage error.")
    c.add_argument("--url", default=os.environ.get("CONCORD_URL", "http://127.0.0.1:6066"),
                   help="a worker's web address (default $CONCORD_URL or http://127.0.0.1:6066)")
    c.add_argument("--token", help="any owner team's credential (default $CONCORD_TOKEN)")
    c.add_argument("--json", action="store_true", help="print the checklist as JSON")
    c.set_defaults(func=_checklist)
    t = sub.add_parser("trace", help="the chain of decisions, exceptions and commands for one trace id",
                       description="Read audit.decisions, commands.* and the deployment's exceptions.* and print "
                       "everything that carries TRACE_ID, in time order: from the source event to the final command.")
    t.add_argument("trace_id")
    t.add_argument("--bootstrap", help="Kafka bootstrap servers (default $KAFKA_BOOTSTRAP_SERVERS)")
    t.add_argument("--app-id", default=os.environ.get("CONCORD_APP_ID", "concord"),
                   help="the deployment whose exception queues to read (default $CONCORD_APP_ID or concord)")
    t.set_defaults(func=_trace)
