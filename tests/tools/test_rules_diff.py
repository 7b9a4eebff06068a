"""concord rules diff: replaying history through current and proposed configuration shows the known effect."""

import json

import pytest

from concord.contracts import events as ev
from concord.domain.flow_config import DEFAULT_PATH as FLOWS
from concord.domain.routing import DEFAULT_PATH as ROUTING
from concord.tools.cli import main
from concord.tools.rules_diff import read_history
from connectors.inbound.common import json_dumps

T0 = 1_767_225_600_000
LINES = [ev.line("SVC-INSTALL", 1, 50_000)]


def _history(path):
    """Two customers on the default policy with a won deal each, one on_close by choice, one with an unmapped SKU."""
    evs = [
        ev.change_event("customer", "c-1", 1, ev.customer("One", account="acct_1"), "c-1", at=T0),
        ev.change_event("deal", "d-1", 1, ev.deal("closed_won", LINES), "c-1", at=T0 + 1000,
                        trace_id="trace-d-1"),
        ev.change_event("customer", "c-2", 1, ev.customer("Two", account="acct_2"), "c-2", at=T0),
        ev.change_event("deal", "d-2", 1, ev.deal("closed_won", LINES), "c-2", at=T0 + 2000, trace_id="trace-d-2"),
        ev.change_event("customer", "c-3", 1, ev.customer("Three", account="acct_3", policy="on_close"), "c-3", at=T0),
        ev.change_event("deal", "d-3", 1, ev.deal("closed_won", LINES), "c-3", at=T0 + 3000),
        ev.change_event("customer", "c-4", 1, ev.customer("Four", account="acct_4", policy="on_close"), "c-4", at=T0),
        ev.change_event("deal", "d-4", 1, ev.deal("closed_won", [ev.line("HW-BOILER-XL", 1, 90_000)]), "c-4",
                        at=T0 + 4000, trace_id="trace-d-4"),
    ]
    path.write_text("".join(json_dumps(e) + "\n" for e in evs))
    return path


@pytest.fixture
def history(tmp_path):
    return _history(tmp_path / "history.jsonl")


@pytest.fixture
def on_completion(tmp_path):
    path = tmp_path / "flows.yaml"
    path.write_text(FLOWS.read_text().replace("default_billing_policy: on_close", "default_billing_policy: "
                                                                                  "on_completion"))
    return path


def test_moving_customers_to_on_completion_turns_create_invoice_into_create_job(history, on_completion, capsys):
    assert main(["rules", "diff", "--flows", str(on_completion), "--history", str(history), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    cmds = doc["commands"]
    assert cmds["removed"]["create_invoice"]["count"] == 2 and cmds["added"]["create_job"]["count"] == 2
    assert sorted(cmds["removed"]["create_invoice"]["examples"]) == ["trace-d-1", "trace-d-2"]
    assert set(cmds["added"]) == {"create_job"} and set(cmds["removed"]) == {"create_invoice"}
    assert not cmds["changed"] and doc["changes"] == 4 and doc["events"] == 8
    assert doc["revenue"]["invoiced_cents"] == {"before": 150_000, "after": 50_000}  # d-3 stays on_close
    assert doc["digest_before"] != doc["digest_after"] and doc["exceptions"]["added"] == {}


def test_the_printed_diff_names_types_and_trace_ids(history, on_completion, capsys):
    assert main(["rules", "diff", "--flows", str(on_completion), "--history", str(history)]) == 0
    out = capsys.readouterr().out
    assert "4 decision(s) change over 8 events" in out
    removed = next(ln for ln in out.splitlines() if ln.strip().startswith("removed") and "create_invoice" in ln)
    assert removed.split()[2] == "2" and "trace-d-1" in removed


def test_rerouting_a_reason_moves_its_exceptions_and_the_workload(history, tmp_path, capsys):
    routing = tmp_path / "routing.yaml"
    routing.write_text(ROUTING.read_text().replace("unmapped_sku: {owner: marketing-ops, backup: revenue-ops",
                                                   "unmapped_sku: {owner: finance, backup: revenue-ops"))
    assert main(["rules", "diff", "--routing", str(routing), "--history", str(history), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["exceptions"]["rerouted"]) == ["unmapped_sku/marketing-ops/high/finance"]
    assert doc["exceptions"]["rerouted"]["unmapped_sku/marketing-ops/high/finance"]["examples"] == ["trace-d-4"]
    assert doc["workload"]["marketing-ops"] == {"before": 1, "after": 0}
    assert doc["workload"]["finance"] == {"before": 0, "after": 1}
    assert doc["revenue"]["at_risk_cents"] == {"before": 90_000, "after": 90_000} and not doc["commands"]["added"]


def test_max_changes_gates_a_change(history, on_completion, capsys):
    assert main(["rules", "diff", "--flows", str(on_completion), "--history", str(history), "--max-changes",
                 "3"]) == 1
    assert "4 changes exceed --max-changes 3" in capsys.readouterr().err
    assert main(["rules", "diff", "--flows", str(on_completion), "--history", str(history), "--max-changes",
                 "4"]) == 0


def test_the_same_configuration_changes_nothing(history, capsys):
    assert main(["rules", "diff", "--flows", str(FLOWS), "--history", str(history), "--max-changes", "0"]) == 0
    assert "0 decision(s) change" in capsys.readouterr().out


def test_a_bad_history_line_or_configuration_exits_two(history, tmp_path, capsys):
    history.write_text(history.read_text() + '{"event_id": "x"}\n')
    assert main(["rules", "diff", "--flows", str(FLOWS), "--history", str(history)]) == 2
    assert "history.jsonl line 9: missing required field" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(FLOWS.read_text().replace("default_billing_policy: on_close", "default_billing_policy: weekly"))
    assert main(["rules", "diff", "--flows", str(bad), "--history", str(_history(tmp_path / "h.jsonl"))]) == 2
    assert "default_billing_policy" in capsys.readouterr().err


def test_a_simulated_month_replays_and_a_policy_change_moves_only_on_close_by_default(tmp_path, on_completion):
    import random

    from concord.domain.flow_config import load_flow_config
    from concord.domain.routing import load_routing
    from concord.tools.rules_diff import compare
    from concord.tools.simulator import business

    evs = business(random.Random(3), 30, 30, T0)
    path = tmp_path / "sim.jsonl"
    path.write_text("".join(json_dumps(e) + "\n" for e in evs))
    assert len(read_history(path)) == len(evs)
    current = (load_flow_config(FLOWS), load_routing(ROUTING))
    doc = compare(read_history(path), current, (load_flow_config(on_completion), current[1]))
    assert doc["changes"] == 0  # every simulated customer names its own policy: the default decides nothing
