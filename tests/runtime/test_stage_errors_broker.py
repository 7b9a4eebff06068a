"""The stages' error policy on a real broker with a running worker: bad records are dead-lettered, the next go on."""

import io
import json
import random
import urllib.request
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from fastavro import schemaless_writer
from kafka_helpers import CODEC, end_offsets, read_until, start_deployment_at_end

import schemas
from concord.contracts import events as ev
from concord.contracts import topics
from concord.contracts.codec import SINGLE_OBJECT_MAGIC
from concord.contracts.deadletter import DEFAULT_MAX_RECORD_BYTES
from concord.runtime.broker import free_port
from concord.tools.demo import worker_process
from schemas.compat import sample_record

pytestmark = pytest.mark.broker
NOW = 1_767_225_600_000
LINES = [ev.line("SVC-INSTALL", 1, 50_000)]
DEALS = "changes.crm.deal"


def publish(bootstrap, records):
    """Produce (topic, key, value) in order, allowing values over the usual 1 MB (the test's own producer)."""
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 2,
                  "message.max.bytes": 4 * 1024 * 1024})
    failed = []
    for topic, key, value in records:
        p.produce(topic, key=key, value=value, on_delivery=lambda err, msg: err and failed.append(err))
    assert p.flush(30) == 0 and not failed, failed


def allow_large_records(broker, topic, limit=4 * 1024 * 1024):
    """Let ``topic`` take records up to ``limit``, as an operator may; its dead-letter topic keeps the default.

    Apache Kafka refuses a record over a topic's max.message.bytes (1 MB by default) at produce time; the
    embedded broker has no such limit.
    """
    if broker.kind == "embedded":
        return
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("max.message.bytes", str(limit), incremental_operation=AlterConfigOpType.SET)])
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result(30)


def foreign_payload(event):
    """The event with a Job payload, written by a writer that bypasses the codec's typing."""
    parsed = schemas.load("change_event")
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + schemas.fingerprint(parsed))
    schemaless_writer(buf, parsed, {**event, "payload": ("concord.Job", ev.job("scheduled", [], deal_id=None))})
    return buf.getvalue()


def test_bad_records_are_dead_lettered_and_the_worker_goes_on(broker, tmp_path, uid):
    bs = broker.bootstrap_servers
    app_id = f"concord-dl-{uuid.uuid4().hex[:8]}"
    accepted_topic = start_deployment_at_end(bs, app_id).accepted  # the worker's own accepted.changes
    cid, deal = f"c-{uid}", f"d-{uid}"
    customer = ev.change_event("customer", cid, 1, ev.customer("Good Co", account="acct_g"), cid, at=NOW)
    won = ev.change_event("deal", deal, 1, ev.deal("closed_won", LINES), cid, at=NOW)
    good = CODEC.encode("change_event", won)
    big = CODEC.encode("change_event", {**won, "source_payload": b"x" * (2 * 1024 * 1024)})
    bad_deals = {
        "wrong_schema": CODEC.encode("command", sample_record(schemas.load("command"))),
        "tombstone": None,
        "truncated": good[: len(good) // 2],
        "random_bytes": random.Random(uid).randbytes(64),
        "too_large": big,
        "other_entity": foreign_payload(won),
    }
    bad_accepted = [CODEC.encode("control", {"action": "tick", "guard_key": None, "actor": None, "at": NOW}),
                    random.Random(uid + "a").randbytes(64), foreign_payload(customer)]
    later = ev.change_event("deal", f"{deal}-2", 1, ev.deal("closed_won", LINES), cid, at=NOW)
    watch = [topics.deadletter_topic(DEALS), topics.deadletter_topic(accepted_topic), topics.AUDIT.name,
             "commands.billing"]
    since = end_offsets(bs, watch)
    allow_large_records(broker, DEALS)
    port = free_port()
    with worker_process(bs, port, app_id, tmp_path / "worker.log", {"CONCORD_DATA_DIR": str(tmp_path)}) as proc:
        publish(bs, [("changes.crm.customer", cid.encode(), CODEC.encode("change_event", customer)),
                     *((DEALS, deal.encode(), v) for v in bad_deals.values()), (DEALS, deal.encode(), good),
                     *((accepted_topic, cid.encode(), v) for v in bad_accepted)])
        publish(bs, [(DEALS, later["entity_id"].encode(), CODEC.encode("change_event", later))])  # after them

        def invoiced(got, entity_id):
            return any(g.topic == "commands.billing" and g.record and g.record["entity_id"] == entity_id
                       for g in got)

        def decided(got):  # its audit record may come after its command: another topic, another fetch
            return any(g.topic == topics.AUDIT.name and g.record and g.record["topic"] == DEALS
                       and g.record["entity_id"] == deal and g.record["outcome"] == "applied" for g in got)

        def done(got):
            return invoiced(got, deal) and invoiced(got, later["entity_id"]) and len(dead(got, DEALS)) == 6 \
                and len(dead(got, accepted_topic)) == 3 and decided(got)

        def dead(got, topic):
            return [g for g in got if g.topic == topics.deadletter_topic(topic) and g.key in (deal.encode(),
                                                                                              cid.encode())]

        got = read_until(bs, since, done, timeout=120)
        assert proc.poll() is None, "no record may stop the worker"
    deals = dead(got, DEALS)
    assert [g.record["original_offset"] for g in deals] == sorted(g.record["original_offset"] for g in deals)
    by_kind = dict(zip(bad_deals, deals, strict=True))  # one partition (one key): in the order published
    for kind, g in by_kind.items():
        kept = g.record["original_value"]
        if kind == "too_large":
            assert kept and big.startswith(kept) and len(kept) < DEFAULT_MAX_RECORD_BYTES
            assert g.headers["concord-original-size"] == str(len(big)).encode()
        else:
            assert kept == bad_deals[kind], kind
        assert g.headers["concord-processor"] == b"order_changes"
    assert [g.record["error_type"] for g in deals] == ["SchemaMismatch", "DecodeError", "DecodeError",
                                                       "DecodeError", "TooLarge", "PayloadTypeError"]
    accepted = dead(got, accepted_topic)
    assert [g.record["original_value"] for g in accepted] == bad_accepted
    assert {g.headers["concord-processor"] for g in accepted} == {b"decide_changes"}
    good_offset = max(g.record["original_offset"] for g in deals) + 1
    assert any(g.topic == topics.AUDIT.name and g.record["topic"] == DEALS and g.record["offset"] == good_offset
               and g.record["outcome"] == "applied" for g in got), "the record after the bad ones was decided"


def test_a_customer_whose_status_outgrows_one_record_stops_nothing(broker, tmp_path, uid):
    bs = broker.bootstrap_servers
    app_id = f"concord-big-{uuid.uuid4().hex[:8]}"
    accepted_topic = start_deployment_at_end(bs, app_id).accepted
    big, other = f"big-{uid}", f"other-{uid}"
    lines = [ev.line("SVC-INSTALL", i + 1, 1_000) for i in range(20)]
    deals = [ev.change_event("deal", f"{big}-d{n}", 1, ev.deal("closed_lost", lines), big, at=NOW + n)
             for n in range(60)]
    won = ev.change_event("deal", f"{other}-d", 1, ev.deal("closed_won", LINES), other, at=NOW)
    since = end_offsets(bs, [topics.deadletter_topic(accepted_topic), topics.AUDIT.name, "commands.billing"])
    env = {"CONCORD_DATA_DIR": str(tmp_path), "CONCORD_MAX_RECORD_BYTES": "40000"}
    port = free_port()
    with worker_process(bs, port, app_id, tmp_path / "worker.log", env) as proc:
        publish(bs, [("changes.crm.customer", cid.encode(),
                      CODEC.encode("change_event", ev.change_event("customer", cid, 1, ev.customer(
                          f"{cid} Co", account=f"acct_{cid}"), cid, at=NOW))) for cid in (big, other)])
        publish(bs, [(DEALS, d["entity_id"].encode(), CODEC.encode("change_event", d)) for d in deals])
        publish(bs, [(DEALS, won["entity_id"].encode(), CODEC.encode("change_event", won))])  # after them

        def outcome(got):  # deal id -> what became of it in the decide stage
            seen = {g.record["entity_id"]: g.record["outcome"] for g in got if g.topic == topics.AUDIT.name
                    and g.record and g.record["topic"] == DEALS and g.record["customer_id"] == big}
            for g in got:
                if g.topic == topics.deadletter_topic(accepted_topic) and g.key == big.encode():
                    seen[CODEC.decode(g.record["original_value"])[1]["entity_id"]] = "dead_lettered"
            return seen

        def done(got):
            return len(outcome(got)) == len(deals) and any(
                g.topic == "commands.billing" and g.record and g.record["entity_id"] == won["entity_id"]
                for g in got)

        got = read_until(bs, since, done, timeout=120)
        assert proc.poll() is None, "a status too large to keep may not stop the worker"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/customers/{big}", timeout=10) as resp:
            status = json.loads(resp.read())
    seen = outcome(got)
    dead = [d["entity_id"] for d in deals if seen[d["entity_id"]] == "dead_lettered"]
    assert dead and set(seen.values()) == {"applied", "dead_lettered"}, seen
    assert set(status["deals"]) == {d for d, what in seen.items() if what == "applied"}  # the rest changed nothing
    letters = [g for g in got if g.topic == topics.deadletter_topic(accepted_topic) and g.key == big.encode()]
    assert all("over the 40000-byte limit" in g.record["error"] for g in letters)
    assert {g.headers["concord-processor"] for g in letters} == {b"decide_changes"}
    assert sorted(CODEC.decode(g.record["original_value"])[1]["entity_id"] for g in letters) == sorted(dead)
