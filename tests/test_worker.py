"""The worker on a real broker: the first flow's three outcomes, its table changelog, status, metrics."""

import json
import random
import subprocess
import sys
import urllib.request

import pytest
from kafka_helpers import CODEC, end_offsets, produce, read_until

from streams import events as ev
from streams import topics
from streams.broker import free_port
from streams.demo import worker_process
from streams.harness import InProcess
from streams.simulator import business

pytestmark = pytest.mark.broker
NOW = 1_767_225_600_000
LINES = [ev.line("SVC-INSTALL", 1, 50_000)]
WATCH = [t.name for t in (*topics.COMMANDS, *topics.EXCEPTIONS, *topics.DEADLETTERS, topics.AUDIT)]


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory):
    """One worker process for the module, with its own consumer group and state."""
    import uuid

    port = free_port()
    app_id = f"concord-test-{uuid.uuid4().hex[:8]}"
    state = tmp_path_factory.mktemp("worker")
    env = {"CONCORD_DATA_DIR": str(state), "CONCORD_GAP_WAIT_S": "1"}
    with worker_process(broker.bootstrap_servers, port, app_id, state / "worker.log", env) as proc:
        yield {"port": port, "app_id": app_id, "proc": proc, "url": f"http://127.0.0.1:{port}", "log": state}


def publish(bs, *evs):
    produce(bs, [(topics.changes_topic(e["source_system"], e["entity_type"]), e["entity_id"].encode(),
                  CODEC.encode("change_event", e)) for e in evs])


def test_first_flow_three_outcomes_and_the_worker_goes_on(broker, worker, uid):
    bs = broker.bootstrap_servers
    since = end_offsets(bs, WATCH)
    good, bad = f"c-{uid}", f"nb-{uid}"
    publish(bs, ev.change_event("customer", good, 1, ev.customer("Good Co", account="acct_g"), good, at=NOW),
            ev.change_event("customer", bad, 1, ev.customer("No Account Co", account=None,
                                                             external_ids={"stripe": "cus_x"}), bad, at=NOW))
    garbage = b"\x00not avro at all " + uid.encode()
    produce(bs, [(topics.changes_topic("crm", "deal"), f"d-{uid}".encode(), garbage)])
    publish(bs, ev.change_event("deal", f"d-{uid}", 1, ev.deal("closed_won", LINES), good, at=NOW),
            ev.change_event("deal", f"x-{uid}", 1, ev.deal("closed_won", LINES), bad, at=NOW))

    def done(got):
        return (any(g.topic == "commands.billing" and g.record["entity_id"] == f"d-{uid}" for g in got)
                and any(g.topic == "exceptions.revenue-ops" and g.record["entity_id"] == f"x-{uid}"
                        and g.record["suggestions"] for g in got)
                and any(g.topic == "deadletter.changes.crm.deal" and g.record["original_value"] == garbage
                        for g in got))

    got = read_until(bs, since, done, timeout=90)
    [cmd] = [g.record for g in got if g.topic == "commands.billing" and g.record["entity_id"] == f"d-{uid}"]
    assert cmd["type"] == "create_invoice" and json.loads(cmd["payload"])["billing_account_id"] == "acct_g"
    assert cmd["trace_id"] == f"trace:deal:d-{uid}"
    exc = [g.record for g in got if g.topic == "exceptions.revenue-ops" and g.record["entity_id"] == f"x-{uid}"][-1]
    assert exc["reason_code"] == "missing_billing_account" and exc["owner"] == "revenue-ops"
    assert exc["sla_deadline"] == exc["opened_at"] + 4 * 3600 * 1000 and exc["trace_id"] == f"trace:deal:x-{uid}"
    assert exc["suggestions"][0]["value"] == "cus_x" and exc["original"]["topic"] == "changes.crm.deal"
    assert CODEC.decode(exc["original"]["value"])[1]["entity_id"] == f"x-{uid}"
    [dl] = [g for g in got if g.topic == "deadletter.changes.crm.deal" and g.record["original_value"] == garbage]
    assert dl.headers["concord-stage"] == b"decode" and dl.headers["concord-src-topic"] == b"changes.crm.deal"
    assert dl.record["original_offset"] >= 0 and dl.record["error"]
    assert worker["proc"].poll() is None, "one bad record must not stop the worker"


def test_status_is_queryable_and_its_table_has_a_changelog(broker, worker, uid):
    bs = broker.bootstrap_servers
    cid = f"s-{uid}"
    since = end_offsets(bs, WATCH)
    publish(bs, ev.change_event("customer", cid, 1, ev.customer("Status Co", account="acct_s"), cid, at=NOW),
            ev.change_event("deal", f"sd-{uid}", 1, ev.deal("closed_won", LINES), cid, at=NOW))
    read_until(bs, since, lambda got: any(g.topic == "commands.billing" and g.record["entity_id"] == f"sd-{uid}"
                                          for g in got))
    out = subprocess.run([sys.executable, "-m", "streams.cli", "status", cid, "--url", worker["url"], "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["deals"][f"sd-{uid}"]["position"] == "sold" and status["customer"]["billing_account_id"] == "acct_s"
    missing = subprocess.run([sys.executable, "-m", "streams.cli", "status", f"nobody-{uid}", "--url", worker["url"]],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "404" in missing.stderr
    changelog = f"{worker['app_id']}-customer_to_status-changelog"
    got = read_until(bs, {(changelog, p): 0 for p in range(topics.PARTITIONS)},
                     lambda got: any(g.key == cid.encode() for g in got), timeout=60)
    latest = json.loads([g for g in got if g.key == cid.encode()][-1].value)
    assert f"sd-{uid}" in latest["deals"]


def test_metrics_count_events_commands_and_exceptions(worker):
    text = urllib.request.urlopen(worker["url"] + "/metrics", timeout=10).read().decode()
    def value(prefix):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))
    assert value('concord_commands_total{target="billing",type="create_invoice"}') >= 1
    assert value('concord_events_total{outcome="applied",topic="changes.crm.deal"}') >= 1
    assert value('concord_exceptions_opened_total{owner="revenue-ops",reason="missing_billing_account"}') >= 1
    assert value('concord_deadletters_total{stage="decode",topic="changes.crm.deal"}') >= 1


def test_broker_run_converges_with_the_in_process_run(broker, worker, uid):
    """The convergence property on the broker, for a small sample: shuffled, duplicated delivery."""
    bs = broker.bootstrap_servers
    history = business(random.Random(11), 4, 20, NOW, prefix=f"{uid}-",
                       faults={"missing_billing_account": 0.3, "unmapped_sku": 0.0, "missing_billing_terms": 0.0})
    expected = InProcess(now=NOW)
    for e in history:
        expected.feed_event(e)
    want = {c["command_id"] for c in expected.commands()}
    rng = random.Random(5)
    delivered = list(history)
    rng.shuffle(delivered)  # across entities; per entity, the guard repairs the order (parks and releases)
    delivered += rng.sample(history, len(history) // 5)
    since = end_offsets(bs, WATCH)
    publish(bs, *delivered)
    got = read_until(bs, since, lambda got: want <= {g.record["command_id"] for g in got
                                                        if g.topic.startswith("commands.")}, timeout=120)
    issued = [g.record["command_id"] for g in got if g.topic.startswith("commands.")
              and g.record["customer_id"] and g.record["customer_id"].startswith(f"{uid}-")]
    assert set(issued) == want and len(want) > 10
