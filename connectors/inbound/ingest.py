"""``concord ingest``: native feeds (files or stdin) → canonical change events on ``changes.<system>.<entity>``.

The work is split so the webhook server shares it: ``normalize`` (pure: split the bytes into native
records, map them, de-duplicate, turn bad input and re-read notices into dead-letter records) and
``Publisher.publish`` (produce and wait for the broker's acknowledgements). Dedupe keys are remembered
only once the broker acknowledged, so a failed publish is retried rather than dropped as a duplicate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concord.contracts import deadletter as dlb
from concord.contracts.codec import Codec
from concord.contracts.topics import CHANGES, INGEST_DEADLETTERS, INGEST_SOURCES, deadletter_topic
from concord.exceptions import ConfigError
from concord.runtime import metrics
from connectors.inbound import boundary, canonical, csv_import, debezium, hubspot, jobber, salesforce, stripe_events
from connectors.inbound import common as c
from connectors.inbound.debezium_mapping import load_config as load_debezium_config
from connectors.inbound.identity import DEFAULT_PATH, IdentityMap
from connectors.inbound.join_keys import load as load_join_keys

MAPPERS = {"salesforce": salesforce, "hubspot": hubspot, "stripe": stripe_events, "debezium": debezium,
           "jobber": jobber, "canonical": canonical}
assert set(MAPPERS) | {"csv"} == set(INGEST_SOURCES)

# Kafka's default largest message is about 1 MB (broker message.max.bytes 1048588, librdkafka 1000000); a canonical
# event carries its native record's bytes, so a native record over this limit is dead-lettered instead of published.
DEFAULT_MAX_RECORD_BYTES = boundary.Limits.record_bytes
# The longest error text and key a dead letter carries: an error may quote the bad value.
MAX_ERROR_CHARS = 2_000
MAX_KEY_BYTES = 512

# `concord ingest` exit statuses.
EXIT_OK, EXIT_BROKER, EXIT_UNREADABLE, EXIT_REJECTED = 0, 1, 2, 3


def max_record_bytes() -> int:
    """The largest native record Concord publishes (CONCORD_MAX_RECORD_BYTES, default 900 KB)."""
    return boundary.Limits.from_env().record_bytes


@dataclass
class DeadLetter:
    """A native record Concord could not turn into an event (stage normalize) or that needs a re-read (gap)."""

    key: bytes | None
    record: dict[str, Any]
    where: str = ""  # which input and item, for messages ("events.jsonl item 3 (line 3)")
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def message(self) -> str:
        rid = self.record["original_key"]
        record = f" record {rid.decode(errors='replace')}" if rid else ""
        return f"{self.where}{record}: {self.record['stage']} ({self.record['error_type']}): {self.record['error']}"


@dataclass
class Batch:
    """What one input (a file, a webhook body) normalized to."""

    source: str
    events: list[c.Mapped] = field(default_factory=list)
    deadletters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0
    skipped: int = 0
    dedupe_keys: list[str] = field(default_factory=list)
    unplanned: int = 0  # rejections of errors a mapper raised by accident, with a generic reason

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


def _parse_line(line: bytes, limits: boundary.Limits) -> Any:
    try:
        return boundary.loads(line, _for_size(limits, len(line)))
    except c.BadInput as exc:
        return exc


def _for_size(limits: boundary.Limits, size: int) -> boundary.Limits:
    """A record over the size limit is parsed only to name it in its dead letter: its strings may be long."""
    if size <= limits.record_bytes:
        return limits
    return dataclasses.replace(limits, string_chars=max(size, limits.string_chars),
                               array_items=max(size, limits.array_items))


def split_units(data: bytes, keep_arrays: bool = False) -> list[tuple[bytes, Any, int]]:
    """Like ``split_json``, with the line each item starts on (1-based); every item passed the input boundary."""
    if not data.strip():
        return [(data, c.BadInput("empty input: no records"), 1)]
    limits = boundary.Limits.from_env()
    try:
        text = boundary.text(data, "input")
        doc = boundary.loads(text, _for_size(limits, len(data)), split=not keep_arrays)
    except c.BadInput as exc:
        lines = [(n, ln) for n, ln in enumerate(data.splitlines(), 1) if ln.strip()]
        parsed = [(n, ln, _parse_line(ln, limits)) for n, ln in lines] if len(lines) > 1 else []
        if any(isinstance(p, dict | list) for _, _, p in parsed):
            return [(ln, p, n) for n, ln, p in parsed]  # JSON lines, some of them bad
        # one document that does not parse (truncated, not JSON, not UTF-8) or breaks a limit: one dead letter
        if isinstance(exc, boundary.NotJSON):
            exc = c.BadInput(f"not JSON (truncated or malformed): {str(exc).removeprefix('not JSON: ')}")
        return [(data, exc, 1)]
    if not isinstance(doc, list) or keep_arrays:
        return [(data, doc, 1)]
    dec = boundary.decoder(limits)
    items, i, line_no, counted = [], text.index("[") + 1, 1, 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        obj, end = dec.raw_decode(text, i)
        line_no += text.count("\n", counted, i)  # counted incrementally: a large array stays linear
        counted = i
        raw = text[i:end].encode()
        if len(raw) <= limits.record_bytes and len(data) > limits.record_bytes:
            try:  # the file was parsed with the limits of an oversized record; this item gets its own
                boundary.walk(obj, limits)
            except c.BadInput as exc:
                obj = exc
        items.append((raw, obj, line_no))
        i = end
    return items or [(data, c.BadInput("empty array: no records"), 1)]


def split_json(data: bytes, keep_arrays: bool = False) -> list[tuple[bytes, Any]]:
    """Native records with their own original bytes: one JSON document (an array's items) or JSON lines.

    An item that does not parse comes back as a ``BadInput`` in place of the record; so does a whole input
    that is neither (a truncated document, bytes that are not UTF-8), with all its bytes.
    """
    return [(raw, rec) for raw, rec, _ in split_units(data, keep_arrays)]


def _printable(value: Any, limit: int) -> str:
    """``value`` as text that always encodes (lone surrogates escaped), at most ``limit`` characters."""
    text = value if isinstance(value, str) else "" if value is None else repr(value)
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def dead_letter(source: str, raw: bytes, stage: str, error_type: str, error: str, key: Any, ctx: c.Context,
                where: str = "", limit: int | None = None) -> DeadLetter:
    """The one way ingest builds a dead letter: it always encodes and always fits under ``limit`` bytes.

    Built by the shared builder (concord.contracts.deadletter): bytes over the limit are cut, the record saying
    how many there were and their sha256 (also in the ``concord-original-size`` / ``-sha256`` headers); the
    error text is cut to MAX_ERROR_CHARS; a key that is not text, or not valid Unicode, is written printable.
    """
    limit = max_record_bytes() if limit is None else limit
    key_bytes = _printable(key, MAX_KEY_BYTES).encode()[:MAX_KEY_BYTES] if key not in (None, "") else None
    origin = dlb.Origin(f"ingest.{source}", -1, -1, key_bytes, raw)
    built = dlb.dead_letter(origin, stage, _printable(error_type, 100), _printable(error, MAX_ERROR_CHARS),
                            ctx.clock(), limit)
    return DeadLetter(built.key, built.record(), _printable(where, 1000), list(built.headers()))


def oversized(source: str, raw: bytes, limit: int, key: str | None, ctx: c.Context, where: str = "") -> DeadLetter:
    """The dead letter of a record over the size limit: as much of its bytes as fits, with their sha256 and size."""
    return dead_letter(source, raw, "normalize", "TooLarge",
                       f"record is {len(raw)} bytes, over the {limit}-byte limit (CONCORD_MAX_RECORD_BYTES)",
                       key, ctx, where, limit)


def map_unit(source: str, record: Any, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Map one native record (a whole CSV file for ``csv``); raises BadInput and nothing else."""
    try:
        if isinstance(record, c.BadInput):
            raise record
        if source == "csv":
            return csv_import.map_file(raw, ctx, record or "")
        return MAPPERS[source].map_record(record, raw, ctx)
    except c.BadInput:
        raise
    except Exception as exc:  # a shape the mapper did not expect: still the record's fault, never the run's
        raise c.unexpected(exc) from exc


def normalize(source: str, data: bytes, ctx: c.Context, dedupe: Deduper | None = None, name: str = "",
              units: list[tuple[bytes, Any]] | None = None) -> Batch:
    """Map ``data`` (or pre-split ``units``) from ``source`` to events and dead letters; drop duplicates.

    Nothing is dropped without a record: an item that does not parse, breaks the contract or is over
    ``max_record_bytes()`` becomes a dead letter (``DeadLetter.where`` names ``name`` and the item).
    """
    batch = Batch(source)
    limit = max_record_bytes()
    label = name or source
    outcomes: list[tuple[bytes, c.Outcome, str]] = []
    if source == "csv":
        split: list[tuple[bytes, Any, int]] = [(data, name, 0)]
    else:
        split = [(r, rec, 0) for r, rec in units] if units is not None else \
            split_units(data, keep_arrays=source == "hubspot")
    for n, (raw, rec, line_no) in enumerate(split, 1):
        where = label if len(split) == 1 and units is None and line_no <= 1 else \
            f"{label} item {n}" + (f" (line {line_no})" if line_no else "")
        if len(raw) > limit and source != "csv":  # a CSV file is split into rows, each checked below
            rid = rec.get("id") if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None
            batch.deadletters.append(oversized(source, raw, limit, rid, ctx, where))
            continue
        try:
            out = map_unit(source, rec, raw, ctx)
            if not (out.events or out.rereads or out.skipped or out.rejected):
                raise c.BadInput("no records in this input (an empty array or batch)")
            outcomes.append((raw, out, where))
        except c.BadInput as exc:
            batch.unplanned += exc.unexpected is not None
            batch.deadletters.append(dead_letter(source, exc.raw or raw, "normalize", "BadInput", str(exc),
                                                 exc.record_id, ctx, where, limit))
    seen_now: set[str] = set()

    def fresh(key: str) -> bool:
        if key in seen_now or (dedupe is not None and dedupe.seen(key)):
            batch.duplicates += 1
            return False
        seen_now.add(key)
        batch.dedupe_keys.append(key)
        return True

    for raw, out, where in outcomes:
        batch.skipped += out.skipped
        for rej in out.rejected:
            batch.unplanned += rej.unexpected is not None
            batch.deadletters.append(dead_letter(source, rej.raw or raw, "normalize", "BadInput", str(rej),
                                                 rej.record_id, ctx, where, limit))
        for rr in out.rereads:
            if fresh(rr.dedupe_key):
                msg = (f"needs re-read: {rr.source} {rr.change_type} for {rr.entity_type} "
                       f"{', '.join(rr.entity_ids)}: {rr.reason}")
                batch.deadletters.append(dead_letter(source, rr.raw or raw, "gap", "NeedsReread", msg,
                                                     rr.entity_ids[0] if rr.entity_ids else None, ctx, where, limit))
        for m in out.events:
            payload = m.event.get("source_payload") or b""
            if len(payload) > limit:  # e.g. a CSV row; JSON records were checked whole above
                batch.deadletters.append(oversized(source, payload, limit, m.event["entity_id"], ctx, where))
            elif fresh(m.dedupe_key):
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
        from concord.runtime.producer import new_producer

        self.timeout_s = timeout_s
        self.codec = codec or Codec()
        self.producer = new_producer(bootstrap, **{"linger.ms": int(os.environ.get("CONCORD_PRODUCER_LINGER_MS", "5")),
                                                   "message.timeout.ms": int(timeout_s * 1000)})

    def publish(self, batch: Batch) -> list[tuple[str, int, int]]:
        """Produce every event and dead letter of ``batch``; raise PublishError unless all were acknowledged.

        Returns where each landed, ``(topic, partition, offset)``: the events in order, then the dead letters.
        """
        from confluent_kafka import KafkaException

        errors: list[str] = []
        records: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []
        for m in batch.events:
            headers = [("concord-trace-id", m.event["trace_id"].encode()), ("concord-source", batch.source.encode())]
            if m.candidates:
                headers.append(("concord-customer-candidates", json.dumps(m.candidates).encode()))
            records.append((m.topic, m.event["entity_id"].encode(),
                            self.codec.encode("change_event", m.event, m.topic), headers))
        for d in batch.deadletters:
            topic = deadletter_topic(d.record["original_topic"])
            records.append((topic, d.key or b"", self.codec.encode("dead_letter", d.record, topic), d.headers))
        landed: list[tuple[str, int, int] | None] = [None] * len(records)

        def done(i: int) -> Any:
            def cb(err: Any, msg: Any) -> None:
                if err is not None:
                    errors.append(f"{msg.topic()}: {err}")
                else:
                    landed[i] = (msg.topic(), msg.partition(), msg.offset())
            return cb

        for i, (topic, key, value, headers) in enumerate(records):
            while True:
                try:
                    self.producer.produce(topic, key=key, value=value, headers=headers, on_delivery=done(i))
                    break
                except BufferError:
                    self.producer.poll(0.1)
                except KafkaException as exc:  # e.g. larger than the producer's message.max.bytes
                    errors.append(f"{topic}: {exc}")
                    break
            self.producer.poll(0)
        remaining = self.producer.flush(self.timeout_s + 5)
        acked = [p for p in landed if p is not None]
        if remaining or errors or len(acked) < len(records):
            raise PublishError(f"{len(records) - len(acked)} of {len(records)} records not acknowledged"
                               + (f": {errors[0]}" if errors else ""))
        return acked

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


def _say_deadletters(b: Batch, published: bool) -> None:
    topic = deadletter_topic(f"ingest.{b.source}")
    for d in b.deadletters:
        kind = "error" if d.record["stage"] == "normalize" else "needs re-read"
        fate = f"dead-lettered to {topic}" if published else f"would be dead-lettered to {topic}"
        print(f"concord ingest: {kind}: {d.message} ({fate})", file=sys.stderr)


def _status(unreadable: int, rejected: int) -> int:
    return EXIT_UNREADABLE if unreadable else EXIT_REJECTED if rejected else EXIT_OK


def run(args: argparse.Namespace) -> int:
    """The ``concord ingest`` command.

    Exit status: 0 every record published (or a duplicate, or a re-read notice); 1 the broker did not acknowledge;
    2 a file could not be read (the others were still processed); 3 some items were rejected and dead-lettered
    (the rest were published).
    """
    identity = IdentityMap(args.identity)
    settings: dict[str, Any] = {"tables": json.loads(args.tables)} if args.tables else {}
    try:  # mappings are checked before any record is read, so a typo cannot dead-letter a whole feed
        if args.source == "debezium":
            settings["debezium"] = load_debezium_config(args.debezium_config)
        if args.source in ("stripe", "salesforce", "jobber"):
            settings["join_keys"] = load_join_keys()
    except ConfigError as exc:
        print(f"concord ingest: error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    ctx = c.Context(identity=identity, settings=settings)
    dedupe = Deduper(args.dedupe_file)
    batches = []
    unreadable = 0
    for path in args.files:
        try:
            data = _read(path)
        except OSError as exc:
            print(f"concord ingest: error: cannot read {path}: {exc}", file=sys.stderr)
            unreadable += 1
            continue
        batches.append(normalize(args.source, data, ctx, dedupe, name="stdin" if path == "-" else path))
    rejected = sum(b.rejected for b in batches)
    if args.dry_run:
        for b in batches:
            for m in b.events:
                doc = dict(m.event)
                if m.candidates:
                    doc["customer_candidates"] = m.candidates
                print(c.json_dumps(doc))
            _say_deadletters(b, False)
            count(b, published=False)
        print(f"concord ingest: {summary(batches, False)}", file=sys.stderr)
        return _status(unreadable, rejected)
    rc = _publish(args, batches, identity, dedupe)
    return rc if rc else _status(unreadable, rejected)


def _publish(args: argparse.Namespace, batches: list[Batch], identity: IdentityMap, dedupe: Deduper) -> int:
    import contextlib

    from concord.runtime.broker import ensure_topics, open_broker

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
                return EXIT_BROKER
        pub = Publisher(bootstrap, timeout_s=args.timeout)
        failed, acked = 0, []
        for b in batches:
            try:
                pub.publish(b)
            except PublishError as exc:
                failed += 1
                print(f"concord ingest: error: {exc}", file=sys.stderr)
                continue
            _say_deadletters(b, True)
            dedupe.remember(b.dedupe_keys)
            count(b)
            acked.append(b)
        identity.save()
        print(f"concord ingest: {summary(acked, True)}"
              + (f"; {failed} input(s) not acknowledged by the broker" if failed else ""), file=sys.stderr)
        return EXIT_BROKER if failed else EXIT_OK
    return EXIT_BROKER  # pragma: no cover - ExitStack does not swallow


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``concord ingest``."""
    p = sub.add_parser("ingest", help="normalize native feeds (files or stdin) and publish canonical change events",
                       description="Read native records (JSON, JSON lines, CSV; '-' for stdin), map them to canonical "
                       "change events and publish them to changes.<system>.<entity>; bad input goes to "
                       "deadletter.ingest.<source>. Prints published / duplicate / rejected to stderr, and each "
                       "rejected item with its file and position. Exit status: 0 all published; 1 the broker did not "
                       "acknowledge; 2 a file could not be read; 3 some items were rejected (dead-lettered). Records "
                       "over CONCORD_MAX_RECORD_BYTES (default 900000) are dead-lettered, not published.")
    p.add_argument("--source", required=True, choices=INGEST_SOURCES, help="the feed's format")
    p.add_argument("files", nargs="+", metavar="FILE", help="input files; '-' reads stdin")
    p.add_argument("--dry-run", action="store_true", help="print canonical events as JSON lines, publish nothing")
    p.add_argument("--dedupe-file", default=os.environ.get("CONCORD_DEDUPE_FILE"),
                   help="remember published record keys here across runs (default: this run only)")
    p.add_argument("--identity", default=os.environ.get("CONCORD_IDENTITY_FILE", DEFAULT_PATH),
                   help=f"identity cross-reference file (default {DEFAULT_PATH})")
    p.add_argument("--tables", help='Debezium table → entity map as JSON, e.g. \'{"work_orders": "job"}\'')
    p.add_argument("--debezium-config", metavar="FILE",
                   help="Debezium table / column mapping (default $CONCORD_DEBEZIUM_CONFIG, else "
                   "connectors/config/debezium.yaml); checked at start, errors name file:line")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the broker (default 30)")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics")
    p.set_defaults(func=run)
