"""The confirmation path on a real broker: command -> adapter outcome -> the target's echo -> confirmed; no echo ->
command_unconfirmed, closed by the late echo."""

import json
import subprocess
import sys
import urllib.request
import uuid

import pytest
import yaml
from kafka_helpers import CODEC, end_offsets, produce, read_until, start_deployment_at_end

from concord.contracts import events as ev
from concord.contracts import topics
from concord.domain.flow_config import DEFAULT_PATH
from concord.runtime.broker import free_port
from concord.tools.demo import worker_process
from connectors.outbound.consumer import Adapter, Origin
from connectors.outbound.sandbox import SandboxTarget

pytestmark = pytest.mark.broker
NOW = 1_767_225_600_000
LINES = [ev.line("SVC-INSTALL", 1, 50_000)]
SHARED = [t.name for t in (*topics.COMMANDS, topics.AUDIT, topics.COMMAND_OUTCOMES)]


def publish(bs, *evs):
    produce(bs, [(topics.changes_topic(e["source_system"], e["entity_type"]), e["entity_id"].encode(),
                  CODEC.encode("change_event", e)) for e in evs])


def test_a_command_is_confirmed_by_its_echo_and_an_unechoed_one_is_unconfirmed_until_it_arrives(
        broker, uid, tmp_path):
    bs = broker.bootstrap_servers
    flows = yaml.safe_load(DEFAULT_PATH.read_text())
    flows["confirm_within_s"] = {"create_invoice": 3}  # short by configuration, as the demo does
    (tmp_path / "flows.yaml").write_text(yaml.safe_dump(flows))
    app_id = f"concord-loop-{uuid.uuid4().hex[:8]}"
    env = {"CONCORD_DATA_DIR": str(tmp_path / "state"), "CONCORD_FLOWS": str(tmp_path / "flows.yaml"),
           "CONCORD_RECONCILE_INTERVAL_S": "0.5", "CONCORD_RECONCILE_DELAY_S": "0", "CONCORD_CANARY_INTERVAL_S": "0"}
    names = start_deployment_at_end(bs, app_id)
    watch = [*SHARED, *names.exception_queues]
    port = free_port()
    cust, echoed, silent = f"c-{uid}", f"d1-{uid}", f"d2-{uid}"
    with worker_process(bs, port, app_id, tmp_path / "worker.log", env):
        since = end_offsets(bs, watch)
        publish(bs, ev.change_event("customer", cust, 1, ev.customer("Loop Co", account="acct_l"), cust, at=NOW),
                ev.change_event("deal", echoed, 1, ev.deal("closed_won", LINES), cust, at=NOW),
                ev.change_event("deal", silent, 1, ev.deal("closed_won", LINES), cust, at=NOW))
        got = read_until(bs, since, lambda g: sum(
            x.topic == "commands.billing" and x.record["type"] == "create_invoice"
            and x.record["customer_id"] == cust for x in g) == 2, timeout=90)
        cmds = {g.record["entity_id"]: g for g in got if g.topic == "commands.billing"
                and g.record["type"] == "create_invoice" and g.record["customer_id"] == cust}
        adapter = Adapter(bs, SandboxTarget(tmp_path / "sandbox.db"), ["billing"], names)
        try:
            for g in cmds.values():  # the adapter applies both and reports each outcome on outcomes.commands
                assert adapter.handle(Origin(g.topic, g.partition, g.offset, g.key, g.value)) == "applied"
        finally:
            adapter.target.close()
            del adapter  # and its producer with it
        first = cmds[echoed].record["command_id"]
        publish(bs, ev.change_event("invoice", f"inv1-{uid}", 1, ev.invoice("open", LINES, deal_id=echoed,
                                                                             issued_at=NOW), cust, at=NOW,
                                    caused_by_command_id=first))

        def unconfirmed(g):
            return [x.record for x in g if x.topic == names.exceptions("revenue-ops")
                    and x.record["reason_code"] == "command_unconfirmed" and x.record["customer_id"] == cust]

        got = read_until(bs, since, lambda g: unconfirmed(g) and any(
            x.topic == topics.AUDIT.name and x.record["outcome"] == "confirmed" and first in x.record["command_ids"]
            for x in g), timeout=90)
        outcomes = [g.record for g in got if g.topic == topics.COMMAND_OUTCOMES.name
                    and g.record.get("customer_id") == cust]  # the timer's ticks share the topic
        assert sorted(o["outcome"] for o in outcomes) == ["applied", "applied"]
        assert {g.key for g in got if g.topic == topics.COMMAND_OUTCOMES.name and g.record
                and g.record.get("customer_id") == cust} == {cust.encode()}
        [exc] = unconfirmed(got)
        second = cmds[silent].record["command_id"]
        assert exc["entity_id"] == silent and second in exc["message"]
        assert "the adapter reported applied (inv_" in exc["message"] and "billing shows no invoice" in exc["message"]
        assert (exc["amount_at_risk_cents"], exc["currency"]) == (50_000, "USD")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/customers/{cust}", timeout=10) as resp:
            status = json.loads(resp.read())
        assert status["commands"][first]["state"] == "confirmed"
        assert status["commands"][first]["adapter"]["outcome"] == "applied"
        assert status["commands"][second]["state"] == "applied"

        since = end_offsets(bs, watch)
        publish(bs, ev.change_event("invoice", f"inv2-{uid}", 1, ev.invoice("open", LINES, deal_id=silent,
                                                                             issued_at=NOW), cust, at=NOW,
                                    caused_by_command_id=second))  # the late echo
        got = read_until(bs, since, lambda g: any(
            x.topic == names.exceptions("revenue-ops") and x.record["exception_id"] == exc["exception_id"]
            and x.record["state"] == "resolved" for x in g), timeout=90)
        [closed] = [x.record for x in got if x.topic == names.exceptions("revenue-ops")
                    and x.record["exception_id"] == exc["exception_id"]]
        assert closed["resolution"]["by"] == "concord"

    # `concord trace` shows the chain: the command, what the adapter reported, the confirmation
    trace = subprocess.run([sys.executable, "-m", "concord", "trace", cmds[echoed].record["trace_id"],
                            "--bootstrap", bs, "--app-id", app_id], capture_output=True, text=True, timeout=120)
    assert trace.returncode == 0, trace.stderr
    lines = trace.stdout.splitlines()
    steps = [next(i for i, ln in enumerate(lines) if want in ln) for want in (
        f"command   create_invoice -> billing deal {echoed}", "outcome   create_invoice applied by sandbox",
        f"confirmed: {first}: echo in billing invoice inv1-{uid}")]
    assert steps == sorted(steps), trace.stdout
