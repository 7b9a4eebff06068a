"""Governed rule changes on a real broker: the digest a worker runs, approved changes on record, topics replayed."""

import json
import urllib.request

import pytest
from kafka_helpers import CODEC, end_offsets, produce, read_until

from concord.contracts import events as ev
from concord.contracts import topics
from concord.domain.flow_config import DEFAULT_PATH as FLOWS
from concord.domain.flow_config import load_flow_config
from concord.domain.governance import config_digest
from concord.domain.ids import command_id
from concord.domain.routing import load_routing
from concord.runtime.broker import ensure_topics, free_port
from concord.tools.cli import main
from concord.tools.demo import worker_process

pytestmark = pytest.mark.broker
T0 = 1_767_225_600_000


def _on_completion(path):
    path.write_text(FLOWS.read_text().replace("default_billing_policy: on_close",
                                              "default_billing_policy: on_completion"))
    return path


def test_a_worker_reports_the_digest_of_the_configuration_it_runs(broker, tmp_path, uid):
    flows = _on_completion(tmp_path / "flows.yaml")
    want = config_digest(load_flow_config(flows), load_routing())
    assert want != config_digest(load_flow_config(), load_routing())
    port = free_port()
    env = {"CONCORD_DATA_DIR": str(tmp_path / "state"), "CONCORD_FLOWS": str(flows)}
    with worker_process(broker.bootstrap_servers, port, f"concord-digest-{uid}", tmp_path / "worker.log", env):
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert health["config_digest"] == want
    assert f'concord_config_info{{digest="{want}"}} 1.0' in text


def test_applying_a_change_records_approver_time_and_summary_then_installs_it(broker, tmp_path, monkeypatch, uid,
                                                                              capsys):
    current = tmp_path / "current.yaml"
    current.write_text(FLOWS.read_text())
    proposed = _on_completion(tmp_path / "proposed.yaml")
    history = tmp_path / "history.jsonl"
    from connectors.inbound.common import json_dumps

    history.write_text("".join(json_dumps(e) + "\n" for e in (
        ev.change_event("customer", f"c-{uid}", 1, ev.customer("One", account="acct_1"), f"c-{uid}", at=T0),
        ev.change_event("deal", f"d-{uid}", 1, ev.deal("closed_won", [ev.line("SVC-INSTALL")]), f"c-{uid}", at=T0,
                        trace_id=f"trace-{uid}"))))
    bs = broker.bootstrap_servers
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bs)
    ensure_topics(bs, [topics.CONFIG_CHANGES])
    since = end_offsets(bs, [topics.CONFIG_CHANGES.name])
    before = config_digest(load_flow_config(current), load_routing())
    after = config_digest(load_flow_config(proposed), load_routing())
    assert main(["rules", "apply", "--flows", str(proposed), "--current-flows", str(current), "--history",
                 str(history), "--approved-by", f"ana-{uid}", "--reason", "bill on completion"]) == 0
    assert f"{before} -> {after} approved by ana-{uid}" in capsys.readouterr().out
    got = read_until(bs, since, lambda got: any(g.key == after.encode() for g in got), timeout=30)
    [rec] = [g.record for g in got if g.key == after.encode()]
    assert rec["approved_by"] == f"ana-{uid}" and rec["reason"] == "bill on completion" and rec["approved_at"] > T0
    assert (rec["digest_before"], rec["digest_after"]) == (before, after)
    summary = json.loads(rec["summary"])
    assert summary["commands"]["removed"]["create_invoice"] == {"count": 1, "examples": [f"trace-{uid}"]}
    assert summary["commands"]["added"]["create_job"]["count"] == 1
    assert current.read_text() == proposed.read_text()  # installed only once on record
    assert main(["rules", "apply", "--flows", str(proposed), "--current-flows", str(current), "--approved-by",
                 "ana"]) == 0
    assert "already in place" in capsys.readouterr().out


def test_diff_from_topics_replays_what_the_changes_topics_hold(broker, tmp_path, monkeypatch, uid, capsys):
    cid, deal = f"tc-{uid}", f"td-{uid}"
    evs = [ev.change_event("customer", cid, 1, ev.customer("Topic Co", account="acct_t"), cid, at=T0),
           ev.change_event("deal", deal, 1, ev.deal("closed_won", [ev.line("SVC-INSTALL")]), cid, at=T0,
                           trace_id=f"trace-{deal}")]
    bs = broker.bootstrap_servers
    ensure_topics(bs, topics.CHANGES)
    produce(bs, [(topics.changes_topic(e["source_system"], e["entity_type"]), e["entity_id"].encode(),
                  CODEC.encode("change_event", e)) for e in evs])
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bs)
    flows = _on_completion(tmp_path / "flows.yaml")
    assert main(["rules", "diff", "--flows", str(flows), "--from-topics", "--since", "1h", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert command_id("create_invoice", "billing", "deal", deal) in doc["commands"]["removed"]["create_invoice"]["ids"]
    assert command_id("create_job", "dispatch", "deal", deal) in doc["commands"]["added"]["create_job"]["ids"]
    assert doc["events"] >= 2
