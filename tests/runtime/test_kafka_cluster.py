"""Apache Kafka as operators run it: a three-node KRaft cluster losing a leader, a durable broker restarting."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from http_helpers import post, serve
from kafka_helpers import CODEC, end_offsets, read_until, start_deployment_at_end, start_group_at_end

from concord.contracts import topics
from concord.runtime.broker import KafkaCluster, ensure_topics, free_port, start_kafka, wait_for_nodes
from concord.runtime.harness import InProcess
from concord.tools.chaos import start_sandbox_adapter
from concord.tools.demo import worker_process
from concord.tools.simulator import business
from connectors.inbound import fuzz
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import Deduper
from connectors.inbound.webhooks import make_app
from connectors.outbound.sandbox import applied_effects

pytestmark = [pytest.mark.broker, pytest.mark.slow]
NOW = 1_767_225_600_000
FAULTS = {"missing_billing_account": 0.3, "unmapped_sku": 0.0, "missing_billing_terms": 0.0}
OUTPUTS = [t.name for t in (*topics.COMMANDS, *topics.DEADLETTERS, topics.AUDIT,  # + the worker's queues
                            topics.COMMAND_OUTCOMES)]
CHANGES = [t.name for t in topics.CHANGES]
PROBE = topics.TopicSpec("test.kafka.probe", "command", "k", "test", partitions=3)
STRIPE_CUSTOMER = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "connectors"
                              / "stripe_customer_updated.json").read_text())


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


class _Webhooks(threading.Thread):
    """Stripe posting signed customer.updated webhooks to `concord webhooks` all along, retrying what is not 200.

    Stripe retries a delivery that was not answered 2xx; each event here is retried until it is (or 40 times).
    """

    def __init__(self, base: str, uid: str) -> None:
        super().__init__(daemon=True)
        self.base, self.uid = base, uid
        self.halt = threading.Event()
        self.answers: list[int] = []  # every answer, in order
        self.delivered: list[str] = []  # event ids answered 200
        self.retried: set[str] = set()  # event ids answered 200 only after an answer that was not
        self.given_up: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            evt = json.loads(json.dumps(STRIPE_CUSTOMER))
            evt["id"] = f"evt_{self.uid}_{n}"
            evt["data"]["object"]["id"] = f"cus_{self.uid}_{n}"
            evt["data"]["object"]["metadata"] = {"concord_customer_id": f"wh{self.uid}-{n}"}
            body = json.dumps(evt).encode()
            for _ in range(40):
                try:
                    status, _ = post(self.base + "/webhooks/stripe", body,
                                     fuzz.sign("stripe", body, "/webhooks/stripe", self.base))
                except OSError:  # no answer at all: the receiver is down, which it must never be
                    status = 0
                self.answers.append(status)
                if status == 200:
                    self.delivered.append(f"stripe:{evt['id']}")
                    break
                self.retried.add(f"stripe:{evt['id']}")
                time.sleep(0.5)
            else:
                self.given_up.append(evt["id"])
            time.sleep(0.5)


def _adapter(c: KafkaCluster, tmp_path, app_id: str) -> tuple[subprocess.Popen, Path]:
    """The sandbox adapter applying the worker's commands (one effect per command id), started at the end."""
    db, group = tmp_path / "sandbox.db", f"{app_id}-adapters"
    start_group_at_end(c.bootstrap_servers, group, [t.name for t in topics.COMMANDS])
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": c.bootstrap_servers}
    return start_sandbox_adapter(env, db, group, tmp_path / "adapter.log", app_id), db


def _run_worker_through(c: KafkaCluster, tmp_path, uid: str, disrupt: Callable[[], tuple[Callable, Callable]]):
    """A worker, the sandbox adapter and the webhook receiver on ``c`` while a simulated month flows and
    ``disrupt`` strikes; returns what to check."""
    history = _month(uid)
    expected = InProcess(now=NOW)
    for e in history:
        expected.feed_event(e)
    want = {x["command_id"] for x in expected.commands()}
    port, app_id = free_port(), f"concord-kafka-{uid}"
    env = {"CONCORD_DATA_DIR": str(tmp_path / "state"), "CONCORD_GAP_WAIT_S": "1", "CONCORD_CANARY_INTERVAL_S": "0"}
    names = start_deployment_at_end(c.bootstrap_servers, app_id)
    since_out = end_offsets(c.bootstrap_servers, [*OUTPUTS, *names.exception_queues])
    since_in = end_offsets(c.bootstrap_servers, CHANGES)
    receiver = make_app(c.bootstrap_servers, IdentityMap(tmp_path / "identity.json"), Deduper(), 10.0,
                        env=dict(fuzz.SECRETS))
    adapter, db = _adapter(c, tmp_path, app_id)
    try:
        with worker_process(c.bootstrap_servers, port, app_id, tmp_path / "worker.log", env) as proc, \
                serve(receiver) as base:
            _wait_until_consuming(c.bootstrap_servers, app_id)
            hooks = _Webhooks(base, uid)
            hooks.start()
            at_third, at_two_thirds = disrupt()
            errors = _flow(c, history, at_third, at_two_thirds)
            time.sleep(2)  # a few deliveries after the flow, on the recovered cluster; then Stripe is done
            hooks.halt.set()
            hooks.join(60)
            got = read_until(c.bootstrap_servers, since_out, lambda got: want <= {
                g.record["command_id"] for g in got if g.topic.startswith("commands.")} and want <= {
                (g.record or {}).get("command_id") for g in got if g.topic == topics.COMMAND_OUTCOMES.name},
                timeout=240)  # outcomes.commands carries the reconciler's ticks too
            alive = proc.poll() is None
        effects = applied_effects(db)
        adapter_alive = adapter.poll() is None
    finally:
        adapter.terminate()
        adapter.wait(30)
    hook = f"stripe:evt_{uid}_"  # the webhooks' events, beside the history's on the changes topics

    def all_read(got: list) -> bool:
        ids = [g.record["event_id"] for g in got if g.record]
        return sum(not i.startswith(hook) for i in ids) >= len(history) and set(hooks.delivered) <= set(ids)

    inputs = read_until(c.bootstrap_servers, since_in, all_read, timeout=60)
    issued = {g.record["command_id"] for g in got if g.topic.startswith("commands.")
              and (g.record.get("customer_id") or "").startswith(f"{uid}-")}
    hook_ids = [g.record["event_id"] for g in inputs if g.record and g.record["event_id"].startswith(hook)]
    outcomes: dict[str, set[str]] = {}
    for g in got:
        if g.topic == topics.COMMAND_OUTCOMES.name and (g.record or {}).get("command_id") in want:
            outcomes.setdefault(g.record["command_id"], set()).add(g.record["outcome"])
    return {"want": want, "issued": issued, "errors": errors, "alive": alive, "adapter_alive": adapter_alive,
            "effects": [e for e in effects if e in want], "outcomes": outcomes, "hooks": hooks, "hook_ids": hook_ids,
            "input_ids": [g.record["event_id"] for g in inputs if not g.record["event_id"].startswith(hook)],
            "history": history}


def _check_everything_went_on(out: dict) -> None:
    """What both disruptions must leave: nothing lost, nothing doubled, every process still at work."""
    assert not out["errors"], out["errors"][:3]
    assert out["alive"], "the worker stopped when a broker died"
    assert out["issued"] == out["want"] and len(out["want"]) > 30
    assert sorted(out["input_ids"]) == sorted(e["event_id"] for e in out["history"]), "an input was lost or doubled"
    assert out["adapter_alive"], "the adapter stopped when a broker died"
    assert set(out["outcomes"]) == out["want"], "every command reached its adapter and has its outcome"
    assert len(out["effects"]) == len(set(out["effects"])), "a command was applied twice"
    applied = {cid for cid, seen in out["outcomes"].items() if "applied" in seen}
    assert set(out["effects"]) == applied and len(applied) > 30, "an effect without its outcome, or the reverse"
    hooks = out["hooks"]
    assert not hooks.given_up and len(hooks.delivered) >= 3, (hooks.given_up, len(hooks.delivered))
    assert set(hooks.answers) <= {200, 503}, f"the receiver answered {set(hooks.answers)}: only 200 or 503 may be"
    assert hooks.answers[-1] == 200
    on_topic = Counter(out["hook_ids"])
    assert set(on_topic) == set(hooks.delivered), "a webhook answered 200 is on its topic, and only those"
    # A 503 answers a publish the broker did not acknowledge in time, which may still have landed (its leader
    # wrote it, then died): the retry then stores it again, and the pipeline drops the copy by its event id.
    doubled = {e for e, n in on_topic.items() if n > 1}
    assert doubled <= hooks.retried, f"stored twice though answered 200 at the first try: {doubled - hooks.retried}"


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
    _check_everything_went_on(out)
    pause = max(probe.longest_gap(p, struck["at"] - 1) for p in struck["probe"]) if struck["probe"] else None
    assert pause is not None and pause < 60, f"writes to the killed leader's partitions never resumed: {pause}"
    figure(f"failover pause: {pause:.1f}s of acks=all writes to the partitions node {struck['node']} led "
           f"(SIGKILLed as leader of {struck['tp'][0]}[{struck['tp'][1]}], restarted "
           f"{struck['restarted'] - struck['at']:.1f}s later); {len(out['want'])} commands, none lost, none applied "
           f"twice; {len(out['hooks'].delivered)} webhooks delivered ({out['hooks'].answers.count(503)} answered 503, "
           "retried)")


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
    _check_everything_went_on(out)
    figure(f"durable broker restart: down and back in {struck['back']:.1f}s mid-stream; "
           f"{len(out['want'])} commands, none lost, none applied twice; {len(out['hooks'].delivered)} webhooks "
           f"delivered ({out['hooks'].answers.count(503)} answered 503, retried)")
