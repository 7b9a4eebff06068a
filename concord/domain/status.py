"""The per-customer status: a joined, rebuildable view of one customer's records across systems.

A status is plain JSON (it lives in the faust table ``customer_to_status``). Applying an event only records
facts; what to do about them is decided in concord/domain/rules.py.
"""

from __future__ import annotations

from typing import Any

COLLECTION = {"deal": "deals", "job": "jobs", "invoice": "invoices", "payment": "payments"}
# Where a deal or job is in the customer-to-cash process, in order.
POSITIONS = ("sold", "scheduled", "completed", "invoiced", "paid")
ISSUED_INVOICE = ("open", "paid", "uncollectible")


def clone(obj: Any) -> Any:
    """A deep copy of plain JSON data (dicts, lists, scalars), several times faster than copy.deepcopy."""
    kind = type(obj)
    if kind is dict:
        return {k: clone(v) for k, v in obj.items()}
    if kind is list:
        return [clone(v) for v in obj]
    return obj


def fork(status: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``status`` that applying an event and deciding may change without touching the original.

    Records themselves are never changed in place (they are replaced), so only the containers are copied:
    far cheaper than a deep copy of a customer with many deals.
    """
    st = dict(status)
    for name in ("deals", "jobs", "invoices", "payments", "seqs", "overrides", "discarded", "parked", "commands",
                 "overdue"):
        st[name] = dict(status.get(name) or {})
    st["exceptions"] = {k: dict(v) for k, v in status["exceptions"].items()}
    return st


def empty_status(customer_key: str) -> dict[str, Any]:
    """The status of a customer nothing is known about yet (``unknown:...`` keys have no customer id)."""
    return {
        "customer_id": None if customer_key.startswith("unknown:") else customer_key,
        "key": customer_key,
        "customer": None,
        "deals": {}, "jobs": {}, "invoices": {}, "payments": {},
        "seqs": {},  # "<entity_type>:<entity_id>" -> last applied seq
        "issued": [],  # command ids already issued for this customer
        "exceptions": {},  # open exceptions the rules raised: id -> what and when
        "overrides": {},  # owners' patches: "<entity_type>:<entity_id>" -> {field: value}
        "discarded": {},  # exceptions an owner discarded: id -> reason (never raised again)
        "parked": {},  # "<entity_type>:<entity_id>" -> events waiting behind an open exception
        "commands": {},  # command id -> its life: issued, applied (the adapter's report), confirmed
        "overdue": {},  # invoice id -> cents still due past its due date (set by the time-driven rules)
    }


def apply_event(status: dict[str, Any], event: dict[str, Any]) -> bool:
    """Record ``event``'s facts in ``status`` (in place); False when it is older than what is known."""
    entity, entity_id = event["entity_type"], event["entity_id"]
    ref = f"{entity}:{entity_id}"
    if event["seq"] < status["seqs"].get(ref, -1):
        return False
    status["seqs"][ref] = event["seq"]
    meta = {"event_id": event["event_id"], "trace_id": event["trace_id"], "occurred_at": event["occurred_at"],
            "seq": event["seq"]}
    payload = event["payload"]
    if entity == "customer":
        current = status["customer"] or {}
        if event["op"] == "delete":
            status["customer"] = {**current, **meta, "deleted": True}
        elif payload is not None:
            status["customer"] = {**_merged(current, payload, event), **meta, "deleted": False}
        return True
    records = status[COLLECTION[entity]]
    old = records.get(entity_id, {})
    if event["op"] == "delete" or payload is None:
        records[entity_id] = {**old, **meta, "deleted": event["op"] == "delete"}
        return True
    payload = _merged(old, payload, event)
    new = {**payload, **meta, "deleted": False}
    # Facts that stay true once seen, so that no later update or arrival order can un-happen them.
    if entity == "deal":
        new["won"] = old.get("won", False) or payload["stage"] == "closed_won"
    elif entity == "job":
        new["completed_at"] = payload["completed_at"] or old.get("completed_at") or (
            event["occurred_at"] if payload["status"] == "completed" else None)
    elif entity == "invoice":
        new["issued"] = old.get("issued", False) or payload["status"] in ISSUED_INVOICE or bool(payload["issued_at"])
        new["issued_at"] = payload["issued_at"] or old.get("issued_at") or (
            event["occurred_at"] if new["issued"] else None)
    records[entity_id] = new
    return True


def _merged(old: dict[str, Any], payload: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """A partial update's payload: only ``changed_fields`` are news, the rest stays as known.

    CDC feeds and webhooks that carry only what changed name those fields in ``changed_fields``.
    """
    changed = event.get("changed_fields") or []
    if not old or event["op"] != "update" or not changed:
        return payload
    return {**{k: v for k, v in old.items() if k in payload}, **{k: payload[k] for k in changed if k in payload}}


def customer_record(status: dict[str, Any]) -> dict[str, Any] | None:
    """The customer's CRM record with any owner patch applied."""
    patch = status["overrides"].get(f"customer:{status['customer_id']}", {})
    if status["customer"] is None and not patch:
        return None
    return {**(status["customer"] or {}), **patch}


def invoices_of(status: dict[str, Any], *, deal_id: str | None = None, job_id: str | None = None) -> list[dict]:
    """Invoices linked to a deal (directly or through its jobs) or to a job, with their ids."""
    out = []
    for inv_id, inv in sorted(status["invoices"].items()):
        if inv.get("deleted"):
            continue
        inv_deal = inv.get("deal_id") or status["jobs"].get(inv.get("job_id") or "", {}).get("deal_id")
        if (job_id is not None and inv.get("job_id") == job_id) or (deal_id is not None and inv_deal == deal_id):
            out.append({**inv, "id": inv_id})
    return out


def invoice_paid(status: dict[str, Any], inv_id: str) -> bool:
    """An invoice counts as paid when billing says so or a payment for it succeeded."""
    inv = status["invoices"].get(inv_id, {})
    return inv.get("status") == "paid" or any(
        p.get("invoice_id") == inv_id and p.get("status") == "succeeded" for p in status["payments"].values())


def refresh_positions(status: dict[str, Any]) -> None:
    """Set each deal's and job's position in sold → scheduled → completed → invoiced → paid."""
    jobs, deals = status["jobs"], status["deals"]
    for job_id, job in list(jobs.items()):
        pos = _position(status, None, [job_id] if job.get("status") else [], job)
        if job.get("position") != pos:
            jobs[job_id] = {**job, "position": pos}  # replaced, never changed in place (see fork)
    for deal_id, deal in list(deals.items()):
        job_ids = [j for j, job in sorted(jobs.items()) if job.get("deal_id") == deal_id]
        pos = _position(status, deal_id, job_ids, deal)
        if deal.get("position") != pos:
            deals[deal_id] = {**deal, "position": pos}


def _position(status: dict[str, Any], deal_id: str | None, job_ids: list[str], rec: dict[str, Any]) -> str:
    if rec.get("deleted"):
        return "deleted"
    invs = invoices_of(status, deal_id=deal_id) if deal_id else [
        i for j in job_ids for i in invoices_of(status, job_id=j)]
    live = [i for i in invs if i.get("status") != "void"]
    if live and all(invoice_paid(status, i["id"]) for i in live):
        return "paid"
    if any(i.get("issued") for i in live):
        return "invoiced"
    jobs = [status["jobs"][j] for j in job_ids]
    if any(j.get("status") == "completed" for j in jobs):
        return "completed"
    if jobs and all(j.get("status") == "cancelled" for j in jobs):
        return "cancelled"
    if any(j.get("status") in ("scheduled", "dispatched") for j in jobs):
        return "scheduled"
    if deal_id is not None:
        stage = rec.get("stage")
        return "sold" if rec.get("won") else ("lost" if stage == "closed_lost" else "open")
    return "unknown"
