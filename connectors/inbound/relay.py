"""Native records on Kafka topics (Debezium's change events) → the connector → canonical events on ``changes.*``.

``python -m connectors.inbound.relay --source debezium --topics dispatch.public.jobs`` consumes what a Kafka
Connect source connector wrote (ops/connect: the Debezium PostgreSQL connector on the dispatch database) and runs
every record through the same steps as ``concord ingest``: ``normalize`` (the input boundary, the connector's
mapping, dead letters with the original bytes on ``deadletter.ingest.<source>``) and ``Publisher.publish``.

- Offsets are committed only after the broker acknowledged everything a poll's records produced: a relay killed
  in between commits nothing, and the next one maps those records again (the same event ids, so the worker's
  ordering guard drops what it already applied).
- A tombstone (Debezium's marker after a delete) is counted as skipped; a record that does not map is a dead
  letter, never a stop; a broker that does not acknowledge stops the relay without committing (exit 1).
- ``--metrics-port`` serves ``concord_ingested_total`` (and the rest of Concord's registry) for Prometheus.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from concord.contracts.topics import CHANGES, INGEST_DEADLETTERS, INGEST_SOURCES
from concord.exceptions import ConfigError
from connectors.inbound import common as c
from connectors.inbound.debezium_mapping import load_config as load_debezium_config
from connectors.inbound.identity import DEFAULT_PATH, IdentityMap
from connectors.inbound.ingest import Batch, Deduper, Publisher, PublishError, count, normalize, split_units
from connectors.inbound.join_keys import load as load_join_keys

EXIT_OK, EXIT_BROKER, EXIT_CONFIG = 0, 1, 2


def units_of(value: bytes | None) -> list[tuple[bytes, Any]]:
    """One Kafka record's value as the connector's input units: a tombstone is ``None``, else its JSON."""
    if value is None or value == b"":
        return [(b"", None)]
    return [(raw, rec) for raw, rec, _ in split_units(value)]


def map_records(source: str, records: list[tuple[str, int, int, bytes | None]], ctx: c.Context,
                dedupe: Deduper | None) -> Batch:
    """Normalize each ``(topic, partition, offset, value)`` into one batch; dead letters name the record."""
    batch = Batch(source)
    for topic, partition, offset, value in records:
        b = normalize(source, b"", ctx, dedupe, name=f"{topic}[{partition}]@{offset}", units=units_of(value))
        batch.events += b.events
        batch.deadletters += b.deadletters
        batch.duplicates += b.duplicates
        batch.skipped += b.skipped
        batch.dedupe_keys += b.dedupe_keys
        batch.unplanned += b.unplanned
    return batch


class Relay:
    """A consumer of native topics that publishes what the connector maps them to, committing after the acks."""

    def __init__(self, bootstrap: str, source: str, topics: list[str], group: str, ctx: c.Context,
                 identity: IdentityMap, timeout_s: float = 30.0, dedupe: Deduper | None = None) -> None:
        from confluent_kafka import Consumer

        self.source, self.topics, self.ctx, self.identity = source, topics, ctx, identity
        self.dedupe = dedupe or Deduper()
        self.publisher = Publisher(bootstrap, timeout_s=timeout_s)
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "isolation.level": "read_committed",
            # a source connector creates its topic on its first change: notice it within a second
            "topic.metadata.refresh.interval.ms": 1000, "session.timeout.ms": 10_000,
            "fetch.wait.max.ms": int(os.environ.get("CONCORD_FETCH_MAX_WAIT_MS", "100"))})
        self.consumer.subscribe(topics)
        self.running = True
        self.totals = {"records": 0, "published": 0, "rejected": 0, "skipped": 0, "duplicate": 0}

    def step(self, max_records: int = 500, timeout: float = 0.5) -> int:
        """Consume what is there, publish what it maps to, then commit; returns the records consumed."""
        from confluent_kafka import KafkaError

        msgs = self.consumer.consume(max_records, timeout)
        records = []
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue  # the connector has not created its topic yet
                raise PublishError(f"consuming {self.topics}: {err}")
            records.append((str(m.topic()), int(m.partition() or 0), int(m.offset() or 0), m.value()))
        if not records:
            return 0
        batch = map_records(self.source, records, self.ctx, self.dedupe)
        self.publisher.publish(batch)  # raises PublishError: nothing is committed then
        self.dedupe.remember(batch.dedupe_keys)
        count(batch)
        self.identity.save()
        self.consumer.commit(asynchronous=False)
        for k, n in (("records", len(records)), ("published", len(batch.events)), ("rejected", batch.rejected),
                     ("skipped", batch.skipped), ("duplicate", batch.duplicates)):
            self.totals[k] += n
        for d in batch.deadletters:
            print(f"concord relay: {d.message} (dead-lettered)", file=sys.stderr, flush=True)
        return len(records)

    def run(self) -> None:
        """Step until ``stop``."""
        while self.running:
            self.step()

    def stop(self) -> None:
        """Make ``run`` return after its current step."""
        self.running = False

    def close(self) -> None:
        """Leave the group and flush the producer."""
        self.consumer.close()
        self.publisher.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m connectors.inbound.relay``."""
    p = argparse.ArgumentParser(
        prog="python -m connectors.inbound.relay",
        description="Consume native records a Kafka Connect source connector writes (Debezium change events), map "
                    "them with Concord's connector and publish canonical events to changes.<system>.<entity>; bad "
                    "records go to deadletter.ingest.<source>. Offsets are committed after the broker acknowledged.")
    p.add_argument("--source", default="debezium", choices=[s for s in INGEST_SOURCES if s != "csv"],
                   help="the records' format (default debezium)")
    p.add_argument("--topics", default=os.environ.get("CONCORD_RELAY_TOPICS", "dispatch.public.jobs"),
                   help="comma-separated topics; ^regex allowed (default $CONCORD_RELAY_TOPICS or "
                        "dispatch.public.jobs)")
    p.add_argument("--group", default=None, help="consumer group (default concord-relay-<source>)")
    p.add_argument("--identity", default=os.environ.get("CONCORD_IDENTITY_FILE", DEFAULT_PATH),
                   help=f"identity cross-reference file (default {DEFAULT_PATH})")
    p.add_argument("--debezium-config", metavar="FILE", help="Debezium table / column mapping (default "
                   "$CONCORD_DEBEZIUM_CONFIG, else connectors/config/debezium.yaml)")
    p.add_argument("--metrics-host", default=os.environ.get("CONCORD_RELAY_METRICS_HOST", "127.0.0.1"))
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("CONCORD_RELAY_METRICS_PORT", "0")),
                   help="serve Prometheus metrics on this port (default $CONCORD_RELAY_METRICS_PORT; 0: none)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the broker (default 30)")
    args = p.parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        print("concord relay: error: set KAFKA_BOOTSTRAP_SERVERS (the broker the connector writes to)", file=sys.stderr)
        return EXIT_CONFIG
    settings: dict[str, Any] = {}
    try:
        if args.source == "debezium":
            settings["debezium"] = load_debezium_config(args.debezium_config)
        if args.source in ("stripe", "salesforce", "jobber"):
            settings["join_keys"] = load_join_keys()
    except ConfigError as exc:
        print(f"concord relay: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from concord.runtime.broker import ensure_topics

    try:
        ensure_topics(bootstrap, [*CHANGES, *INGEST_DEADLETTERS], timeout=args.timeout)
    except Exception as exc:
        print(f"concord relay: broker at {bootstrap} did not answer: {exc}", file=sys.stderr)
        return EXIT_BROKER
    if args.metrics_port:
        from prometheus_client import start_http_server

        from concord.runtime import metrics

        start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.REGISTRY)
    identity = IdentityMap(args.identity)
    topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    relay = Relay(bootstrap, args.source, topics, args.group or f"concord-relay-{args.source}",
                  c.Context(identity=identity, settings=settings), identity, timeout_s=args.timeout)
    signal.signal(signal.SIGTERM, lambda *_: relay.stop())
    print(f"concord relay: {args.source} records from {', '.join(topics)} to changes.* on {bootstrap}"
          + (f"; metrics on http://{args.metrics_host}:{args.metrics_port}/metrics" if args.metrics_port else ""),
          file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        relay.run()
    except PublishError as exc:
        print(f"concord relay: error: {exc}; nothing committed for these records", file=sys.stderr)
        return EXIT_BROKER
    except KeyboardInterrupt:
        pass
    finally:
        relay.close()
    t = relay.totals
    print(f"concord relay: {t['records']} records in {time.monotonic() - started:.0f}s: published {t['published']}, "
          f"rejected {t['rejected']}, skipped {t['skipped']}, duplicate {t['duplicate']}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
