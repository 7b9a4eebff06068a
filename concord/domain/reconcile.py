"""Where the systems disagree, from the status table and what the rules warrant: pure, no broker.

In a live pipeline a warranted command is simply issued. In an audit of today's exports the same command
says something is missing in a system: a won deal that billing never invoiced, a CRM deal whose billing
status lags its invoice. Each such command, unless the exports show it already carried out, is a
disagreement; so is every exception the rules leave open. ``findings`` returns both as ``Finding``s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from concord.domain.routing import Routing
from concord.domain.status import invoice_paid, invoices_of

# reason -> (the system whose record is right, the fix an owner makes there)
TRUTH: dict[str, tuple[str, str]] = {
    "unbilled_work": ("billing", "create the invoice in billing for the sold or completed work"),
    "unscheduled_sale": ("dispatch", "schedule the job in dispatch for the won deal"),
    "billing_drift": ("crm", "set the deal's billing status in the CRM to what billing shows"),
    "cancelled_work_invoiced": ("billing", "void the invoice of the cancelled job in billing"),
    "missing_billing_account": ("crm", "enter the billing account id on the CRM account"),
    "missing_billing_terms": ("crm", "enter the billing terms on the CRM account"),
    "unmapped_sku": ("crm", "map the SKU to a billing price in flows.yaml or correct it on the deal"),
    "unknown_customer": ("crm", "link the record to its CRM account"),
    "unlinked_job": ("dispatch", "enter the deal on the job in dispatch"),
    "amount_mismatch": ("billing", "correct the invoice amount in billing to the lines it bills"),
    "duplicate_invoice": ("billing", "void the duplicate invoice in billing"),
    "orphan_invoice": ("billing", "link the invoice to its deal or job in billing"),
    "payment_without_invoice": ("billing", "apply the payment to its invoice in billing"),
    "payment_failed": ("billing", "collect the payment again or contact the customer"),
    "invoiced_job_cancelled": ("billing", "void or credit the invoice of the cancelled job"),
}
_DEAL_BILLING_RANK = {None: 0, "": 0, "not_invoiced": 0, "invoiced": 1, "paid": 2}


@dataclass(frozen=True)
class Finding:
    """One disagreement between systems, with the evidence each system gave."""

    kind: str
    owner: str
    severity: str
    customer_id: str | None
    entity_type: str
    entity_id: str
    amount_cents: int
    currency: str
    since: int | None  # when the record it is about last changed (epoch ms), for aging
    message: str
    evidence: dict[str, str] = field(default_factory=dict)  # system -> what its records say
    source_of_truth: str = ""
    fix: str = ""
    trace_id: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        """What identifies the disagreement: its kind and the record it is about."""
        return (self.kind, self.entity_type, self.entity_id)


def findings(statuses: dict[Any, dict[str, Any]], commands: list[dict[str, Any]],
             exceptions: list[dict[str, Any]], routing: Routing) -> list[Finding]:
    """Every disagreement: open exceptions, and warranted commands the exports do not show as done."""
    by_customer = {st.get("key") or st.get("customer_id"): st for st in statuses.values() if isinstance(st, dict)}
    out: dict[tuple[str, str, str], Finding] = {}
    latest: dict[str, dict[str, Any]] = {}
    for rec in exceptions:
        latest[rec["exception_id"]] = rec
    for rec in latest.values():
        if rec.get("state") in ("resolved", "discarded"):
            continue
        st = by_customer.get(rec.get("customer_id") or f"unknown:{rec['entity_type']}:{rec['entity_id']}")
        f = _finding(rec["reason_code"], rec, st, routing, rec["message"], rec.get("trace_id") or "")
        out.setdefault(f.key, f)
    for cmd in commands:
        st = by_customer.get(cmd.get("customer_id") or "")
        if st is None:
            continue
        gap = _unmet(cmd, st)
        if gap is None:
            continue
        kind, message = gap
        f = _finding(kind, cmd, st, routing, message, cmd.get("trace_id") or "")
        out.setdefault(f.key, f)
    for st in by_customer.values():  # records no export ties to a customer: the rules alone say nothing of some
        if st.get("customer_id"):
            continue
        for etype, coll in (("deal", "deals"), ("job", "jobs"), ("invoice", "invoices"), ("payment", "payments")):
            for eid, rec in sorted(st[coll].items()):
                if any(k[1:] == (etype, eid) for k in out) or rec.get("deleted"):
                    continue
                ref = {"entity_type": etype, "entity_id": eid, "customer_id": None,
                       "source_system": {"deal": "crm", "job": "dispatch"}.get(etype, "billing")}
                f = _finding("unknown_customer", ref, st, routing, f"{etype} {eid} belongs to no customer the CRM "
                             "export knows (no account id, or a native customer id no account links to)",
                             rec.get("trace_id") or "")
                out.setdefault(f.key, f)
    return sorted(out.values(), key=lambda f: (f.owner, f.kind, f.customer_id or "", f.entity_id))


def _unmet(cmd: dict[str, Any], st: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, message) when the exports show ``cmd`` not carried out; None when it was (or is not checkable)."""
    ctype, eid = cmd["type"], cmd["entity_id"]
    if ctype == "create_invoice":
        kw = {"deal_id": eid} if cmd["entity_type"] == "deal" else {"job_id": eid}
        if any(i.get("status") != "void" for i in invoices_of(st, **kw)):
            return None
        what = "won deal" if cmd["entity_type"] == "deal" else "completed job"
        return "unbilled_work", f"{what} {eid} has no invoice in billing"
    if ctype == "create_job":
        if any(j.get("deal_id") == eid and not j.get("deleted") for j in st["jobs"].values()):
            return None
        return "unscheduled_sale", f"won deal {eid} (billed on completion) has no job in dispatch"
    if ctype == "update_deal_billing_status":
        want = json.loads(cmd["payload"])["billing_status"]
        deal = st["deals"].get(eid)
        if deal is None:
            return None
        have = deal.get("billing_status")
        if _DEAL_BILLING_RANK.get(have, 0) >= _DEAL_BILLING_RANK[want]:
            return None
        return "billing_drift", f"deal {eid} has billing status {have or 'none'} in the CRM; billing shows {want}"
    if ctype == "void_invoice":
        inv = st["invoices"].get(eid, {})
        if inv.get("status") == "void":
            return None
        return "cancelled_work_invoiced", f"invoice {eid} is {inv.get('status')} although its job was cancelled"
    return None  # update_customer and holds: the exports carry no billing or dispatch customer master to compare


def _finding(kind: str, ref: dict[str, Any], st: dict[str, Any] | None, routing: Routing, message: str,
             trace_id: str) -> Finding:
    route = routing.route_of({"reason_code": kind, "source_system": ref.get("source_system")})
    etype, eid = ref["entity_type"], ref["entity_id"]
    amount, currency, since = _money(st, etype, eid)
    truth, fix = TRUTH.get(kind, ("", ""))
    return Finding(kind, route.owner, route.severity, ref.get("customer_id"), etype, eid, amount, currency, since,
                   message, evidence(st, etype, eid) if st else {}, truth, fix, trace_id)


def amount_at_risk(st: dict[str, Any], etype: str, eid: str) -> int:
    """The money (cents) held up while the record ``etype`` ``eid`` of this customer is in dispute."""
    return _money(st, etype, eid)[0]


def _money(st: dict[str, Any] | None, etype: str, eid: str) -> tuple[int, str, int | None]:
    """(amount at risk in cents, currency, last change) of the record a finding is about."""
    if not st:
        return 0, "USD", None
    if etype == "customer":
        return sum(_money(st, "deal", d)[0] for d, deal in st["deals"].items() if deal.get("won")
                   and not invoices_of(st, deal_id=d)), "USD", (st.get("customer") or {}).get("occurred_at")
    rec = st[{"deal": "deals", "job": "jobs", "invoice": "invoices", "payment": "payments"}[etype]].get(eid, {})
    currency = rec.get("currency") or "USD"
    if etype == "deal":
        amount = rec.get("amount_cents") or 0
    elif etype == "job":
        amount = sum(ln["quantity"] * ln["unit_price_cents"] for ln in rec.get("lines", []))
    elif etype == "invoice":
        amount = 0 if invoice_paid(st, eid) else max(0, (rec.get("amount_due_cents") or 0)
                                                      - (rec.get("amount_paid_cents") or 0))
        amount = amount or rec.get("amount_due_cents") or 0
    else:
        amount = rec.get("amount_cents") or 0
    return int(amount), currency, rec.get("occurred_at")


def evidence(st: dict[str, Any], etype: str, eid: str) -> dict[str, str]:
    """What each system's records say about the deal, job, invoice or payment a finding is about."""
    deal_id = eid if etype == "deal" else None
    job_ids: list[str] = [eid] if etype == "job" else []
    if etype == "job":
        deal_id = st["jobs"].get(eid, {}).get("deal_id")
    if etype == "invoice":
        inv = st["invoices"].get(eid, {})
        deal_id = inv.get("deal_id") or st["jobs"].get(inv.get("job_id") or "", {}).get("deal_id")
        job_ids = [inv["job_id"]] if inv.get("job_id") else []
    if etype == "payment":
        inv = st["invoices"].get(st["payments"].get(eid, {}).get("invoice_id") or "", {})
        deal_id = inv.get("deal_id")
    if deal_id and not job_ids:
        job_ids = sorted(j for j, job in st["jobs"].items() if job.get("deal_id") == deal_id)
    out: dict[str, str] = {}
    cust = st.get("customer") or {}
    crm = [f"account {st.get('customer_id')}: billing account {cust.get('billing_account_id') or 'none'}, "
           f"terms {cust.get('billing_terms') or 'none'}"] if cust else ["no CRM account record"]
    if deal_id and deal_id in st["deals"]:
        d = st["deals"][deal_id]
        crm.append(f"deal {deal_id}: {d.get('stage')}, {(d.get('amount_cents') or 0) / 100:.2f} "
                   f"{d.get('currency')}, billing status {d.get('billing_status') or 'none'}, SKUs "
                   + ", ".join(ln["sku"] for ln in d.get("lines", [])))
    out["crm"] = "; ".join(crm)
    jobs = [f"job {j}: {st['jobs'][j].get('status')}" + (" (after completion)" if st["jobs"][j].get("completed_at")
                                                          and st["jobs"][j].get("status") != "completed" else "")
            + f", deal {st['jobs'][j].get('deal_id') or 'none'}" for j in job_ids if j in st["jobs"]]
    out["dispatch"] = "; ".join(jobs) or "no job"
    invs = invoices_of(st, deal_id=deal_id) if deal_id else []
    invs += [{**st["invoices"][eid], "id": eid}] if etype == "invoice" and not any(i["id"] == eid for i in invs) \
        else []
    for j in job_ids:
        invs += [i for i in invoices_of(st, job_id=j) if not any(i["id"] == x["id"] for x in invs)]
    bills = [f"invoice {i['id']}: {i.get('status')}, {(i.get('amount_due_cents') or 0) / 100:.2f} {i.get('currency')}"
             + (" (paid)" if invoice_paid(st, i["id"]) else "") for i in invs]
    if etype == "payment":
        p = st["payments"].get(eid, {})
        bills.append(f"payment {eid}: {p.get('status')}, {(p.get('amount_cents') or 0) / 100:.2f} "
                     f"{p.get('currency')}, invoice {p.get('invoice_id') or 'none'}")
    out["billing"] = "; ".join(bills) or "no invoice"
    return out
