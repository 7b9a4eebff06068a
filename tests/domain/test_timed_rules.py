"""The closed loop without a broker: command confirmations and each time-driven rule, with a fake clock."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from concord.contracts import events as ev
from concord.domain import confirm, timed_rules
from concord.domain.flow_config import load_flow_config
from concord.domain.rules import command_id, decide
from concord.domain.status import clone

CFG = load_flow_config()
T = 1_767_225_600_000  # 2026-01-01T00:00Z
H = 3_600_000
LINES = [ev.line("SVC-INSTALL", 1, 25_000), ev.line("TRAVEL", 1, 5_000)]  # 250.00 billable, travel not


def feed(events, cfg=CFG, status=None, now=T):
    for e in events:
        status = decide(status, e, cfg, now).status
    return status


def customer(policy="on_close"):
    return ev.change_event("customer", "c1", 1, ev.customer("Acme", email="ap@acme.example", account="acct_1",
                                                            policy=policy), "c1", at=T)


def won(seq=1):
    return ev.change_event("deal", "d1", seq, ev.deal("closed_won", LINES, closed_at=T), "c1", at=T)


def invoice(status="open", seq=1, at=T + H, echo=None, amount=None, **links):
    links = links or {"deal_id": "d1"}
    return ev.change_event("invoice", "inv1", seq, ev.invoice(status, LINES[:1], issued_at=at, due_at=at + 30 * 24 * H,
                                                              amount_due_cents=amount, **links), "c1", at=at,
                           caused_by_command_id=echo)


def reported(cid, outcome="applied", at=T + 1000, ref="inv1"):
    return {"command_id": cid, "outcome": outcome, "target_ref": ref, "reported_at": at, "detail": "",
            "adapter": "sandbox"}


def open_reasons(status):
    return sorted(e["reason_code"] for e in status["exceptions"].values())


CREATE = command_id("create_invoice", "billing", "deal", "d1")


# ---- confirmations -----------------------------------------------------------------------------------
def test_an_issued_command_is_followed_with_its_deadline_from_flows_yaml():
    status = feed([customer(), won()])
    entry = status["commands"][CREATE]
    assert entry["state"] == "issued" and entry["issued_at"] == T
    assert entry["due_at"] == T + int(CFG.confirm_within_s["create_invoice"] * 1000)
    assert entry["expect"] == {"deal_id": "d1", "amount_cents": 25_000}
    # update_customer has no feed that can confirm it, so it is not followed
    assert {e["type"] for e in status["commands"].values()} == {"create_invoice"}


def test_the_adapters_report_moves_the_command_to_applied_but_never_back_from_confirmed():
    status = feed([customer(), won()])
    assert confirm.record_outcome(status, reported(CREATE))
    assert status["commands"][CREATE]["state"] == "applied"
    assert status["commands"][CREATE]["adapter"]["ref"] == "inv1"
    status = feed([invoice()], status=status)
    assert status["commands"][CREATE]["state"] == "confirmed"
    confirm.record_outcome(status, reported(CREATE, "duplicate", at=T + 5000))
    assert status["commands"][CREATE]["state"] == "confirmed"
    assert not confirm.record_outcome(status, reported("cmd_not_followed"))


def test_confirmed_by_the_echo_carrying_the_command_id():
    status = feed([customer(), won(), invoice(echo=CREATE, deal_id=None, job_id=None)])
    entry = status["commands"][CREATE]
    assert entry["state"] == "confirmed" and entry["confirmed_by"].startswith("echo in billing invoice inv1")


def test_confirmed_by_the_matching_record_for_each_followed_type():
    status = feed([customer(), won(), invoice(), invoice("paid", seq=2, at=T + 2 * H)])
    assert status["commands"][CREATE]["confirmed_by"] == "billing invoice inv1"
    paid = command_id("update_deal_billing_status", "crm", "deal", "d1", "paid", "inv1")
    invoiced = command_id("update_deal_billing_status", "crm", "deal", "d1", "invoiced", "inv1")
    assert status["commands"][paid]["state"] == "issued"
    crm = ev.change_event("deal", "d1", 2, ev.deal("closed_won", LINES, closed_at=T, billing_status="paid"), "c1",
                          at=T + 3 * H)
    status = feed([crm], status=status)
    # "paid" in the CRM also confirms the earlier "invoiced": the CRM moved past it
    assert status["commands"][paid]["state"] == status["commands"][invoiced]["state"] == "confirmed"
    job_status = feed([customer("on_completion"), won()])
    create_job = command_id("create_job", "dispatch", "deal", "d1")
    assert job_status["commands"][create_job]["state"] == "issued"
    job = ev.change_event("job", "j1", 1, ev.job("scheduled", LINES, deal_id="d1"), "c1", at=T + H)
    assert feed([job], status=job_status)["commands"][create_job]["confirmed_by"] == "dispatch job j1"


# ---- command_unconfirmed -------------------------------------------------------------------------------
def test_unconfirmed_after_its_deadline_says_what_was_asked_what_the_adapter_said_and_what_billing_says():
    status = feed([customer(), won()])
    confirm.record_outcome(status, reported(CREATE))
    due = status["commands"][CREATE]["due_at"]
    assert timed_rules.check(status, CFG, due - 1).exceptions == []
    out = timed_rules.check(status, CFG, due)
    [exc] = out.exceptions
    assert exc["reason_code"] == "command_unconfirmed" and exc["entity_id"] == "d1"
    assert f"create_invoice {CREATE} asked billing at 2026-01-01 00:00:00 UTC" in exc["message"]
    assert "the adapter reported applied (inv1)" in exc["message"]
    assert "billing shows no invoice for deal d1" in exc["message"]
    assert (exc["amount_at_risk_cents"], exc["currency"]) == (25_000, "USD")


def test_unconfirmed_closes_itself_when_the_confirmation_arrives_late():
    status = feed([customer(), won()])
    due = status["commands"][CREATE]["due_at"]
    status = timed_rules.check(status, CFG, due).status
    assert open_reasons(status) == ["command_unconfirmed"]
    status = feed([invoice(at=due + H)], status=status, now=due + H)
    assert open_reasons(status) == ["command_unconfirmed"], "only a time-driven check closes a timed exception"
    out = timed_rules.check(status, CFG, due + H)
    assert [g["reason_code"] for g in out.resolved] == ["command_unconfirmed"]
    assert open_reasons(out.status) == []


def test_a_rejected_command_is_not_also_unconfirmed():
    status = feed([customer(), won()])
    confirm.record_outcome(status, reported(CREATE, "rejected"))
    assert timed_rules.check(status, CFG, T + 100 * H).exceptions == []


# ---- unbilled work, won but not billed ------------------------------------------------------------------
def completed_job(at=T + H):
    return ev.change_event("job", "j1", 1, ev.job("completed", LINES, deal_id="d1", completed_at=at), "c1", at=at)


def test_unbilled_work_once_on_time_invoice_hours_pass_without_an_invoice():
    status = feed([customer("on_completion"), won(), completed_job()])
    deadline = T + H + int(CFG.on_time_invoice_hours * H)
    before = timed_rules.check(status, CFG, deadline - 1)
    assert "unbilled_work" not in [e["reason_code"] for e in before.exceptions]
    assert before.facts["next_due"] <= deadline
    out = timed_rules.check(status, CFG, deadline)
    [exc] = [e for e in out.exceptions if e["reason_code"] == "unbilled_work"]
    assert exc["entity_id"] == "j1" and exc["amount_at_risk_cents"] == 25_000 and exc["currency"] == "USD"
    assert "no invoice has been issued for it within 48h" in exc["message"]
    status = feed([invoice(at=deadline + H, job_id="j1", deal_id="d1")], status=out.status, now=deadline + H)
    closed = timed_rules.check(status, CFG, deadline + H)
    assert "unbilled_work" in [g["reason_code"] for g in closed.resolved]


def test_won_not_billed_when_no_command_is_waiting_for_confirmation():
    cfg = CFG.model_copy(update={"confirm_within_s": {}})  # nothing followed: the backstop rule speaks
    status = feed([customer(), won()], cfg=cfg)
    limit = T + int(cfg.won_unbilled_hours * H)
    assert timed_rules.check(status, cfg, limit - 1).exceptions == []
    [exc] = timed_rules.check(status, cfg, limit).exceptions
    assert exc["reason_code"] == "won_not_billed" and exc["amount_at_risk_cents"] == 25_000
    # with create_invoice followed, the unconfirmed command is the one exception, not both
    followed = feed([customer(), won()])
    reasons = [e["reason_code"] for e in timed_rules.check(followed, CFG, limit).exceptions]
    assert reasons == ["command_unconfirmed"]


# ---- drift and overdue --------------------------------------------------------------------------------
def test_billing_drift_when_billing_says_paid_and_the_crm_still_says_invoiced():
    crm_invoiced = ev.change_event("deal", "d1", 2, ev.deal("closed_won", LINES, closed_at=T,
                                                            billing_status="invoiced"), "c1", at=T + 2 * H)
    status = feed([customer(), won(), invoice(), crm_invoiced, invoice("paid", seq=2, at=T + 3 * H)])
    cfg = CFG.model_copy(update={"confirm_within_s": {"update_deal_billing_status": 60}})
    status["commands"] = {}  # judge the drift alone, not the unconfirmed update of the CRM
    grace_end = T + 3 * H + 60_000
    assert timed_rules.check(status, cfg, grace_end - 1).exceptions == []
    [exc] = timed_rules.check(status, cfg, grace_end).exceptions
    assert exc["reason_code"] == "billing_drift" and exc["entity_id"] == "d1"
    assert exc["message"] == "billing says invoice inv1 is paid but the CRM says deal d1 billing_status=invoiced"
    assert exc["amount_at_risk_cents"] == 25_000
    crm_paid = ev.change_event("deal", "d1", 3, ev.deal("closed_won", LINES, closed_at=T, billing_status="paid"),
                               "c1", at=T + 4 * H)
    drifted = timed_rules.check(status, cfg, grace_end).status
    agreed = timed_rules.check(feed([crm_paid], status=drifted, cfg=cfg), cfg, T + 5 * H)
    assert [g["reason_code"] for g in agreed.resolved] == ["billing_drift"]


def test_overdue_invoices_are_a_status_field_and_an_exception_only_where_policy_says():
    status = feed([customer(), won(), invoice()])
    due = T + H + 30 * 24 * H
    status["commands"] = {}
    assert timed_rules.check(status, CFG, due - 1).status["overdue"] == {}
    out = timed_rules.check(status, CFG, due)
    assert out.status["overdue"] == {"inv1": 25_000} and out.exceptions == []
    strict = CFG.model_copy(update={"overdue_invoice_exception": True})
    [exc] = timed_rules.check(status, strict, due).exceptions
    assert exc["reason_code"] == "overdue_invoice" and exc["amount_at_risk_cents"] == 25_000


def test_amount_mismatch_carries_the_invoice_amount_at_risk():
    status = feed([customer(), won(), invoice(amount=99_000)])
    [exc] = [e for e in status["exceptions"].values() if e["reason_code"] == "amount_mismatch"]
    assert (exc["amount_at_risk_cents"], exc["currency"]) == (99_000, "USD")


# ---- determinism ---------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(hours=st.integers(0, 24 * 60), policy=st.sampled_from(["on_close", "on_completion"]),
       invoiced=st.booleans(), reported_as=st.sampled_from([None, "applied", "rejected", "failed"]))
def test_same_facts_and_same_now_give_the_same_exceptions(hours, policy, invoiced, reported_as):
    events = [customer(policy), won()] + ([completed_job()] if policy == "on_completion" else [])
    events += [invoice(job_id="j1", deal_id="d1")] if invoiced else []
    status = feed(events)
    for cid in list(status["commands"]):
        if reported_as:
            confirm.record_outcome(status, reported(cid, reported_as))
    now = T + hours * H  # the fake clock
    first = timed_rules.check(clone(status), CFG, now)
    again = timed_rules.check(clone(status), CFG, now)
    assert json.dumps(first.exceptions, sort_keys=True) == json.dumps(again.exceptions, sort_keys=True)
    assert first.status["exceptions"].keys() == again.status["exceptions"].keys()
    # checking again at the same time changes nothing: no exception opens, updates or closes twice
    steady = timed_rules.check(first.status, CFG, now)
    assert (steady.exceptions, steady.updated, steady.resolved) == ([], [], [])
    nd = first.facts["next_due"]
    assert nd is None or nd > now
