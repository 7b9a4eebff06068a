"""Reading what came out of the broker in tests: from recorded offsets, until a condition holds."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, Producer, TopicPartition

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.runtime.broker import ensure_topics
from concord.tools.report import end_offsets, start_deployment_at_end, start_group_at_end  # noqa: F401 - re-exported

CODEC = Codec()


@dataclass
class Got:
    """One record read back, decoded when it is Avro."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    record: dict | None


def read_until(bootstrap: str, since: dict[tuple[str, int], int], done: Callable[[list[Got]], bool],
               timeout: float = 90.0) -> list[Got]:
    """Read every record after ``since`` until ``done(records)`` is true; fail with what arrived otherwise."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    c.assign([TopicPartition(t, p, o) for (t, p), o in since.items()])
    got: list[Got] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error():
                    continue
                try:
                    record = CODEC.decode(m.value())[1]
                except Exception:
                    record = None
                got.append(Got(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                               dict(m.headers() or ()), record))
            if done(got):
                return got
    finally:
        c.close()
    summary = {}
    for g in got:
        summary[g.topic] = summary.get(g.topic, 0) + 1
    raise AssertionError(f"condition not met within {timeout:.0f}s; read {summary}")


def deployment(bootstrap: str, app_id: str) -> topics.Deployment:
    """The topics of the deployment ``app_id``, its own ones (internal topics and their dead letters) created."""
    names = topics.Deployment(app_id)
    ensure_topics(bootstrap, names.specs)
    return names


def committed(bootstrap: str, group: str, names: list[str]) -> dict[tuple[str, int], int]:
    """The offsets consumer group ``group`` committed on every partition of ``names`` (negative: none)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        md = c.list_topics(timeout=10)
        tps = [TopicPartition(t, p) for t in names for p in md.topics[t].partitions]
        return {(tp.topic, tp.partition): tp.offset for tp in c.committed(tps, timeout=10)}
    finally:
        c.close()


def produce(bootstrap: str, records: list[tuple[str, bytes, bytes]]) -> None:
    """Publish and wait for acknowledgements, with the Java-compatible partitioner faust uses."""
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 2})
    for t, k, v in records:
        p.produce(t, key=k, value=v)
    assert p.flush(30) == 0


def change(uid: str, entity: str, entity_id: str, seq: int, payload: dict | None, customer_id: str | None,
           op: str = "update", **kw) -> tuple[str, bytes, bytes]:
    """A canonical change event ready to produce."""
    system = topics.SOURCE_OF[entity]
    now = int(time.time() * 1000)
    rec = dict(event_id=f"{entity_id}-{seq}-{uid}", source_system=system, source_vendor="test",
               entity_type=entity, entity_id=entity_id, customer_id=customer_id, seq=seq,
               seq_contiguous=system != "billing", op=op, occurred_at=now, ingested_at=now,
               trace_id=f"trace-{entity_id}", payload=payload)
    rec.update(kw)
    return topics.changes_topic(system, entity), entity_id.encode(), CODEC.encode("change_event", rec)
