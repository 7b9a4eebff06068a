"""A command's life in the customer's status: issued -> applied (the adapter's report) -> confirmed.

Confirmed means the owning system's own change event reflects the command: its echo carries the command
id, or the record the command asked for is there (the invoice for the deal or job, the job for the deal,
the CRM deal's billing status, the voided invoice). Pure functions over the status; no clock of their own.
"""

from __future__ import annotations

from typing import Any

from concord.domain.flow_config import FlowConfig
from concord.domain.status import invoice_paid, invoices_of

ISSUED, APPLIED, CONFIRMED, REJECTED, FAILED = "issued", "applied", "confirmed", "rejected", "failed"
# What an adapter may report, and the state each report moves a command to.
ADAPTER_OUTCOMES = {"applied": APPLIED, "duplicate": APPLIED, "rejected": REJECTED, "failed": FAILED}
_BILLING_RANK = {None: 0, "invoiced": 1, "paid": 2}


def track(st: dict[str, Any], cmd: dict[str, Any], payload: dict[str, Any], cfg: FlowConfig, now: int) -> None:
    """Start following ``cmd`` (just issued) when its type has a confirmation deadline."""
    within = cfg.confirm_within_s.get(cmd["type"])
    if within is None or cmd["command_id"] in st["commands"]:
        return
    expect = {k: payload[k] for k in ("deal_id", "job_id", "invoice_id", "billing_status", "amount_cents")
              if payload.get(k) is not None}
    st["commands"][cmd["command_id"]] = {
        "type": cmd["type"], "target": cmd["target_system"], "entity_type": cmd["entity_type"],
        "entity_id": cmd["entity_id"], "issued_at": now, "due_at": now + int(within * 1000), "state": ISSUED,
        "expect": expect, "adapter": None, "confirmed_at": None, "confirmed_by": None,
        "trace_id": cmd.get("trace_id") or "",
    }


def record_outcome(st: dict[str, Any], outcome: dict[str, Any]) -> bool:
    """Record an adapter's reported outcome of one command; False when the command is not followed here."""
    entry = st["commands"].get(outcome["command_id"])
    if entry is None:
        return False
    report = {"outcome": outcome["outcome"], "ref": outcome.get("target_ref") or "", "at": outcome["reported_at"],
              "detail": outcome.get("detail") or "", "adapter": outcome.get("adapter") or ""}
    state = entry["state"]
    if state != CONFIRMED:  # the target's own feed outranks the adapter's word
        state = ADAPTER_OUTCOMES.get(outcome["outcome"], state)
    st["commands"][outcome["command_id"]] = {**entry, "adapter": report, "state": state}
    return True


def observe(st: dict[str, Any], event: dict[str, Any], now: int) -> list[str]:
    """Mark confirmed every followed command the status (after ``event``) shows done; their ids."""
    echo = event.get("caused_by_command_id")
    done = []
    for cid, entry in sorted(st["commands"].items()):
        if entry["state"] == CONFIRMED:
            continue
        if cid == echo:
            how = f"echo in {event['source_system']} {event['entity_type']} {event['entity_id']}"
        else:
            how = matching_record(st, entry)
        if how:
            st["commands"][cid] = {**entry, "state": CONFIRMED, "confirmed_at": now, "confirmed_by": how}
            done.append(cid)
    return done


def matching_record(st: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """The record of the owning system that shows ``entry`` done, named; None while there is none."""
    expect, ctype = entry["expect"], entry["type"]
    if ctype == "create_invoice":
        by = {"job_id": expect["job_id"]} if entry["entity_type"] == "job" else {"deal_id": expect.get("deal_id")}
        # a voided invoice was still created: the command was carried out, whatever came of the invoice since
        invs = [i for i in invoices_of(st, **by) if not i.get("deleted")]
        return f"billing invoice {invs[0]['id']}" if invs else None
    if ctype == "create_job":
        jobs = [j for j, job in sorted(st["jobs"].items()) if job.get("deal_id") == expect.get("deal_id")
                and not job.get("deleted")]
        return f"dispatch job {jobs[0]}" if jobs else None
    if ctype == "update_deal_billing_status":
        deal = st["deals"].get(expect.get("deal_id") or "", {})
        have = deal.get("billing_status")
        # "paid" also confirms the earlier "invoiced": the CRM moved past it
        if have in _BILLING_RANK and _BILLING_RANK[have] >= _BILLING_RANK.get(expect.get("billing_status"), 9):
            return f"crm deal {expect['deal_id']} billing_status={have}"
        return None
    if ctype == "void_invoice":
        inv = st["invoices"].get(expect.get("invoice_id") or "", {})
        return f"billing invoice {expect['invoice_id']} status=void" if inv.get("status") == "void" else None
    return None


def target_says(st: dict[str, Any], entry: dict[str, Any]) -> str:
    """What the owning system's own feed currently shows about what ``entry`` asked for, in words."""
    expect, ctype = entry["expect"], entry["type"]
    if ctype == "create_invoice":
        what = f"job {expect['job_id']}" if entry["entity_type"] == "job" else f"deal {expect.get('deal_id')}"
        by = {"job_id": expect["job_id"]} if entry["entity_type"] == "job" else {"deal_id": expect.get("deal_id")}
        invs = invoices_of(st, **by)
        if not invs:
            return f"billing shows no invoice for {what}"
        return "billing shows " + ", ".join(f"invoice {i['id']} {i.get('status')}" for i in invs) + f" for {what}"
    if ctype == "create_job":
        return f"dispatch shows no job for deal {expect.get('deal_id')}"
    if ctype == "update_deal_billing_status":
        deal = st["deals"].get(expect.get("deal_id") or "")
        if deal is None:
            return f"the CRM has sent no record of deal {expect.get('deal_id')}"
        inv = expect.get("invoice_id")
        paid = f" (billing says invoice {inv} is {'paid' if invoice_paid(st, inv) else 'not paid'})" if inv else ""
        return f"the CRM says deal {expect['deal_id']} billing_status={deal.get('billing_status')}{paid}"
    if ctype == "void_invoice":
        inv = st["invoices"].get(expect.get("invoice_id") or "")
        return f"billing shows invoice {expect.get('invoice_id')} " + (
            f"{inv.get('status')}" if inv else "not at all")
    return "no feed of the target shows this command type"


def pending(st: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Followed commands not confirmed yet (rejected ones have their own exception), by id."""
    return [(cid, e) for cid, e in sorted(st.get("commands", {}).items()) if e["state"] in (ISSUED, APPLIED, FAILED)]
