"""``concord ingest``: native feeds (files or stdin) → canonical change events on ``changes.<system>.<entity>``.

The work is split so the webhook server shares it: ``normalize`` (pure: split the bytes into native
records, map them, de-duplicate, turn bad input and re-read notices into dead-letter records) and
``Publisher.publish`` (produce and wait for the broker's acknowledgements). Dedupe keys are remembered
only once the broker acknowledged, so a failed publish is retried rather than dropped as a duplicate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors import canonical, csv_import, debezium, hubspot, jobber, salesforce, stripe_events
from connectors import common as c
from connectors.identity import DEFAULT_PATH, IdentityMap
from streams import metrics
from streams.serde import Codec
from streams.topics import CHANGES, INGEST_DEADLETTERS, INGEST_SOURCES, deadletter_topic

MAPPERS = {"salesforce": salesforce, "hubspot": hubspot, "stripe": stripe_events, "debezium": debezium,
           "jobber": jobber, "canonical": canonical}
assert set(MAPPERS) | {"csv"} == set(INGEST_SOURCES)


@dataclass
class DeadLetter:
    """A native record Concord could not turn into an event (stage normalize) or that needs a re-read (gap)."""

    key: bytes | None
    record: dict[str, Any]


@dataclass
class Batch:
    """What one input (a file, a webhook body) normalized to."""

    source: str
    events: list[c.Mapped] = field(default_factory=list)
    deadletters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0
    skipped: int = 0
    dedupe_keys: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return sum(1 for d in self.deadletters if d.record["stage"] == "normalize")

    @property
    def gaps(self) -> int:
        return sum(1 for d in self.deadletters if d.record["stage"] == "gap")


class Deduper:
    """Keys of native records already published; optionally kept in a file (one key a line)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.keys: set[str] = set()
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            self.keys = {k for k in self.path.read_text().splitlines() if k}

    def seen(self, key: str) -> bool:
        return key in self.keys

    def remember(self, keys: list[str]) -> None:
        new = [k for k in keys if k not in self.keys]
        with self._lock:
            self.keys.update(new)
            if self.path and new:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write("".join(k + "\n" for k in new))


def split_json(data: bytes, keep_arrays: bool = False) -> list[tuple[bytes, Any]]:
    """Native records with their own original bytes: one JSON document (an array's items) or JSON lines.

    An item that does not parse comes back as a ``BadInput`` in place of the record.
    """
    text = data.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        out: list[tuple[bytes, Any]] = []
        for ln in text.splitlines():
            if not ln.strip():
                continue
            try:
                out.append((ln.encode(), json.loads(ln)))
            except ValueError as exc:
                out.append((ln.encode(), c.BadInput(f"not JSON: {exc}")))
        return out
    if not isinstance(doc, list) or keep_arrays:
        return [(data, doc)]
    dec = json.JSONDecoder()
    items, i = [], text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        obj, end = dec.raw_decode(text, i)
        items.append((text[i:end].encode(), obj))
        i = end
    return items


def _deadletter(source: str, raw: bytes, stage: str, error_type: str, error: str, key: str | None,
                ctx: c.Context) -> DeadLetter:
    return DeadLetter(key.encode() if key else None, {
        "original_topic": f"ingest.{source}", "original_partition": -1, "original_offset": -1,
        "original_key": key.encode() if key else None, "original_value": raw, "stage": stage,
        "error_type": error_type, "error": error, "failed_at": ctx.clock()})


def normalize(source: str, data: bytes, ctx: c.Context, dedupe: Deduper | None = None, name: str = "",
              units: list[tuple[bytes, Any]] | None = None) -> Batch:
    """Map ``data`` (or pre-split ``units``) from ``source`` to events and dead letters; drop duplicates."""
    batch = Batch(source)
    outcomes: list[tuple[bytes, c.Outcome]] = []
    if source == "csv":
        try:
            outcomes.append((data, csv_import.map_file(data, ctx, name)))
        except (c.BadInput, UnicodeDecodeError) as exc:
            batch.deadletters.append(_deadletter(source, data, "normalize", type(exc).__name__, str(exc), name, ctx))
    else:
        mapper = MAPPERS[source]
        for raw, rec in units if units is not None else split_json(data, keep_arrays=source == "hubspot"):
            try:
                if isinstance(rec, c.BadInput):
                    raise rec
                outcomes.append((raw, mapper.map_record(rec, raw, ctx)))
            except c.BadInput as exc:
                batch.deadletters.append(_deadletter(source, exc.raw or raw, "normalize", "BadInput", str(exc),
                                                     exc.record_id, ctx))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # shapes the mapper did not expect
                batch.deadletters.append(_deadletter(source, raw, "normalize", type(exc).__name__,
                                                     f"unexpected record shape: {exc}", None, ctx))
    seen_now: set[str] = set()

    def fresh(key: str) -> bool:
        if key in seen_now or (dedupe is not None and dedupe.seen(key)):
            batch.duplicates += 1
            return False
        seen_now.add(key)
        batch.dedupe_keys.append(key)
        return True

    for raw, out in outcomes:
        batch.skipped += out.skipped
        for exc in out.rejected:
            batch.deadletters.append(_deadletter(source, exc.raw or raw, "normalize", "BadInput", str(exc),
                                                 exc.record_id, ctx))
        for rr in out.rereads:
            if fresh(rr.dedupe_key):
                msg = (f"needs re-read: {rr.source} {rr.change_type} for {rr.entity_type} "
                       f"{', '.join(rr.entity_ids)}: {rr.reason}")
                batch.deadletters.append(_deadletter(source, rr.raw or raw, "gap", "NeedsReread", msg,
                                                     rr.entity_ids[0] if rr.entity_ids else None, ctx))
        for m in out.events:
            if fresh(m.dedupe_key):
                batch.events.append(m)
    return batch


def count(batch: Batch, published: bool = True) -> None:
    """Add a batch's outcomes to concord_ingested_total."""
    for outcome, n in (("published", len(batch.events) if published else 0), ("duplicate", batch.duplicates),
                       ("rejected", batch.rejected), ("gap", batch.gaps), ("skipped", batch.skipped)):
        if n:
            metrics.INGESTED.labels(batch.source, outcome).inc(n)


class PublishError(Exception):
    """The broker did not acknowledge every record."""


class Publisher:
    """A Kafka producer (Java-compatible partitioner) that publishes a batch and waits for its acknowledgements."""

    def __init__(self, bootstrap: str, timeout_s: float = 30.0, codec: Codec | None = None) -> None:
        from confluent_kafka import Producer

        self.timeout_s = timeout_s
        self.codec = codec or Codec()
        self.producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "acks": "all",
                                  "linger.ms": int(os.environ.get("CONCORD_PRODUCER_LINGER_MS", "5")),
                                  "message.timeout.ms": int(timeout_s * 1000)})

    def publish(self, batch: Batch) -> None:
        """Produce every event and dead letter of ``batch``; raise PublishError unless all were acknowledged."""
        errors: list[str] = []
        acked = [0]

        def done(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(f"{msg.topic()}: {err}")
            else:
                acked[0] += 1

        sent = 0
        for m in batch.events:
            headers = [("concord-trace-id", m.event["trace_id"].encode()), ("concord-source", batch.source.encode())]
            if m.candidates:
                headers.append(("concord-customer-candidates", json.dumps(m.candidates).encode()))
            self.producer.produce(m.topic, key=m.event["entity_id"].encode(),
                                  value=self.codec.encode("change_event", m.event, m.topic), headers=headers,
                                  on_delivery=done)
            sent += 1
        for d in batch.deadletters:
            topic = deadletter_topic(d.record["original_topic"])
            self.producer.produce(topic, key=d.key or b"", value=self.codec.encode("dead_letter", d.record, topic),
                                  headers=[("concord-stage", d.record["stage"].encode()),
                                           ("concord-error-type", d.record["error_type"].encode()),
                                           ("concord-error", d.record["error"][:1000].encode())], on_delivery=done)
            sent += 1
        remaining = self.producer.flush(self.timeout_s + 5)
        if remaining or errors or acked[0] < sent:
            raise PublishError(f"{sent - acked[0]} of {sent} records not acknowledged"
                               + (f": {errors[0]}" if errors else ""))

    def close(self) -> None:
        self.producer.flush(5)


def summary(batches: list[Batch], published: bool) -> str:
    tot = {k: sum(getattr(b, k) if k != "events" else len(b.events) for b in batches)
           for k in ("events", "duplicates", "rejected", "gaps", "skipped")}
    verb = "published" if published else "mapped (dry run)"
    return (f"{verb} {tot['events']}, duplicate {tot['duplicates']}, rejected {tot['rejected']}, "
            f"needs re-read {tot['gaps']}, skipped {tot['skipped']}")


def _read(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def run(args: argparse.Namespace) -> int:
    """The ``concord ingest`` command."""
    identity = IdentityMap(args.identity)
    ctx = c.Context(identity=identity, settings={"tables": json.loads(args.tables)} if args.tables else {})
    dedupe = Deduper(args.dedupe_file)
    batches = []
    for path in args.files:
        try:
            data = _read(path)
        except OSError as exc:
            print(f"concord ingest: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        batches.append(normalize(args.source, data, ctx, dedupe, name=os.path.basename(path)))
    if args.dry_run:
        for b in batches:
            for m in b.events:
                doc = dict(m.event)
                if m.candidates:
                    doc["customer_candidates"] = m.candidates
                print(c.json_dumps(doc))
            for d in b.deadletters:
                print(f"concord ingest: {d.record['stage']}: {d.record['error']}", file=sys.stderr)
            count(b, published=False)
        print(f"concord ingest: {summary(batches, False)}", file=sys.stderr)
        return 0
    return _publish(args, batches, identity, dedupe)


def _publish(args: argparse.Namespace, batches: list[Batch], identity: IdentityMap, dedupe: Deduper) -> int:
    import contextlib

    from streams.broker import ensure_topics, open_broker

    with contextlib.ExitStack() as stack:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            broker = stack.enter_context(open_broker())
            bootstrap = broker.bootstrap_servers
            print(f"concord ingest: no KAFKA_BOOTSTRAP_SERVERS; using an embedded broker at {bootstrap} "
                  "(memory only: its data ends with this command)", file=sys.stderr)
        if not args.no_create_topics:
            try:
                ensure_topics(bootstrap, [*CHANGES, *INGEST_DEADLETTERS], timeout=args.timeout)
            except Exception as exc:
                print(f"concord ingest: broker at {bootstrap} did not answer: {exc}", file=sys.stderr)
                return 1
        pub = Publisher(bootstrap, timeout_s=args.timeout)
        failed, acked = 0, []
        for b in batches:
            for d in b.deadletters:
                print(f"concord ingest: {d.record['stage']}: {d.record['error']}", file=sys.stderr)
            try:
                pub.publish(b)
            except PublishError as exc:
                failed += 1
                print(f"concord ingest: error: {exc}", file=sys.stderr)
                continue
            dedupe.remember(b.dedupe_keys)
            count(b)
            acked.append(b)
        identity.save()
        print(f"concord ingest: {summary(acked, True)}"
              + (f"; {failed} input(s) not acknowledged by the broker" if failed else ""), file=sys.stderr)
        return 1 if failed else 0
    return 1  # pragma: no cover - ExitStack does not swallow


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``concord ingest``."""
    p = sub.add_parser("ingest", help="normalize native feeds (files or stdin) and publish canonical change events",
                       description="Read native records (JSON, JSON lines, CSV; '-' for stdin), map them to canonical "
                       "change events and publish them to changes.<system>.<entity>; bad input goes to "
                       "deadletter.ingest.<source>. Prints published / duplicate / rejected to stderr; exits 1 "
                       "if the broker did not acknowledge.")
    p.add_argument("--source", required=True, choices=INGEST_SOURCES, help="the feed's format")
    p.add_argument("files", nargs="+", metavar="FILE", help="input files; '-' reads stdin")
    p.add_argument("--dry-run", action="store_true", help="print canonical events as JSON lines, publish nothing")
    p.add_argument("--dedupe-file", default=os.environ.get("CONCORD_DEDUPE_FILE"),
                   help="remember published record keys here across runs (default: this run only)")
    p.add_argument("--identity", default=os.environ.get("CONCORD_IDENTITY_FILE", DEFAULT_PATH),
                   help=f"identity cross-reference file (default {DEFAULT_PATH})")
    p.add_argument("--tables", help='Debezium table → entity map as JSON, e.g. \'{"work_orders": "job"}\'')
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the broker (default 30)")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics")
    p.set_defaults(func=run)
