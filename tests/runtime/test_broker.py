"""The broker contract, run against whichever broker the session has."""

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.exceptions import TopicMismatch
from concord.runtime.broker import ensure_topics

pytestmark = pytest.mark.broker


def test_every_declared_topic_exists_with_its_partitions(broker):
    md = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=10)
    for spec in topics.ALL:
        assert len(md.topics[spec.name].partitions) == spec.partitions, spec.name


def test_mismatched_partition_count_is_an_error(broker, uid):
    spec = topics.TopicSpec(f"test.mismatch.{uid}", "command", "k", "test", partitions=2)
    ensure_topics(broker.bootstrap_servers, [spec])
    with pytest.raises(TopicMismatch, match="has 2 partitions, declared 3"):
        ensure_topics(broker.bootstrap_servers, [topics.TopicSpec(spec.name, "command", "k", "t", partitions=3)])


def test_produce_and_consume_with_a_group(broker, uid):
    spec = topics.TopicSpec(f"test.roundtrip.{uid}", "change_event", "entity_id", "test")
    ensure_topics(broker.bootstrap_servers, [spec])
    codec = Codec()
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    sent = {}
    for i in range(40):
        rec = dict(event_id=f"{uid}-{i}", source_system="billing", entity_type="invoice", entity_id=f"inv-{i % 7}",
                   seq=i, op="update", occurred_at=1, ingested_at=2, trace_id=uid, payload=None)
        producer.produce(spec.name, key=rec["entity_id"].encode(), value=codec.encode("change_event", rec))
        sent[rec["event_id"]] = rec["entity_id"]
    assert producer.flush(10) == 0
    consumer = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": f"g-{uid}",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    consumer.subscribe([spec.name])
    got, by_key_partition = {}, {}
    deadline = time.monotonic() + 60
    while len(got) < len(sent) and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        _, rec = codec.decode(msg.value())
        got[rec["event_id"]] = rec["entity_id"]
        by_key_partition.setdefault(msg.key(), set()).add(msg.partition())
    consumer.commit(asynchronous=False)
    consumer.close()
    assert got == sent
    assert all(len(parts) == 1 for parts in by_key_partition.values()), "a key must stay on one partition"


def test_read_ends_finds_the_last_record_of_a_partitions_last_batch(broker, uid):
    # the table recovery and start_group_at_end rely on it: the embedded broker reports a shorter end
    from concord.runtime.broker import read_ends

    name = f"ends-{uid}"
    spec = topics.TopicSpec(name, "control", "k", "test", partitions=1)
    ensure_topics(broker.bootstrap_servers, [spec])
    p = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 200})
    for i in range(7):
        p.produce(name, key=b"k", value=str(i).encode())
    assert p.flush(20) == 0
    c = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": f"g-{uid}"})
    reported = c.get_watermark_offsets(TopicPartition(name, 0), timeout=10)[1]
    c.close()
    assert 1 <= reported <= 7
    assert read_ends(broker.bootstrap_servers, {(name, 0): reported}) == {(name, 0): 7}
