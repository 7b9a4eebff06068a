"""Apache Kafka as operators run it: a three-node KRaft cluster losing a leader, a durable broker restarting."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from kafka_helpers import CODEC, end_offsets, read_until, start_group_at_end

from concord.contracts import topics
from concord.runtime.broker import KafkaCluster, ensure_topics, free_port, start_kafka, wait_for_nodes
from concord.runtime.harness import InProcess
from concord.tools.demo import worker_process
from concord.tools.simulator import business

pytestmark = [pytest.mark.broker, pytest.mark.slow]
NOW = 1_767_225_600_000
FAULTS = {"missing_billing_account": 0.3, "unmapped_sku": 0.0, "missing_billing_terms": 0.0}
OUTPUTS = [t.name for t in (*topics.COMMANDS, *topics.EXCEPTIONS, *topics.DEADLETTERS, topics.AUDIT)]
CHANGES = [t.name for t in topics.CHANGES]
PROBE = topics.TopicSpec("test.kafka.probe", "command", "k", "test", partitions=3)


@pytest.fixture
def cluster(tmp_path) -> Iterator[KafkaCluster]:
    """Three KRaft nodes on loopback: replication factor 3, min.insync.replicas 2."""
    c = start_kafka(nodes=3, data_dir=tmp_path / "kafka")
    try:
        ensure_topics(c.bootstrap_servers, [*topics.ALL, PROBE])
        yield c
    finally:
        c.stop()


@pytest.fixture
def durable(tmp_path) -> Iterator[KafkaCluster]:
    """One Kafka node whose log lives in the test's directory, so a restart finds its records."""
    c = start_kafka(nodes=1, data_dir=tmp_path / "kafka")
    try:
        ensure_topics(c.bootstrap_servers)
        yield c
    finally:
        c.stop()


def _month(uid: str) -> list[dict]:
    return business(random.Random(23), 60, 30, NOW, prefix=f"{uid}-", faults=FAULTS)


class _Probe(threading.Thread):
    """Writes to every probe partition with acks=all and keeps when each write was acknowledged."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__(daemon=True)
        self.producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                                  "linger.ms": 0})
        self.acks: dict[int, list[float]] = {p: [] for p in range(PROBE.partitions)}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for p in range(PROBE.partitions):
                self.producer.produce(PROBE.name, b"probe", partition=p,
                                      on_delivery=lambda err, msg: err or self.acks[msg.partition()].append(
                                          time.monotonic()))
            self.producer.poll(0.05)
        self.producer.flush(60)

    def longest_gap(self, partition: int, after: float) -> float:
        """The longest wait between acknowledgements on ``partition`` from ``after`` on."""
        times = [after, *(t for t in self.acks[partition] if t >= after)]
        return max(b - a for a, b in zip(times, times[1:], strict=False)) if len(times) > 1 else float("inf")


def _flow(c: KafkaCluster, history: list[dict], at_third: Callable[[], None], at_two_thirds: Callable[[], None],
          ) -> list[str]:
    """Publish ``history`` paced over several seconds, idempotent with acks=all; call the hooks on the way."""
    producer = Producer({"bootstrap.servers": c.bootstrap_servers, "acks": "all", "enable.idempotence": True,
                         "partitioner": "murmur2_random", "linger.ms": 5})
    errors: list[str] = []
    step = 10
    for i in range(0, len(history), step):
        if i // step == len(history) // step // 3:
            at_third()
        if i // step == 2 * len(history) // step // 3:
            at_two_thirds()
        for e in history[i:i + step]:
            producer.produce(topics.changes_topic(e["source_system"], e["entity_type"]), key=e["entity_id"].encode(),
                             value=CODEC.encode("change_event", e),
                             on_delivery=lambda err, msg: err and errors.append(str(err)))
        producer.poll(0.25)
    left = producer.flush(120)
    return errors + ([f"{left} unacknowledged"] if left else [])


def _run_worker_through(c: KafkaCluster, tmp_path, uid: str, disrupt: Callable[[], tuple[Callable, Callable]]):
    """A worker on ``c`` while a simulated month flows and ``disrupt`` strikes; returns what to check."""
    history = _month(uid)
    expected = InProcess(now=NOW)
    for e in history:
        expected.feed_event(e)
    want = {x["command_id"] for x in expected.commands()}
    port, app_id = free_port(), f"concord-kafka-{uid}"
    env = {"CONCORD_DATA_DIR": str(tmp_path / "state"), "CONCORD_GAP_WAIT_S": "1", "CONCORD_CANARY_INTERVAL_S": "0"}
    start_group_at_end(c.bootstrap_servers, app_id, list(topics.WORKER_INPUTS))
    since_out, since_in = end_offsets(c.bootstrap_servers, OUTPUTS), end_offsets(c.bootstrap_servers, CHANGES)
    with worker_process(c.bootstrap_servers, port, app_id, tmp_path / "worker.log", env) as proc:
        _wait_until_consuming(c.bootstrap_servers, app_id)
        at_third, at_two_thirds = disrupt()
        errors = _flow(c, history, at_third, at_two_thirds)
        got = read_until(c.bootstrap_servers, since_out, lambda got: want <= {
            g.record["command_id"] for g in got if g.topic.startswith("commands.")}, timeout=240)
        alive = proc.poll() is None
    inputs = read_until(c.bootstrap_servers, since_in, lambda got: len(got) >= len(history), timeout=60)
    issued = {g.record["command_id"] for g in got if g.topic.startswith("commands.")
              and (g.record.get("customer_id") or "").startswith(f"{uid}-")}
    return {"want": want, "issued": issued, "errors": errors, "alive": alive,
            "input_ids": [g.record["event_id"] for g in inputs], "history": history}


def _wait_until_consuming(bootstrap: str, group: str, timeout: float = 120) -> None:
    # /healthz answers before the worker has joined its group; a broker lost then is a startup failure instead
    from confluent_kafka import ConsumerGroupState

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
        if desc.state == ConsumerGroupState.STABLE and any(m.assignment.topic_partitions for m in desc.members):
            return
        time.sleep(0.3)
    raise AssertionError(f"the worker's group {group} never became stable")


def _leader_of_busiest(c: KafkaCluster) -> tuple[tuple[str, int], int]:
    ends = end_offsets(c.bootstrap_servers, CHANGES)
    busiest = max(ends, key=lambda tp: ends[tp])
    md = AdminClient({"bootstrap.servers": c.bootstrap_servers}).list_topics(timeout=10)
    return busiest, md.topics[busiest[0]].partitions[busiest[1]].leader


def test_killing_the_busiest_partitions_leader_loses_and_duplicates_nothing(cluster, tmp_path, uid, figure):
    probe = _Probe(cluster.bootstrap_servers)
    probe.start()
    struck: dict = {}

    def disrupt():
        def kill():
            (tp, leader) = _leader_of_busiest(cluster)
            md = AdminClient({"bootstrap.servers": cluster.bootstrap_servers}).list_topics(timeout=10)
            led = [p for p, meta in md.topics[PROBE.name].partitions.items() if meta.leader == leader]
            struck.update(tp=tp, node=leader, probe=led, at=time.monotonic())
            cluster.node(leader).kill()

        def restart():
            cluster.node(struck["node"]).start()
            struck["restarted"] = time.monotonic()

        return kill, restart

    try:
        out = _run_worker_through(cluster, tmp_path, uid, disrupt)
        wait_for_nodes(cluster, timeout=120)  # the killed node came back and joined
    finally:
        probe.halt.set()
        probe.join(90)
    assert struck, "the leader was never killed"
    assert not out["errors"], out["errors"][:3]
    assert out["alive"], "the worker stopped when a broker died"
    assert out["issued"] == out["want"] and len(out["want"]) > 30
    assert sorted(out["input_ids"]) == sorted(e["event_id"] for e in out["history"]), "an input was lost or doubled"
    pause = max(probe.longest_gap(p, struck["at"] - 1) for p in struck["probe"]) if struck["probe"] else None
    assert pause is not None and pause < 60, f"writes to the killed leader's partitions never resumed: {pause}"
    figure(f"failover pause: {pause:.1f}s of acks=all writes to the partitions node {struck['node']} led "
           f"(SIGKILLed as leader of {struck['tp'][0]}[{struck['tp'][1]}], restarted "
           f"{struck['restarted'] - struck['at']:.1f}s later); {len(out['want'])} commands, none lost")


def test_a_durable_broker_restarted_mid_stream_loses_nothing(durable, tmp_path, uid, figure):
    node = durable.nodes[0]
    struck: dict = {}

    def disrupt():
        def kill():
            struck["at"] = time.monotonic()
            node.kill()

        def restart():
            node.start()
            wait_for_nodes(durable, timeout=120)
            struck["back"] = time.monotonic() - struck["at"]

        return kill, restart

    out = _run_worker_through(durable, tmp_path, uid, disrupt)
    assert "back" in struck, "the broker was never restarted"
    assert not out["errors"], out["errors"][:3]
    assert out["alive"], "the worker stopped while the broker was away"
    assert out["issued"] == out["want"] and len(out["want"]) > 30
    assert sorted(out["input_ids"]) == sorted(e["event_id"] for e in out["history"]), "an input was lost or doubled"
    figure(f"durable broker restart: down and back in {struck['back']:.1f}s mid-stream; "
           f"{len(out['want'])} commands, none lost")
