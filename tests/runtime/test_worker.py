"""The worker on a real broker: the first flow's three outcomes, its table changelog, status, metrics."""

import json
import random
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from kafka_helpers import CODEC, end_offsets, produce, read_until, start_deployment_at_end

from concord.contracts import events as ev
from concord.contracts import topics
from concord.runtime.broker import free_port
from concord.runtime.harness import InProcess
from concord.tools.demo import worker_process
from concord.tools.simulator import business

pytestmark = pytest.mark.broker
NOW = 1_767_225_600_000
LINES = [ev.line("SVC-INSTALL", 1, 50_000)]
SLA_SCALE = 0.0005  # 4 h -> 7.2 s, so an SLA runs out while the test watches
TOKENS = {team: f"test-token-{team}-{i}" * 2 for i, team in enumerate(topics.OWNERS)}
SHARED = [t.name for t in (*topics.COMMANDS, *topics.DEADLETTERS, topics.AUDIT)]  # + a deployment's queues
APP_ID = f"concord-test-{uuid.uuid4().hex[:8]}"  # the module's worker
NAMES = topics.Deployment(APP_ID)
WATCH = [*SHARED, *NAMES.exception_queues]
REVENUE_OPS, FINANCE = NAMES.exceptions("revenue-ops"), NAMES.exceptions("finance")


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory):
    """One worker process for the module, with its own consumer group, internal topics and state."""
    port = free_port()
    app_id = APP_ID
    state = tmp_path_factory.mktemp("worker")
    env = {"CONCORD_DATA_DIR": str(state), "CONCORD_GAP_WAIT_S": "1", "CONCORD_SLA_SCALE": str(SLA_SCALE),
           "CONCORD_SLA_CHECK_INTERVAL_S": "0.5",
           "CONCORD_OWNER_TOKENS": ",".join(f"{team}={token}" for team, token in TOKENS.items())}
    start_deployment_at_end(broker.bootstrap_servers, app_id)  # its own topics, not earlier tests' traffic
    with worker_process(broker.bootstrap_servers, port, app_id, state / "worker.log", env) as proc:
        yield {"port": port, "app_id": app_id, "proc": proc, "url": f"http://127.0.0.1:{port}", "log": state}


def publish(bs, *evs):
    produce(bs, [(topics.changes_topic(e["source_system"], e["entity_type"]), e["entity_id"].encode(),
                  CODEC.encode("change_event", e)) for e in evs])


def first_flow(bs, uid):
    """A good customer's deal, a deal of a customer without a billing account, and bytes that are not Avro."""
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
                and any(g.topic == REVENUE_OPS and g.record["entity_id"] == f"x-{uid}"
                        and g.record["suggestions"] for g in got)
                and any(g.topic == "deadletter.changes.crm.deal" and g.record["original_value"] == garbage
                        for g in got))

    return read_until(bs, since, done, timeout=90), garbage


def test_first_flow_three_outcomes_and_the_worker_goes_on(broker, worker, uid):
    got, garbage = first_flow(broker.bootstrap_servers, uid)
    [cmd] = [g.record for g in got if g.topic == "commands.billing" and g.record["entity_id"] == f"d-{uid}"]
    assert cmd["type"] == "create_invoice" and json.loads(cmd["payload"])["billing_account_id"] == "acct_g"
    assert cmd["trace_id"] == f"trace:deal:d-{uid}"
    exc = [g.record for g in got if g.topic == REVENUE_OPS and g.record["entity_id"] == f"x-{uid}"][-1]
    assert exc["reason_code"] == "missing_billing_account" and exc["owner"] == "revenue-ops"
    assert exc["sla_deadline"] - exc["opened_at"] == int(4 * 3600 * SLA_SCALE * 1000)
    assert exc["trace_id"] == f"trace:deal:x-{uid}"
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
    out = subprocess.run([sys.executable, "-m", "concord", "status", cid, "--url", worker["url"], "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["deals"][f"sd-{uid}"]["position"] == "sold" and status["customer"]["billing_account_id"] == "acct_s"
    missing = subprocess.run([sys.executable, "-m", "concord", "status", f"nobody-{uid}", "--url", worker["url"]],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "404" in missing.stderr
    changelog = f"{worker['app_id']}-customer_to_status-changelog"
    got = read_until(bs, {(changelog, p): 0 for p in range(topics.PARTITIONS)},
                     lambda got: any(g.key == cid.encode() for g in got), timeout=60)
    latest = json.loads([g for g in got if g.key == cid.encode()][-1].value)
    assert f"sd-{uid}" in latest["deals"]


def test_metrics_count_events_commands_and_exceptions(broker, worker, uid):
    def value(prefix):
        text = urllib.request.urlopen(worker["url"] + "/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    first_flow(broker.bootstrap_servers, f"m{uid}")  # its own traffic: the module's tests may run in other processes
    deadline = time.monotonic() + 60  # the canary ran once at start: its create_invoice came back
    while value('concord_canary_runs_total{outcome="succeeded"}') < 1:
        assert time.monotonic() < deadline, "the canary's flow never succeeded"
        time.sleep(0.5)
    assert value('concord_canary_runs_total{outcome="failed"}') == 0
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


def api(worker, method, path, token=None, **query):
    import urllib.error
    import urllib.parse

    url = worker["url"] + path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def cli(worker, *args, token=None):
    return subprocess.run([sys.executable, "-m", "concord", "exceptions", "--url", worker["url"], "--token",
                           token or TOKENS["revenue-ops"], *args], capture_output=True, text=True, timeout=60)


def test_exception_lifecycle_sla_escalation_resolution_replay_and_release(broker, worker, uid):
    """open -> SLA runs out -> escalated to the backup (billing held) -> resolved -> replay -> command."""
    bs = broker.bootstrap_servers
    cid, deal = f"lc-{uid}", f"lcd-{uid}"
    since = end_offsets(bs, WATCH)
    publish(bs, ev.change_event("customer", cid, 1, ev.customer("Late Co", account=None,
                                                                 external_ids={"stripe": f"cus_{uid}"}), cid, at=NOW))
    got = read_until(bs, since, lambda got: any(g.topic == "commands.dispatch" and g.record["customer_id"] == cid
                                                for g in got))  # the customer record is in before the deal
    publish(bs, ev.change_event("deal", deal, 1, ev.deal("closed_won", LINES), cid, at=NOW))
    got = read_until(bs, since, lambda got: any(g.topic == REVENUE_OPS and g.record["entity_id"] == deal
                                                for g in got))
    eid = [g.record for g in got if g.topic == REVENUE_OPS and g.record["entity_id"] == deal][0][
        "exception_id"]
    publish(bs, ev.change_event("deal", deal, 2, ev.deal("closed_won", LINES, name="later change"), cid, at=NOW))

    # the SLA (7.2 s here) runs out: escalated to finance, billing held for the deal
    got = read_until(bs, since, lambda got: any(g.topic == FINANCE and g.key == eid.encode()
                                                and g.record["state"] == "escalated" for g in got)
                     and any(g.topic == "commands.billing" and g.record["type"] == "hold_billing"
                             and g.record["entity_id"] == deal for g in got), timeout=60)
    parked = [g.record for g in got if g.topic == topics.AUDIT.name and g.record["entity_id"] == deal
              and g.record["outcome"] == "parked"]
    assert len(parked) == 1 and eid in parked[0]["reason"]
    assert not any(g.topic == "commands.billing" and g.record["type"] == "create_invoice"
                   and g.record["entity_id"] == deal for g in got)

    # nobody else may see or touch it
    assert api(worker, "GET", f"/exceptions/{eid}")[0] == 401
    assert api(worker, "GET", f"/exceptions/{eid}", "not-a-token")[0] == 401
    assert api(worker, "GET", f"/exceptions/{eid}", TOKENS["marketing-ops"])[0] == 403
    code, body = api(worker, "POST", f"/exceptions/{eid}/resolve", TOKENS["dispatch-ops"], customer=cid,
                     set="billing_account_id=acct_evil")
    assert code == 403, body
    code, body = api(worker, "POST", f"/exceptions/{eid}/resolve", TOKENS["revenue-ops"], customer=cid,
                     set="colour=blue")
    assert code == 422 and "no field 'colour'" in body["error"]
    code, body = api(worker, "POST", f"/exceptions/{eid}/resolve", TOKENS["revenue-ops"], customer=cid,
                     set="billing_terms=net_15")
    assert code == 422 and "does not fix it" in body["error"]
    assert api(worker, "GET", "/exceptions", TOKENS["revenue-ops"], owner="finance")[0] == 403

    shown = cli(worker, "show", eid, token=TOKENS["finance"])
    assert shown.returncode == 0 and "escalated" in shown.stdout and f"cus_{uid}" in shown.stdout, shown.stderr
    done = cli(worker, "--user", "ana", "resolve", eid, "--choose", "1")
    assert done.returncode == 0, done.stderr
    assert f"{eid}: resolved by revenue-ops:ana" in done.stdout

    got = read_until(bs, since, lambda got: any(g.topic == "commands.billing" and g.record["type"] == "create_invoice"
                                                and g.record["entity_id"] == deal for g in got)
                     and any(g.topic == "commands.billing" and g.record["type"] == "release_billing_hold"
                             and g.record["entity_id"] == deal for g in got), timeout=60)
    [inv] = [g.record for g in got if g.topic == "commands.billing" and g.record["type"] == "create_invoice"
             and g.record["entity_id"] == deal]
    assert json.loads(inv["payload"])["billing_account_id"] == f"cus_{uid}"
    resolved = [g.record for g in got if g.topic in NAMES.exception_queues and g.key == eid.encode()
                and g.record["state"] == "resolved"]
    assert resolved and resolved[0]["resolution"]["by"] == "revenue-ops:ana"
    released = [g.record for g in got if g.topic == topics.AUDIT.name and g.record["entity_id"] == deal
                and g.record["reason"].startswith("released from park")]
    assert [r["offset"] for r in released] == [parked[0]["offset"]]
    status = json.loads(subprocess.run([sys.executable, "-m", "concord", "status", cid, "--url", worker["url"],
                                        "--json"], capture_output=True, text=True, timeout=30).stdout)
    assert status["deals"][deal]["name"] == "later change" and status["exceptions"] == {}

    trace = subprocess.run([sys.executable, "-m", "concord", "trace", f"trace:deal:{deal}", "--bootstrap", bs,
                            "--app-id", worker["app_id"]], capture_output=True, text=True, timeout=120)
    assert trace.returncode == 0, trace.stderr
    chain = trace.stdout.splitlines()
    assert any("decision" in ln and " parked" in ln for ln in chain)
    assert any("exception missing_billing_account escalated" in ln for ln in chain)
    assert any("exception missing_billing_account resolved" in ln and "by revenue-ops:ana" in ln for ln in chain)
    assert any("command   create_invoice -> billing" in ln for ln in chain)
    assert [i for i, ln in enumerate(chain) if "escalated" in ln][0] < [
        i for i, ln in enumerate(chain) if "create_invoice" in ln][0], "printed in time order"

    again = cli(worker, "resolve", eid, "--set", f"billing_account_id=cus_{uid}")
    assert again.returncode == 1 and "409" in again.stderr, "resolving twice is refused and changes nothing"

    text = urllib.request.urlopen(worker["url"] + "/metrics", timeout=10).read().decode()
    labels = 'owner="revenue-ops",reason="missing_billing_account"'
    for name in ("concord_sla_breaches_total", "concord_exceptions_escalated_total",
                 "concord_exceptions_resolved_total", "concord_exception_resolution_seconds_count"):
        assert any(line.startswith(f"{name}{{{labels}}}") and float(line.rsplit(" ", 1)[1]) >= 1
                   for line in text.splitlines()), name
    assert any(line.startswith('concord_replays_total{outcome="succeeded"}') for line in text.splitlines())
    assert any(line.startswith('concord_resolutions_total{owner="revenue-ops"}') for line in text.splitlines())


def test_a_rejected_command_is_sent_again_when_its_owner_resolves_it(broker, worker, uid):
    """command_rejected (raised by an adapter) lives outside any customer's status: resolve re-sends the command."""
    from concord.domain.routing import load_routing
    from concord.domain.rules import stable_id

    bs = broker.bootstrap_servers
    cmd = {"command_id": f"cmd_{uid}", "type": "void_invoice", "target_system": "billing", "customer_id": f"c-{uid}",
           "entity_type": "invoice", "entity_id": f"in-{uid}", "payload": json.dumps({"invoice_id": f"in-{uid}"}),
           "caused_by": [], "trace_id": f"trace-{uid}", "issued_at": NOW, "source_occurred_at": None}
    value = CODEC.encode("command", cmd)
    exc = load_routing().route({"exception_id": stable_id("command_rejected", cmd["command_id"]),
                                "reason_code": "command_rejected", "trace_id": cmd["trace_id"],
                                "source_system": "billing", "entity_type": "invoice", "entity_id": f"in-{uid}",
                                "customer_id": f"c-{uid}", "message": "sandbox rejected void_invoice: no invoice",
                                "suggestions": []}, NOW)
    exc["original"] = {"topic": "commands.billing", "partition": 0, "offset": 0, "key": f"in-{uid}".encode(),
                       "value": value}
    since = end_offsets(bs, WATCH)
    produce(bs, [(REVENUE_OPS, exc["exception_id"].encode(), CODEC.encode("exception", exc))])
    deadline = time.monotonic() + 90  # a condition, not a timing: a loaded machine (the suite runs in parallel) is slow
    while api(worker, "GET", f"/exceptions/{exc['exception_id']}", TOKENS["revenue-ops"])[0] != 200:
        assert time.monotonic() < deadline, "the tracker never recorded the exception"
        time.sleep(0.2)
    code, body = api(worker, "POST", f"/exceptions/{exc['exception_id']}/resolve", TOKENS["revenue-ops"],
                     customer=f"c-{uid}", set="anything=1")
    assert code == 202, body
    got = read_until(bs, since, lambda got: any(g.topic == "commands.billing" and g.value == value for g in got)
                     and any(g.key == exc["exception_id"].encode() and g.record["state"] == "resolved" for g in got))
    [closed] = [g.record for g in got if g.key == exc["exception_id"].encode() and g.record["state"] == "resolved"]
    assert closed["resolution"]["patch"] == {"action": "resend_command"} and closed["resolution"]["by"] == "revenue-ops"
    deadline = time.monotonic() + 90  # the tracker takes the resolution from the queue into its table
    while api(worker, "GET", f"/exceptions/{exc['exception_id']}", TOKENS["revenue-ops"])[1].get("state") != "resolved":
        assert time.monotonic() < deadline, "the tracker never recorded the resolution"
        time.sleep(0.2)
    code, body = api(worker, "POST", f"/exceptions/{exc['exception_id']}/discard", TOKENS["revenue-ops"],
                     customer=f"c-{uid}", note="done")
    assert code == 409 and "already resolved" in body["error"]
