"""The bundled example export set: a simulated clean month as each system exports it, with disagreements injected.

``write_example(dest)`` writes a Salesforce accounts report and opportunities-with-products report (CSV), a
Jobber jobs export (CSV), Stripe's invoice list (list-API JSON) and payments export (CSV), and returns the
disagreements it injected, each as (kind, entity type, entity id). Same seed, same files.
"""

from __future__ import annotations

import csv
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from concord.tools.simulator import DAY, HOUR, business

START = 1_767_225_600_000  # 2026-01-01T00:00Z
FILES = ("salesforce_accounts.csv", "salesforce_opportunities.csv", "jobber_jobs.csv", "stripe_invoices.json",
         "stripe_payments.csv")
NO_FAULTS = {"missing_billing_account": 0, "missing_billing_terms": 0, "unmapped_sku": 0}


def _date(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else ""


def _money(cents: int) -> str:
    return f"{cents / 100:.2f}"


def _final(history: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each record's last state: entity type -> id -> payload with customer_id and occurred_at."""
    out: dict[str, dict[str, dict[str, Any]]] = {e: {} for e in ("customer", "deal", "job", "invoice", "payment")}
    for e in history:
        out[e["entity_type"]][e["entity_id"]] = {**e["payload"], "customer_id": e["customer_id"],
                                                 "occurred_at": e["occurred_at"]}
    return out


def _clean(rec: dict[str, dict[str, dict[str, Any]]]) -> None:
    """A month where the integration worked: payments that end failed were collected, the CRM knows billing."""
    for pay in rec["payment"].values():
        if pay["status"] == "failed":
            pay.update(status="succeeded", failure_reason=None)
            inv = rec["invoice"][pay["invoice_id"]]
            inv.update(status="paid", amount_paid_cents=inv["amount_due_cents"])
    for deal_id, deal in rec["deal"].items():
        jobs = {j for j, job in rec["job"].items() if job["deal_id"] == deal_id}
        invs = [i for i in rec["invoice"].values() if i["deal_id"] == deal_id or i["job_id"] in jobs]
        deal["billing_status"] = "paid" if any(i["status"] == "paid" for i in invs) else \
            "invoiced" if any(i["issued_at"] for i in invs) else None


def _inject(rec: dict[str, dict[str, dict[str, Any]]], rng: random.Random, end: int) -> list[tuple[str, str, str]]:
    """Break the clean month at known places; return what was broken."""
    injected: list[tuple[str, str, str]] = []
    used: set[str] = set()  # customers already touched: one injection each keeps the effects apart
    policy = {cid: c["billing_policy"] for cid, c in rec["customer"].items()}

    def pick(pred: Any) -> str:
        ids = sorted(i for i, r in rec["deal"].items() if r["customer_id"] not in used and pred(i, r))
        deal_id = rng.choice(ids)
        used.add(rec["deal"][deal_id]["customer_id"])
        return deal_id

    def invoices_of(deal_id: str) -> list[str]:
        jobs = {j for j, job in rec["job"].items() if job["deal_id"] == deal_id}
        return sorted(i for i, r in rec["invoice"].items() if r["deal_id"] == deal_id or r["job_id"] in jobs)

    def paid(deal_id: str) -> bool:
        invs = invoices_of(deal_id)
        return bool(invs) and all(rec["invoice"][i]["status"] == "paid" for i in invs)

    def drop_billing(deal_id: str) -> None:
        for inv_id in invoices_of(deal_id):
            del rec["invoice"][inv_id]
            for p in [p for p, r in rec["payment"].items() if r["invoice_id"] == inv_id]:
                del rec["payment"][p]
        rec["deal"][deal_id]["billing_status"] = None

    on_close = lambda i, r: policy[r["customer_id"]] == "on_close" and paid(i)  # noqa: E731
    on_completion = lambda i, r: policy[r["customer_id"]] == "on_completion" and paid(i)  # noqa: E731

    d = pick(on_close)  # billing never invoiced a won deal
    drop_billing(d)
    injected.append(("unbilled_work", "deal", d))
    d = pick(on_completion)  # the job was done but never invoiced
    job_id = next(j for j, r in rec["job"].items() if r["deal_id"] == d)
    drop_billing(d)
    injected.append(("unbilled_work", "job", job_id))
    d = pick(on_completion)  # a won deal dispatch never scheduled
    drop_billing(d)
    for j in [j for j, r in rec["job"].items() if r["deal_id"] == d]:
        del rec["job"][j]
    injected.append(("unscheduled_sale", "deal", d))
    d = pick(on_close)  # the invoice asks more than the deal sold
    inv_id = invoices_of(d)[0]
    rec["invoice"][inv_id]["amount_due_cents"] += 15_000
    injected.append(("amount_mismatch", "invoice", inv_id))
    d = pick(on_close)  # the deal was invoiced twice
    first = rec["invoice"][invoices_of(d)[0]]
    dup = f"{invoices_of(d)[0]}-dup"
    rec["invoice"][dup] = {**first, "status": "open", "amount_paid_cents": 0, "issued_at": first["issued_at"] + DAY,
                           "occurred_at": first["issued_at"] + DAY}
    injected.append(("duplicate_invoice", "invoice", dup))
    d = pick(on_close)  # the CRM still says not invoiced
    rec["deal"][d]["billing_status"] = None
    injected.append(("billing_drift", "deal", d))
    d = pick(on_completion)  # the job was cancelled, its invoice stays open
    job_id = next(j for j, r in rec["job"].items() if r["deal_id"] == d)
    inv_id = invoices_of(d)[0]
    rec["job"][job_id]["status"] = "cancelled"
    rec["invoice"][inv_id].update(status="open", amount_paid_cents=0)
    for p in [p for p, r in rec["payment"].items() if r["invoice_id"] == inv_id]:
        del rec["payment"][p]
    rec["deal"][d]["billing_status"] = "invoiced"
    injected.append(("cancelled_work_invoiced", "invoice", inv_id))
    cid = sorted(c for c in rec["customer"] if c not in used)[0]
    used.add(cid)
    rec["payment"]["pay-unapplied-1"] = {"status": "succeeded", "invoice_id": None, "amount_cents": 48_000,
                                         "currency": "USD", "attempt": 1, "failure_reason": None,
                                         "customer_id": cid, "occurred_at": end - 3 * DAY}
    injected.append(("payment_without_invoice", "payment", "pay-unapplied-1"))
    cid = sorted(c for c in rec["customer"] if c not in used)[0]
    used.add(cid)
    rec["invoice"]["inv-orphan-1"] = {"status": "open", "deal_id": None, "job_id": None, "amount_due_cents": 32_000,
                                      "amount_paid_cents": 0, "currency": "USD", "lines": [], "customer_id": cid,
                                      "issued_at": end - 5 * DAY, "due_at": end + 25 * DAY,
                                      "occurred_at": end - 5 * DAY}
    injected.append(("orphan_invoice", "invoice", "inv-orphan-1"))
    cid = sorted(c for c in rec["customer"] if c not in used)[0]
    used.add(cid)
    line = {"sku": "SVC-REPAIR", "description": "Emergency call-out", "quantity": 2, "unit_price_cents": 9_900}
    rec["job"]["job-callout-1"] = {"deal_id": None, "status": "completed", "scheduled_for": end - 4 * DAY,
                                   "completed_at": end - 4 * DAY + 2 * HOUR, "account_ref": None, "lines": [line],
                                   "customer_id": cid, "occurred_at": end - 4 * DAY + 2 * HOUR}
    injected.append(("unlinked_job", "job", "job-callout-1"))
    n = len(rec["customer"])
    for kind, cid, sku, account in (("missing_billing_account", f"cust-{n:04d}", "SVC-INSTALL", None),
                                    ("unmapped_sku", f"cust-{n + 1:04d}", "HW-BOILER-XL", f"acct_{n + 1:04d}")):
        rec["customer"][cid] = {"name": f"Newfield Facilities {cid[-4:]}", "email": f"ap@newfield{cid[-4:]}.example",
                                "billing_account_id": account, "billing_terms": "net_30", "billing_policy": "on_close",
                                "billing_address": "9 Quay Rd", "external_ids": {"stripe": f"cus_{cid[-4:]}"},
                                "customer_id": cid, "occurred_at": end - 6 * DAY}
        deal_id = f"deal-{cid[-4:]}-0"
        rec["deal"][deal_id] = {"name": f"Newfield {cid[-4:]} #0", "stage": "closed_won", "amount_cents": 120_000,
                                "currency": "USD", "closed_at": end - 2 * DAY, "billing_status": None,
                                "lines": [{"sku": sku, "description": sku, "quantity": 1,
                                           "unit_price_cents": 120_000}], "customer_id": cid,
                                "occurred_at": end - 2 * DAY}
        injected.append((kind, "deal", deal_id))
    return sorted(injected)


Injected = list[tuple[str, str, str]]


def write_example(dest: str | Path, customers: int = 40, seed: int = 16,
                  inject: bool = True) -> tuple[list[Path], Injected, int]:
    """Write the example exports into ``dest``; return (files, injected disagreements, the as-of time in ms)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    history = business(rng, customers, 30, START, faults=NO_FAULTS)
    end = max(e["occurred_at"] for e in history) + HOUR
    rec = _final(history)
    _clean(rec)
    injected = _inject(rec, rng, end) if inject else []
    stripe_of = {cid: c["external_ids"].get("stripe") or f"cus_{cid[-4:]}" for cid, c in rec["customer"].items()}
    paths = [dest / f for f in FILES]
    _write_csv(paths[0], ["Account ID", "Account Name", "Billing Email", "Billing Account ID", "Billing Terms",
                          "Billing Policy", "Billing Street", "Stripe Customer ID", "Jobber Client ID",
                          "Last Modified Date"],
               [[cid, c["name"], c["email"], c["billing_account_id"] or "", c["billing_terms"] or "",
                 c["billing_policy"] or "", c["billing_address"] or "", stripe_of[cid], f"jc-{cid[-4:]}",
                 _date(c["occurred_at"])] for cid, c in sorted(rec["customer"].items())])
    _write_csv(paths[1], ["Opportunity ID", "Account ID", "Opportunity Name", "Stage", "Close Date",
                          "Opportunity Currency", "Billing Status", "Product Code", "Product Name", "Quantity",
                          "Sales Price", "Last Modified Date"],
               [[d_id, d["customer_id"], d["name"], {"closed_won": "Closed Won", "closed_lost": "Closed Lost",
                                                      "open": "Open"}[d["stage"]], _date(d["closed_at"]),
                 d["currency"], d["billing_status"] or "", ln["sku"], ln["description"], ln["quantity"],
                 _money(ln["unit_price_cents"]), _date(d["occurred_at"])]
                for d_id, d in sorted(rec["deal"].items()) for ln in d["lines"]])
    _write_csv(paths[2], ["Job #", "Client ID", "Deal ID", "Job Status", "Start Date", "Completed Date",
                          "Product/Service", "Description", "Qty", "Unit Price", "Last Updated"],
               [[j_id, f"jc-{j['customer_id'][-4:]}", j["deal_id"] or "", j["status"].capitalize(),
                 _date(j["scheduled_for"]), _date(j["completed_at"]),
                 ln["sku"], ln["description"], ln["quantity"], _money(ln["unit_price_cents"]),
                 _date(j["occurred_at"])] for j_id, j in sorted(rec["job"].items()) for ln in j["lines"]])
    paths[3].write_text(json.dumps({"object": "list", "url": "/v1/invoices", "has_more": False, "data": [
        _stripe_invoice(i, inv, stripe_of[inv["customer_id"]]) for i, inv in sorted(rec["invoice"].items())]},
        indent=1) + "\n")
    _write_csv(paths[4], ["id", "Created (UTC)", "Amount", "Currency", "Status", "Decline Reason", "Customer ID",
                          "Invoice ID"],
               [[p_id, _date(p["occurred_at"]), _money(p["amount_cents"]), p["currency"].lower(),
                 {"succeeded": "Paid", "failed": "Failed", "refunded": "Refunded"}[p["status"]],
                 p["failure_reason"] or "", stripe_of[p["customer_id"]], p["invoice_id"] or ""]
                for p_id, p in sorted(rec["payment"].items())])
    (dest / "injected.json").write_text(json.dumps([list(i) for i in injected], indent=1) + "\n")
    return paths, injected, end


def _stripe_invoice(inv_id: str, inv: dict[str, Any], customer: str) -> dict[str, Any]:
    """An invoice object as GET /v1/invoices lists it."""
    created = inv["issued_at"] or inv["occurred_at"]
    meta = {k: v for k, v in (("concord_deal_id", inv["deal_id"]), ("concord_job_id", inv["job_id"])) if v}
    return {"id": inv_id, "object": "invoice", "customer": customer, "status": inv["status"],
            "currency": inv["currency"].lower(), "amount_due": inv["amount_due_cents"],
            "amount_paid": inv["amount_paid_cents"], "created": created // 1000,
            "due_date": inv["due_at"] // 1000 if inv["due_at"] else None,
            "status_transitions": {"finalized_at": inv["issued_at"] // 1000 if inv["issued_at"] else None,
                                   "paid_at": inv["occurred_at"] // 1000 if inv["status"] == "paid" else None},
            "metadata": meta,
            "lines": {"object": "list", "data": [
                {"id": f"il_{inv_id}_{n}", "object": "line_item", "description": ln["description"],
                 "quantity": ln["quantity"], "amount": ln["quantity"] * ln["unit_price_cents"],
                 "price": {"unit_amount": ln["unit_price_cents"], "lookup_key": ln["sku"]}}
                for n, ln in enumerate(inv["lines"])]}}


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
