"""Time-driven rules: ``(status, now) -> outcome``, pure and deterministic.

What only the passing of time reveals: a command the target never confirmed, completed work nobody invoiced,
a won deal never billed, the CRM and billing disagreeing once they had time to agree, invoices past due.
The same facts and the same ``now`` always give the same exceptions; an exception these rules raised closes
when a later check finds the data agreeing again. ``next_due`` says when a customer must next be looked at,
so a timer need only visit customers with a pending deadline.
"""

from __future__ import annotations

import time
from typing import Any

from concord.domain import confirm
from concord.domain.flow_config import FlowConfig
from concord.domain.rules import TIMED_REASONS as TIMED
from concord.domain.rules import Outcome, exception_draft, is_billable_total, sweep
from concord.domain.status import customer_record, fork, invoice_paid, invoices_of

HOUR_MS = 3_600_000
# The customer master data billing's invoice feed carries: the CRM's field -> the invoice's field.
BILLED_TO = (("name", "customer_name"), ("email", "customer_email"), ("billing_address", "customer_address"))


def when(ms: int) -> str:
    """An epoch-millisecond time as UTC text."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def check(status: dict[str, Any], cfg: FlowConfig, now: int) -> Outcome:
    """Look at one customer at ``now``: open, update and close the time-driven exceptions to match its facts."""
    st = fork(status)
    event = {"event_id": f"check:{st['key']}:{now}", "trace_id": f"check:{st['key']}", "entity_type": "customer",
             "entity_id": st["key"], "source_system": None, "occurred_at": now, "caused_by_command_id": None,
             "why": f"checked at {when(now)}"}
    out = Outcome(st)
    sweep(st, timed(st, cfg, now), now, event, out, lambda reason: reason in TIMED)
    st["overdue"] = overdue(st, now)
    out.facts["next_due"] = next_due(st, cfg, now)
    return out


def timed(st: dict[str, Any], cfg: FlowConfig, now: int) -> list[dict[str, Any]]:
    """Every exception draft the customer's facts warrant at ``now`` for the TIMED reasons."""
    drafts: list[dict[str, Any]] = []
    others = {(e["entity_type"], e["entity_id"]) for e in st["exceptions"].values()
              if e["reason_code"] not in TIMED}  # an entity already in someone's queue is not raised twice
    # entities with a command not yet confirmed: its own exception (unconfirmed, or the adapter's rejection) speaks
    waiting = {(e["entity_type"], e["entity_id"]) for e in st.get("commands", {}).values()
               if e["state"] != confirm.CONFIRMED}
    cust = st["customer"] or {}
    policy = cust.get("billing_policy") if cust.get("billing_policy") in ("on_close", "on_completion") \
        else cfg.default_billing_policy
    asked = {e["entity_id"]: (cid, e) for cid, e in confirm.pending(st)
             if e["type"] == "create_invoice" and e["entity_type"] == "job"}
    covered: set[str] = set()  # commands whose story an unbilled_work exception already tells
    for job_id, job in sorted(st["jobs"].items()):
        done = job.get("completed_at")
        if not done or job.get("deleted") or job.get("status") == "cancelled" or policy != "on_completion":
            continue
        if ("job", job_id) in others or now < done + cfg.on_time_invoice_hours * HOUR_MS:
            continue
        if any(i.get("issued") and i.get("status") != "void" for i in invoices_of(st, job_id=job_id)):
            continue
        amount = is_billable_total(job.get("lines", []), cfg)
        if amount <= 0:
            continue  # nothing billable was done
        currency = st["deals"].get(job.get("deal_id") or "", {}).get("currency")
        story = ""
        if job_id in asked:
            cid, entry = asked[job_id]
            covered.add(cid)
            story = f"; Concord asked billing for it with {cid} at {when(entry['issued_at'])} and {_said(entry)}"
        drafts.append(exception_draft(
            "unbilled_work", st, "job", job_id, job,
            f"job {job_id} was completed at {when(done)} and no invoice has been issued for it within "
            f"{cfg.on_time_invoice_hours:g}h ({amount / 100:.2f} {currency or '(currency unknown)'} of billable "
            f"work){story}",
            [{"field": "action", "value": "create_invoice", "label": "invoice the job's billable lines",
              "score": 0.8}], amount=amount, currency=currency))
    for cid, entry in confirm.pending(st):
        if now < entry["due_at"] or cid in covered:
            continue
        amount, currency = _command_money(st, entry, cfg)
        drafts.append(exception_draft(
            "command_unconfirmed", st, entry["entity_type"], entry["entity_id"],
            {"trace_id": entry["trace_id"], "event_id": cid},
            f"{entry['type']} {cid} asked {entry['target']} at {when(entry['issued_at'])} (confirm by "
            f"{when(entry['due_at'])}); {_said(entry)}; {confirm.target_says(st, entry)}",
            [{"field": "action", "value": "resend_command", "label": f"resend {entry['type']} with the same id",
              "score": 0.6}], key=(cid,), amount=amount, currency=currency))
    for deal_id, deal in sorted(st["deals"].items()):
        if not deal.get("won") or deal.get("deleted") or ("deal", deal_id) in others or ("deal", deal_id) in waiting:
            continue
        won_at = deal.get("closed_at") or deal.get("occurred_at") or 0
        if now < won_at + cfg.won_unbilled_hours * HOUR_MS:
            continue
        jobs = [j for j, job in st["jobs"].items() if job.get("deal_id") == deal_id and not job.get("deleted")]
        if policy == "on_close":
            if any(i.get("issued") for i in invoices_of(st, deal_id=deal_id)):
                continue
            missing = "no invoice"
        else:
            if jobs:
                continue
            missing = "no job"
        amount = is_billable_total(deal.get("lines", []), cfg)
        if amount <= 0:
            continue
        drafts.append(exception_draft(
            "won_not_billed", st, "deal", deal_id, deal,
            f"deal {deal_id} was won at {when(won_at)} and has {missing} after {cfg.won_unbilled_hours:g}h "
            f"(billing policy {policy}; {amount / 100:.2f} {deal.get('currency') or ''} won)",
            [], amount=amount, currency=deal.get("currency")))
    drafts += _billing_drift(st, cfg, now, waiting)
    drafts += _customer_drift(st, cfg, now, others)
    if cfg.overdue_invoice_exception:
        for inv_id, cents in sorted(overdue(st, now).items()):
            inv = st["invoices"][inv_id]
            drafts.append(exception_draft(
                "overdue_invoice", st, "invoice", inv_id, inv,
                f"invoice {inv_id} was due at {when(inv['due_at'])} and {cents / 100:.2f} {inv.get('currency')} "
                "is still unpaid", [], amount=cents, currency=inv.get("currency")))
    return drafts


def _billing_drift(st: dict[str, Any], cfg: FlowConfig, now: int,
                   waiting: set[tuple[str, str]]) -> list[dict[str, Any]]:
    """Billing says paid or void while the CRM's deal says otherwise, after the CRM had time to follow."""
    grace = int(cfg.confirm_within_s.get("update_deal_billing_status", 0) * 1000)
    drafts = []
    for inv_id, inv in sorted(st["invoices"].items()):
        if inv.get("deleted") or not inv.get("issued"):
            continue
        deal_id = inv.get("deal_id") or st["jobs"].get(inv.get("job_id") or "", {}).get("deal_id")
        deal = st["deals"].get(deal_id or "")
        if deal is None or deal.get("billing_status") is None or ("deal", deal_id) in waiting:
            continue  # the CRM has said nothing yet: an unconfirmed command says that, not drift
        billing = "void" if inv.get("status") == "void" else "paid" if invoice_paid(st, inv_id) else None
        crm = deal["billing_status"]
        if billing is None or crm == billing or (billing == "void" and crm not in ("invoiced", "paid")):
            continue
        if deal.get("invoice_id") not in (None, inv_id) and crm != "paid":
            continue  # the CRM tracks another of the deal's invoices
        if now < max(inv.get("occurred_at") or 0, deal.get("occurred_at") or 0) + grace:
            continue
        amount = inv.get("amount_due_cents") or 0
        drafts.append(exception_draft(
            "billing_drift", st, "deal", deal_id, deal,
            f"billing says invoice {inv_id} is {billing} but the CRM says deal {deal_id} billing_status={crm}",
            [{"field": "billing_status", "value": billing, "label": f"set the CRM's billing status to {billing}",
              "score": 0.8}], key=(inv_id,), amount=amount, currency=inv.get("currency")))
    return drafts


def _customer_drift(st: dict[str, Any], cfg: FlowConfig, now: int,
                    others: set[tuple[str, str]]) -> list[dict[str, Any]]:
    """Billing still issues under other master data than the CRM's after it had time to take the CRM's change.

    Billing's record is what its latest issued invoice carries (the fields its feed leaves out are not compared);
    the deadline runs from the CRM's last change of the customer, which is when Concord sent update_customer.
    """
    cust = customer_record(st)
    if not cust or cust.get("deleted") or not st["customer_id"] or ("customer", st["customer_id"]) in others:
        return []
    deadline = (cust.get("occurred_at") or 0) + int(cfg.customer_sync_within_s * 1000)
    carrying = sorted(((inv.get("issued_at") or inv.get("occurred_at") or 0), inv_id) for inv_id, inv in
                      st["invoices"].items() if inv.get("issued") and not inv.get("deleted")
                      and any(inv.get(b) is not None for _, b in BILLED_TO))
    if not carrying or now < deadline or carrying[-1][0] < deadline:
        return []  # billing has issued nothing since it had time to take the CRM's change
    issued_at, inv_id = carrying[-1]
    inv = st["invoices"][inv_id]
    differ = _differing(cust, inv)
    if not differ:
        return []
    # what billing sent since under other details may not reach the customer: its unpaid balance is at risk
    stale = [i for t, i in carrying if t >= deadline and _differing(cust, st["invoices"][i])]
    unpaid = [st["invoices"][i] for i in stale if st["invoices"][i].get("status") not in ("paid", "void")
              and not invoice_paid(st, i)]
    amount = sum(max(0, (i.get("amount_due_cents") or 0) - (i.get("amount_paid_cents") or 0)) for i in unpaid)
    said = ", ".join(f"{f}={b!r} (the CRM: {c!r})" for f, c, b in differ)
    return [exception_draft(
        "customer_drift", st, "customer", st["customer_id"], cust,
        f"billing issued invoice {inv_id} at {when(issued_at)} with {said}, although the CRM changed customer "
        f"{st['customer_id']} at {when(cust.get('occurred_at') or 0)} and billing had "
        f"{cfg.customer_sync_within_s:g}s to take it (update_customer)",
        [{"field": "action", "value": "resend_update_customer",
          "label": "send billing the CRM's customer record again", "score": 0.7}],
        amount=amount if unpaid else None, currency=unpaid[0].get("currency") if unpaid else None)]


def _differing(cust: dict[str, Any], inv: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(CRM field, the CRM's value, billing's value) for each field the invoice carries and the CRM disagrees on."""
    return [(crm, cust.get(crm), inv[billing]) for crm, billing in BILLED_TO
            if inv.get(billing) is not None and not _same(crm, cust.get(crm), inv[billing])]


def _same(field: str, crm: Any, billing: Any) -> bool:
    """Whether two systems' values of a master-data field agree; an address agrees when one contains the other.

    Billing renders a structured address on one line (street, city, postal code, country) where a CRM often
    keeps the street alone: more detail is not a different address.
    """
    a, b = _plain(crm), _plain(billing)
    if field == "billing_address" and a and b:
        return a in b or b in a
    return a == b


def _plain(value: Any) -> str | None:
    """A master-data value as compared across systems: case and runs of spaces do not count."""
    return None if value is None else " ".join(str(value).split()).casefold()


def overdue(st: dict[str, Any], now: int) -> dict[str, int]:
    """Invoice id -> cents still due, for every issued invoice past its due date and not paid."""
    out = {}
    for inv_id, inv in sorted(st["invoices"].items()):
        due = inv.get("due_at")
        if inv.get("deleted") or not inv.get("issued") or inv.get("status") in ("void", "paid") or not due:
            continue
        if now >= due and not invoice_paid(st, inv_id):
            out[inv_id] = max(0, (inv.get("amount_due_cents") or 0) - (inv.get("amount_paid_cents") or 0))
    return out


def next_due(st: dict[str, Any], cfg: FlowConfig, now: int) -> int | None:
    """The earliest time after ``now`` at which a time-driven rule could change its mind about this customer."""
    times: list[int] = [e["due_at"] for _, e in confirm.pending(st)]
    for job in st["jobs"].values():
        if job.get("completed_at") and not job.get("deleted"):
            times.append(int(job["completed_at"] + cfg.on_time_invoice_hours * HOUR_MS))
    for deal in st["deals"].values():
        if deal.get("won") and not deal.get("deleted"):
            won_at = deal.get("closed_at") or deal.get("occurred_at") or 0
            times.append(int(won_at + cfg.won_unbilled_hours * HOUR_MS))
    grace = int(cfg.confirm_within_s.get("update_deal_billing_status", 0) * 1000)
    for inv in st["invoices"].values():
        if inv.get("issued") and not inv.get("deleted"):
            if inv.get("due_at") and inv.get("status") not in ("paid", "void"):
                times.append(int(inv["due_at"]))
            times.append(int((inv.get("occurred_at") or 0) + grace))
    cust = st.get("customer") or {}
    if cust and not cust.get("deleted") and any(inv.get(b) is not None for inv in st["invoices"].values()
                                                for _, b in BILLED_TO):  # only billing's invoices show its record
        times.append(int((cust.get("occurred_at") or 0) + cfg.customer_sync_within_s * 1000))
    later = [t for t in times if t > now]
    return min(later) if later else None


def open_timed(st: dict[str, Any]) -> bool:
    """Whether the customer has an open exception only a time-driven check can close."""
    return any(e["reason_code"] in TIMED for e in st.get("exceptions", {}).values())


def _said(entry: dict[str, Any]) -> str:
    """What the adapter reported about a command, in words."""
    rep = entry["adapter"]
    if not rep:
        return "no adapter has reported an outcome"
    return (f"the adapter reported {rep['outcome']}" + (f" ({rep['ref']})" if rep["ref"] else "")
            + f" at {when(rep['at'])}" + (f": {rep['detail']}" if rep["detail"] else ""))


def _command_money(st: dict[str, Any], entry: dict[str, Any], cfg: FlowConfig) -> tuple[int | None, str | None]:
    expect = entry["expect"]
    if "amount_cents" in expect:
        deal = st["deals"].get(expect.get("deal_id") or "", {})
        return int(expect["amount_cents"]), deal.get("currency")
    inv = st["invoices"].get(expect.get("invoice_id") or "")
    if inv:
        return inv.get("amount_due_cents"), inv.get("currency")
    deal = st["deals"].get(expect.get("deal_id") or "")
    if deal:
        return deal.get("amount_cents"), deal.get("currency")
    return None, None
