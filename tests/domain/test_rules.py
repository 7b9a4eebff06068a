"""The flow rules as pure functions: each flow's commands and exceptions, without a broker."""

import json

import pytest

from concord.contracts import events as ev
from concord.domain.flow_config import load_flow_config
from concord.domain.rules import command_id, decide, stable_id

CFG = load_flow_config()
T0 = 1_700_000_000_000
LINES = [ev.line("SVC-INSTALL", 1, 50_000), ev.line("HW-THERMO", 2, 15_000)]


class Customer:
    """One customer's status, fed event by event, remembering everything the rules emitted."""

    def __init__(self, cid="c1", cfg=CFG, **customer_kw):
        self.cid, self.cfg, self.status, self.seqs = cid, cfg, None, {}
        self.commands, self.opened, self.resolved, self.facts = [], [], [], []
        if not customer_kw.pop("skip", False):
            self.send("customer", cid, ev.customer("Acme Heating", email="ap@acme.example", account="acct_1",
                                                   **customer_kw))

    def send(self, entity, entity_id, payload, op="update", customer_id="__same__", at=T0, **kw):
        seq = self.seqs[entity_id] = self.seqs.get(entity_id, 0) + 1
        cid = self.cid if customer_id == "__same__" else customer_id
        out = decide(self.status, ev.change_event(entity, entity_id, seq, payload, cid, at=at, op=op, **kw),
                     self.cfg, at)
        self.status = out.status
        self.commands += out.commands
        self.opened += out.exceptions
        self.resolved += out.resolved
        self.facts.append(out.facts)
        return out

    def of_type(self, ctype):
        return [c for c in self.commands if c["type"] == ctype]


def payload(cmd):
    return json.loads(cmd["payload"])


def test_closed_won_with_billing_details_creates_one_invoice_on_close():
    c = Customer()
    c.send("deal", "d1", ev.deal("open", LINES))
    assert c.of_type("create_invoice") == []
    out = c.send("deal", "d1", ev.deal("closed_won", LINES, closed_at=T0))
    [cmd] = [x for x in out.commands if x["type"] == "create_invoice"]
    body = payload(cmd)
    assert cmd["target_system"] == "billing" and cmd["entity_id"] == "d1"
    assert body["billing_account_id"] == "acct_1" and body["amount_cents"] == 80_000
    assert [ln["price_id"] for ln in body["lines"]] == ["price_install_std", "price_thermostat"]
    assert cmd["command_id"] == command_id("create_invoice", "billing", "deal", "d1")
    assert cmd["command_id"].startswith("cmd_") and cmd["command_id"] != stable_id("create_invoice", "billing",
                                                                                    "deal", "d2")
    assert cmd["trace_id"] == "trace:deal:d1" and "deal:d1:2" in cmd["caused_by"]
    c.send("deal", "d1", ev.deal("closed_won", LINES, closed_at=T0, name="renamed"))
    assert len(c.of_type("create_invoice")) == 1, "a later update of a won deal must not bill it again"


def test_missing_billing_account_opens_exception_with_prior_link_then_resolves_when_crm_fixes_it():
    c = Customer(skip=True)
    c.send("customer", "c1", ev.customer("Acme", email="ap@acme.example", account=None,
                                         external_ids={"stripe": "cus_9"}))
    out = c.send("deal", "d1", ev.deal("closed_won", LINES))
    [exc] = out.exceptions
    assert exc["reason_code"] == "missing_billing_account" and exc["entity_id"] == "d1"
    assert "no billing account id" in exc["message"]
    assert exc["suggestions"][0]["value"] == "cus_9" and exc["suggestions"][0]["field"] == "billing_account_id"
    assert c.of_type("create_invoice") == []
    assert list(c.status["exceptions"]) == [exc["exception_id"]]
    out = c.send("customer", "c1", ev.customer("Acme", email="ap@acme.example", account="cus_9"))
    assert [x["type"] for x in out.commands if x["type"] == "create_invoice"] == ["create_invoice"]
    assert [r["exception_id"] for r in out.resolved] == [exc["exception_id"]]
    assert c.status["exceptions"] == {}


def test_unmapped_sku_names_the_sku_and_suggests_close_catalog_entries():
    c = Customer()
    out = c.send("deal", "d1", ev.deal("closed_won", [ev.line("SVC-INSTAL", 1)]))
    [exc] = out.exceptions
    assert exc["reason_code"] == "unmapped_sku" and "SVC-INSTAL" in exc["message"]
    assert "SVC-INSTALL" in [s["value"] for s in exc["suggestions"]]


def test_missing_terms_and_unknown_customer():
    c = Customer(terms=None)
    assert [e["reason_code"] for e in c.send("deal", "d1", ev.deal("closed_won", LINES)).exceptions] == [
        "missing_billing_terms"]
    u = Customer(cid=None, skip=True)
    out = u.send("deal", "d9", ev.deal("closed_won", LINES))
    assert [e["reason_code"] for e in out.exceptions] == ["unknown_customer"] and out.commands == []
    assert u.status["key"] == "unknown:deal:d9"


def test_bill_on_completion_creates_a_job_then_invoices_the_completed_job():
    c = Customer(policy="on_completion")
    out = c.send("deal", "d1", ev.deal("closed_won", LINES))
    [job_cmd] = [x for x in out.commands if x["type"] == "create_job"]
    assert job_cmd["target_system"] == "dispatch" and payload(job_cmd)["deal_id"] == "d1"
    c.send("job", "j1", ev.job("scheduled", LINES + [ev.line("TRAVEL", 1, 5000)], deal_id="d1"))
    assert c.of_type("create_invoice") == [] and c.status["deals"]["d1"]["position"] == "scheduled"
    out = c.send("job", "j1", ev.job("completed", LINES + [ev.line("TRAVEL", 1, 5000)], deal_id="d1",
                                     completed_at=T0))
    [inv_cmd] = [x for x in out.commands if x["type"] == "create_invoice"]
    body = payload(inv_cmd)
    assert body["job_id"] == "j1" and body["deal_id"] == "d1"
    assert body["amount_cents"] == 80_000, "TRAVEL is not billable and must not be invoiced"
    assert c.status["jobs"]["j1"]["position"] == "completed"


def test_completed_job_without_deal_is_unlinked():
    c = Customer(policy="on_completion")
    c.send("deal", "d7", ev.deal("closed_won", LINES))
    out = c.send("job", "j2", ev.job("completed", LINES, deal_id=None, completed_at=T0))
    [exc] = out.exceptions
    assert exc["reason_code"] == "unlinked_job" and "no deal" in exc["message"]
    assert [s["value"] for s in exc["suggestions"]] == ["d7"]


def test_invoice_issued_then_paid_updates_the_deal_and_times_the_invoice():
    c = Customer(policy="on_completion")
    c.send("deal", "d1", ev.deal("closed_won", LINES))
    c.send("job", "j1", ev.job("completed", LINES, deal_id="d1", completed_at=T0))
    c.send("invoice", "in1", ev.invoice("draft", LINES, job_id="j1"))
    assert c.of_type("update_deal_billing_status") == []
    out = c.send("invoice", "in1", ev.invoice("open", LINES, job_id="j1", issued_at=T0 + 3_600_000))
    [upd] = out.commands
    assert upd["type"] == "update_deal_billing_status" and upd["target_system"] == "crm"
    assert payload(upd) == {"deal_id": "d1", "billing_status": "invoiced", "invoice_id": "in1"}
    assert out.facts["invoice_on_time"] is True
    out = c.send("payment", "p1", ev.payment("succeeded", "in1", 80_000))
    assert [payload(x)["billing_status"] for x in out.commands] == ["paid"]
    assert c.status["deals"]["d1"]["position"] == "paid"
    c.send("invoice", "in1", ev.invoice("paid", LINES, job_id="j1", issued_at=T0 + 3_600_000))
    assert len(c.of_type("update_deal_billing_status")) == 2, "invoice paid after the payment adds nothing"


def test_late_invoice_is_not_on_time():
    c = Customer(policy="on_completion")
    c.send("job", "j1", ev.job("completed", LINES, deal_id="d1", completed_at=T0))
    out = c.send("invoice", "in1", ev.invoice("open", LINES, job_id="j1", issued_at=T0 + 72 * 3_600_000))
    assert out.facts["invoice_on_time"] is False


def test_an_invoice_seen_before_the_jobs_completion_is_judged_once_when_the_completion_arrives():
    c = Customer(policy="on_completion")
    c.send("job", "j1", ev.job("scheduled", LINES, deal_id="d1"))
    out = c.send("invoice", "in1", ev.invoice("open", LINES, job_id="j1", issued_at=T0 + 72 * 3_600_000))
    assert "invoice_on_time" not in out.facts, "the work is not known to be done yet"
    out = c.send("job", "j1", ev.job("completed", LINES, deal_id="d1", completed_at=T0))
    assert out.facts["invoice_on_time"] is False
    out = c.send("job", "j1", ev.job("completed", LINES, deal_id="d1", completed_at=T0))
    assert "invoice_on_time" not in out.facts, "judged once"


def test_payment_failed_goes_to_finance_with_attempts_and_closes_when_paid():
    c = Customer()
    c.send("invoice", "in1", ev.invoice("open", LINES, deal_id="d1", issued_at=T0))
    c.send("payment", "p1", ev.payment("failed", "in1", 80_000, attempt=1, failure_reason="card_declined"))
    out = c.send("payment", "p1", ev.payment("failed", "in1", 80_000, attempt=2, failure_reason="card_declined"))
    assert out.exceptions == [], "a second failed attempt updates the open exception, it does not open another"
    [exc] = c.opened
    assert exc["reason_code"] == "payment_failed" and "in1" in exc["message"] and "attempt 1" in exc["message"]
    out = c.send("payment", "p1", ev.payment("succeeded", "in1", 80_000, attempt=3))
    assert [r["reason_code"] for r in out.resolved] == ["payment_failed"]


def test_job_cancelled_after_invoicing_voids_or_raises_by_policy():
    for policy, expect in (("void_invoice", "void_invoice"), ("exception", None)):
        cfg = CFG.model_copy(update={"cancelled_after_invoice": policy})
        c = Customer(cfg=cfg, policy="on_completion")
        c.send("job", "j1", ev.job("completed", LINES, deal_id="d1", completed_at=T0))
        c.send("invoice", "in1", ev.invoice("open", LINES, job_id="j1", issued_at=T0))
        out = c.send("job", "j1", ev.job("cancelled", LINES, deal_id="d1", completed_at=T0))
        if expect:
            assert [x["type"] for x in out.commands] == ["void_invoice"]
            assert payload(out.commands[0])["invoice_id"] == "in1"
        else:
            assert out.commands == [] and [e["reason_code"] for e in out.exceptions] == ["invoiced_job_cancelled"]


def test_customer_master_data_change_updates_billing_and_dispatch_once_per_version():
    c = Customer()
    assert sorted(x["target_system"] for x in c.of_type("update_customer")) == ["billing", "dispatch"]
    c.send("customer", "c1", ev.customer("Acme Heating", email="ap@acme.example", account="acct_1", policy="on_close"))
    assert len(c.of_type("update_customer")) == 2, "a policy change is not master data for billing or dispatch"
    out = c.send("customer", "c1", ev.customer("Acme Heating", email="new@acme.example", account="acct_1"))
    assert sorted(x["target_system"] for x in out.commands) == ["billing", "dispatch"]
    assert payload(out.commands[0])["email"] == "new@acme.example"


def test_an_echo_of_our_own_command_updates_status_but_commands_nothing_back_to_its_source():
    c = Customer()
    c.send("deal", "d1", ev.deal("closed_won", LINES))
    c.send("invoice", "in1", ev.invoice("open", LINES, deal_id="d1", issued_at=T0))
    echo = c.send("deal", "d1", ev.deal("closed_won", LINES, billing_status="invoiced"),
                  caused_by_command_id="cmd-x")
    assert echo.commands == [] and c.status["deals"]["d1"]["billing_status"] == "invoiced"


def test_amount_mismatch_beyond_tolerance_only():
    c = Customer()
    c.send("deal", "d1", ev.deal("closed_won", LINES))
    ok = c.send("invoice", "in1", ev.invoice("open", LINES, deal_id="d1", amount_due_cents=80_050, issued_at=T0))
    assert ok.exceptions == []
    bad = c.send("invoice", "in2", ev.invoice("open", LINES, deal_id="d1", amount_due_cents=90_000, issued_at=T0))
    reasons = sorted(e["reason_code"] for e in bad.exceptions)
    assert reasons == ["amount_mismatch", "duplicate_invoice"]
    [mm] = [e for e in bad.exceptions if e["reason_code"] == "amount_mismatch"]
    assert "900.00" in mm["message"] and "800.00" in mm["message"] and mm["suggestions"][0]["value"] == "80000"


def test_orphan_invoice_and_payment_without_invoice():
    c = Customer()
    assert [e["reason_code"] for e in c.send("invoice", "in1", ev.invoice("open", LINES, issued_at=T0)).exceptions] \
        == ["orphan_invoice"]
    assert [e["reason_code"] for e in c.send("payment", "p1", ev.payment("succeeded", None, 5)).exceptions] == [
        "payment_without_invoice"]


def test_older_event_never_overwrites_newer_state():
    c = Customer()
    c.send("deal", "d1", ev.deal("open", LINES))
    c.send("deal", "d1", ev.deal("closed_won", LINES))
    before = c.status
    out = decide(before, ev.change_event("deal", "d1", 1, ev.deal("open", LINES), "c1", at=T0), CFG, T0)
    assert out.facts == {"stale": True} and out.status["deals"]["d1"]["stage"] == "closed_won" and not out.commands


def test_flow_config_rejects_bad_policy_with_the_line(tmp_path):
    from concord.domain.flow_config import load_flow_config as load
    from concord.exceptions import ConfigError

    bad = tmp_path / "flows.yaml"
    bad.write_text("catalog:\n  A: {price_id: p}\ndefault_billing_policy: whenever\n")
    with pytest.raises(ConfigError, match=r"flows.yaml:3: default_billing_policy"):
        load(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("catalog:\n  A: {price_id: p}\n")
    assert load(ok).default_billing_policy == "on_close"


def test_routing_rejects_unknown_owner_with_the_line(tmp_path):
    from concord.domain.routing import load_routing
    from concord.exceptions import ConfigError

    bad = tmp_path / "routing.yaml"
    bad.write_text("default: {owner: finance, sla: 1d}\nreasons:\n  a: {owner: finance, sla: 2h}\n"
                   "  b: {owner: sales, sla: 2h}\n")
    with pytest.raises(ConfigError, match=r"routing.yaml:4: reasons.b.owner: .*'sales' is not one of"):
        load_routing(bad)
    bad.write_text("default: {owner: finance, sla: soon}\nreasons: {}\n")
    with pytest.raises(ConfigError, match=r"routing.yaml:1: default.sla: .*not a duration"):
        load_routing(bad)


def test_partial_update_changes_only_the_named_fields():
    c = Customer()
    c.send("deal", "d1", ev.deal("open", LINES, name="Boiler swap"))
    partial = ev.deal("closed_won", [], name="")  # a CDC update that carries only the stage
    c.send("deal", "d1", partial, changed=["stage"])
    deal = c.status["deals"]["d1"]
    assert deal["stage"] == "closed_won" and deal["name"] == "Boiler swap" and deal["lines"] == LINES
    assert [x["type"] for x in c.of_type("create_invoice")] == ["create_invoice"]
