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


# ---- customer master data ----------------------------------------------------------------------------
BILLED_AS_CRM = {"name": "Acme", "email": "ap@acme.example", "address": "1 Main St"}
SYNC = int(CFG.customer_sync_within_s * 1000)


def moved(seq=2, at=T + H):
    """The CRM changes the customer's email (Concord sends billing update_customer)."""
    return ev.change_event("customer", "c1", seq, ev.customer("Acme", email="billing@acme.example", account="acct_1"),
                           "c1", at=at)


def billed(inv_id, at, billed_to, status="open", seq=1):
    return ev.change_event("invoice", inv_id, seq, ev.invoice(status, LINES[:1], deal_id="d1", issued_at=at,
                                                              due_at=at + 30 * 24 * H, billed_to=billed_to),
                           "c1", at=at)


def test_customer_drift_when_billing_still_invoices_under_the_old_email_after_the_deadline():
    deadline = T + H + SYNC
    status = feed([customer(), won(), moved(), billed("inv1", deadline, BILLED_AS_CRM)])
    status["commands"] = {}  # the drift alone, not the unconfirmed create_invoice
    assert timed_rules.check(status, CFG, deadline - 1).exceptions == []
    [exc] = timed_rules.check(status, CFG, deadline).exceptions
    assert exc["reason_code"] == "customer_drift" and exc["entity_type"] == "customer" and exc["entity_id"] == "c1"
    assert "email='ap@acme.example' (the CRM: 'billing@acme.example')" in exc["message"]
    assert "name=" not in exc["message"], "the fields that agree are not drift"
    assert (exc["amount_at_risk_cents"], exc["currency"]) == (25_000, "USD")


def test_no_customer_drift_for_an_invoice_issued_before_billing_had_time_or_without_its_customer_fields():
    deadline = T + H + SYNC
    early = feed([customer(), won(), moved(), billed("inv1", deadline - 1, BILLED_AS_CRM)])
    silent = feed([customer(), won(), moved(), billed("inv1", deadline, None)])
    for status in (early, silent):
        status["commands"] = {}
        assert timed_rules.check(status, CFG, deadline + 10 * H).exceptions == []
    assert timed_rules.next_due(silent, CFG, T) != deadline, "a feed without customer fields has nothing to wait for"


def test_customer_drift_closes_itself_when_billing_issues_under_the_crms_details_or_the_crm_agrees():
    deadline = T + H + SYNC
    status = feed([customer(), won(), moved(), billed("inv1", deadline, BILLED_AS_CRM)])
    status["commands"] = {}
    drifted = timed_rules.check(status, CFG, deadline).status
    taken = feed([billed("inv2", deadline + H, {**BILLED_AS_CRM, "email": " Billing@Acme.example "})],
                 status=drifted)
    assert [g["reason_code"] for g in timed_rules.check(taken, CFG, deadline + H).resolved] == ["customer_drift"]
    back = feed([ev.change_event("customer", "c1", 3, ev.customer("Acme", email="ap@acme.example", account="acct_1"),
                                 "c1", at=deadline + H)], status=drifted)
    assert [g["reason_code"] for g in timed_rules.check(back, CFG, deadline + H).resolved] == ["customer_drift"]


def test_an_address_billing_holds_in_more_detail_is_the_same_address():
    deadline = T + H + SYNC
    fuller = {**BILLED_AS_CRM, "email": "billing@acme.example", "address": "1 Main St, Leeds, LS1 4AP, GB"}
    status = feed([customer(), won(), moved(), billed("inv1", deadline, fuller)])
    status["commands"] = {}
    assert timed_rules.check(status, CFG, deadline).exceptions == []
    other = feed([customer(), won(), moved(), billed("inv1", deadline, {**fuller, "address": "9 Elm Rd, Leeds"})])
    other["commands"] = {}
    [exc] = timed_rules.check(other, CFG, deadline).exceptions
    assert "billing_address='9 Elm Rd, Leeds' (the CRM: '1 Main St')" in exc["message"]


def test_a_paid_invoice_under_the_old_details_is_drift_with_no_money_at_risk():
    deadline = T + H + SYNC
    status = feed([customer(), won(), moved(), billed("inv1", deadline, BILLED_AS_CRM),
                   billed("inv1", deadline, BILLED_AS_CRM, status="paid", seq=2)])
    status["commands"] = {}
    [exc] = timed_rules.check(status, CFG, deadline).exceptions
    assert exc["reason_code"] == "customer_drift" and exc["amount_at_risk_cents"] is None


@settings(max_examples=60, deadline=None)
@given(hours=st.integers(0, 48), crm_moves=st.booleans(), email=st.sampled_from(["ap@acme.example",
                                                                                 "billing@acme.example", None]),
       issued_h=st.integers(0, 6))
def test_customer_drift_same_facts_and_same_now_give_the_same_exceptions(hours, crm_moves, email, issued_h):
    events = [customer(), won()] + ([moved()] if crm_moves else [])
    events.append(billed("inv1", T + issued_h * H, {**BILLED_AS_CRM, "email": email}))
    status = feed(events)
    now = T + hours * H  # the fake clock
    first = timed_rules.check(clone(status), CFG, now)
    again = timed_rules.check(clone(status), CFG, now)
    assert json.dumps(first.exceptions, sort_keys=True) == json.dumps(again.exceptions, sort_keys=True)
    drift = [e for e in first.exceptions if e["reason_code"] == "customer_drift"]
    crm_email = "billing@acme.example" if crm_moves else "ap@acme.example"
    changed_at = T + H if crm_moves else T
    expected = email is not None and email != crm_email and T + issued_h * H >= changed_at + SYNC \
        and now >= changed_at + SYNC
    assert bool(drift) == expected
    steady = timed_rules.check(first.status, CFG, now)
    assert (steady.exceptions, steady.updated, steady.resolved) == ([], [], [])
