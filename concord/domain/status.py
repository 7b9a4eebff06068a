"""The per-customer status: a joined, rebuildable view of one customer's records across systems.

A status is plain JSON (it lives in the faust table ``customer_to_status``). Applying an event only records
facts; what to do about them is decided in concord/domain/rules.py.

``status["index"]`` holds what the rules look records up by (jobs by deal, invoices by job and by deal,
payments by invoice, the won deals, the records that name no parent...), so that one event touches only the
records it concerns, however many the customer already has. It is derived from the records as the rules see
them (owners' patches applied) and rebuilt whenever it is missing or of another ``INDEX_VERSION``: statuses
written before it existed read as they are, and the first event of such a customer is decided in full.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
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
        "seqs": {},  # "<entity_type>:<entity_id>" -> last applied seq, where the record does not say it
        "issued": [],  # command ids already issued for this customer
        "exceptions": {},  # open exceptions the rules raised: id -> what and when
        "overrides": {},  # owners' patches: "<entity_type>:<entity_id>" -> {field: value}
        "discarded": {},  # exceptions an owner discarded: id -> reason (never raised again)
        "parked": {},  # "<entity_type>:<entity_id>" -> events waiting behind an open exception
        "commands": {},  # command id -> its life: issued, applied (the adapter's report), confirmed
        "overdue": {},  # invoice id -> cents still due past its due date (set by the time-driven rules)
    }


def apply_event(status: dict[str, Any], event: dict[str, Any]) -> bool:
    """Record ``event``'s facts in ``status`` (in place); False when it is older than what is known.

    A valid index is kept up to date with the record (copy on write: containers of a forked status are shared).
    """
    entity, entity_id = event["entity_type"], event["entity_id"]
    if entity != "customer" and index_valid(status):
        old = effective_record(status, entity, entity_id)
        if not _apply(status, event):
            return False
        reindex(status, entity, entity_id, old, effective_record(status, entity, entity_id))
        return True
    return _apply(status, event)


def last_seq(status: dict[str, Any], entity: str, entity_id: str) -> int:
    """The seq of the last event applied to one record of ``status`` (-1 when none was).

    The record carries its own; ``seqs`` holds it where no record was written (and in statuses written before
    records carried it alone), so that an event never copies a map of all the customer's records.
    """
    rec = status.get("customer") if entity == "customer" else status.get(COLLECTION[entity], {}).get(entity_id)
    return max(status.get("seqs", {}).get(f"{entity}:{entity_id}", -1), (rec or {}).get("seq", -1))


def _apply(status: dict[str, Any], event: dict[str, Any]) -> bool:
    entity, entity_id = event["entity_type"], event["entity_id"]
    ref = f"{entity}:{entity_id}"
    if event["seq"] < last_seq(status, entity, entity_id):
        return False
    if entity == "customer" and event["op"] != "delete" and event["payload"] is None:
        status["seqs"] = {**status["seqs"], ref: event["seq"]}
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
    invoices, jobs = status["invoices"], status["jobs"]
    if index_valid(status):  # the candidates the index names, then the same test as the scan below
        idx = status["index"]
        found: set[str] = set(_patched(status, "invoice"))
        if job_id is not None:
            found.update(idx["job_invoices"].get(job_id, ()))
        if deal_id is not None:
            found.update(idx["deal_invoices"].get(deal_id, ()))
            for j in jobs_of(status, deal_id):
                found.update(idx["job_invoices"].get(j, ()))
        candidates = [(i, invoices[i]) for i in sorted(found) if i in invoices]
    else:
        candidates = sorted(invoices.items())
    out = []
    for inv_id, inv in candidates:
        if inv.get("deleted"):
            continue
        inv_deal = inv.get("deal_id") or jobs.get(inv.get("job_id") or "", {}).get("deal_id")
        if (job_id is not None and inv.get("job_id") == job_id) or (deal_id is not None and inv_deal == deal_id):
            out.append({**inv, "id": inv_id})
    return out


def jobs_of(status: dict[str, Any], deal_id: str) -> list[str]:
    """The ids of the jobs (deleted ones too) that name ``deal_id``, in order."""
    jobs = status["jobs"]
    if index_valid(status):
        found = {*status["index"]["deal_jobs"].get(deal_id, ()), *_patched(status, "job")}
        return [j for j in sorted(found) if j in jobs and jobs[j].get("deal_id") == deal_id]
    return [j for j, job in sorted(jobs.items()) if job.get("deal_id") == deal_id]


def invoice_paid(status: dict[str, Any], inv_id: str) -> bool:
    """An invoice counts as paid when billing says so or a payment for it succeeded."""
    inv = status["invoices"].get(inv_id, {})
    if inv.get("status") == "paid":
        return True
    payments = status["payments"]
    if index_valid(status):
        found = {*status["index"]["invoice_payments"].get(inv_id, ()), *_patched(status, "payment")}
        return any(p in payments and payments[p].get("invoice_id") == inv_id
                   and payments[p].get("status") == "succeeded" for p in found)
    return any(p.get("invoice_id") == inv_id and p.get("status") == "succeeded" for p in payments.values())


def refresh_positions(status: dict[str, Any], deals: Any = None, jobs: Any = None,
                      owned: Iterable[str] = ()) -> None:
    """Set each deal's and job's position in sold → scheduled → completed → invoiced → paid.

    With ``deals`` and ``jobs`` given, only those (ids) are looked at: the ones an event may have moved; a
    collection is copied before its first change then, as a forked status shares it with its original, unless
    it is named in ``owned`` (the caller's fork copied it already: a second copy would cost the collection's size).
    """
    for name, ids in (("jobs", jobs), ("deals", deals)):
        records = status[name]
        copied = ids is None or name in owned  # the full pass runs on a status of the caller's own
        for rec_id in (list(records) if ids is None else sorted(i for i in ids if i in records)):
            rec = records[rec_id]
            if name == "jobs":
                pos = _position(status, None, [rec_id] if rec.get("status") else [], rec)
            else:
                pos = _position(status, rec_id, jobs_of(status, rec_id), rec)
            if rec.get("position") != pos:
                if not copied:
                    records = status[name] = dict(records)
                    copied = True
                records[rec_id] = {**rec, "position": pos}  # replaced, never changed in place (see fork)


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


# ---- the index ---------------------------------------------------------------------------------------
INDEX_VERSION = 1  # raise when what the index holds, or what the rules warrant, changes: statuses are redone
_LINKS = (("job", "deal_id", "deal_jobs"), ("invoice", "job_id", "job_invoices"),
          ("invoice", "deal_id", "deal_invoices"), ("payment", "invoice_id", "invoice_payments"))
_SETS = ("won", "jobless_won", "unlinked_jobs", "orphan_invoices", "open_invoices", "loose_payments", "pending")


def index_valid(status: dict[str, Any]) -> bool:
    """Whether ``status`` carries an index of this version (older statuses have none)."""
    idx = status.get("index")
    return type(idx) is dict and idx.get("v") == INDEX_VERSION


def effective_record(status: dict[str, Any], entity: str, entity_id: str) -> dict[str, Any]:
    """One record as the rules see it: with the owner's patch of its fields (not of its SKUs) laid over it."""
    rec = status[COLLECTION[entity]].get(entity_id)
    if rec is None:
        return {}
    patch = status["overrides"].get(f"{entity}:{entity_id}")
    if not patch:
        return rec
    return {**rec, **{k: v for k, v in patch.items() if not k.startswith("sku:")}}


def build_index(status: dict[str, Any]) -> dict[str, Any]:
    """The index of ``status`` built from all of its records (an old status, or after an owner's patch)."""
    idx: dict[str, Any] = {"v": INDEX_VERSION, **{name: {} for _, _, name in _LINKS}, **{name: [] for name in _SETS}}
    status["index"] = idx
    for entity in ("job", "invoice", "payment", "deal"):  # deals last: whether a won deal has a job is known
        for entity_id in sorted(status[COLLECTION[entity]]):
            reindex(status, entity, entity_id, {}, effective_record(status, entity, entity_id), fresh=True)
    idx["pending"] = sorted(cid for cid, e in status.get("commands", {}).items() if e.get("state") != "confirmed")
    return idx


def reindex(status: dict[str, Any], entity: str, entity_id: str, old: dict[str, Any], new: dict[str, Any],
            fresh: bool = False) -> None:
    """Move one record's entries in the index from what ``old`` said to what ``new`` says.

    ``old`` and ``new`` are the record as the rules see it. Copy on write: every container changed is a copy,
    so a forked status never touches its original.
    """
    idx = status["index"] if fresh else dict(status["index"])
    status["index"] = idx
    touched: set[str] = set()

    def edit(name: str) -> Any:
        if not fresh and name not in touched:
            touched.add(name)
            idx[name] = dict(idx[name]) if type(idx[name]) is dict else list(idx[name])
        return idx[name]

    for kind, field, name in _LINKS:
        if kind != entity or old.get(field) == new.get(field) and old:
            continue
        if old.get(field):
            links = edit(name)
            links[old[field]] = [x for x in links.get(old[field], ()) if x != entity_id]
            if not links[old[field]]:
                del links[old[field]]
        if new.get(field):
            links = edit(name)
            links[new[field]] = _inserted(links.get(new[field], []), entity_id)
    member = {
        "deal": (("won", bool(new.get("won"))),),
        "job": (("unlinked_jobs", bool(new) and not new.get("deal_id")),),
        "invoice": (("orphan_invoices", bool(new) and not new.get("deal_id") and not new.get("job_id")),
                    ("open_invoices", new.get("status") == "open")),
        "payment": (("loose_payments", bool(new) and not new.get("invoice_id")),),
    }[entity]
    for name, belongs in member:
        _member(idx, name, entity_id, belongs, edit)
    if entity == "deal":
        _member(idx, "jobless_won", entity_id, bool(new.get("won")) and not idx["deal_jobs"].get(entity_id), edit)
    elif entity == "job" and not fresh and old.get("deal_id") != new.get("deal_id"):
        for deal_id in (old.get("deal_id"), new.get("deal_id")):
            deal = status["deals"].get(deal_id or "")
            if deal is not None:
                _member(idx, "jobless_won", deal_id, bool(effective_record(status, "deal", deal_id).get("won"))
                        and not idx["deal_jobs"].get(deal_id), edit)


def _member(idx: dict[str, Any], name: str, item: str, belongs: bool, edit: Any) -> None:
    items = idx[name]
    at = bisect.bisect_left(items, item)
    present = at < len(items) and items[at] == item
    if belongs and not present:
        edit(name).insert(at, item)
    elif present and not belongs:
        del edit(name)[at]


def _inserted(items: list[str], item: str) -> list[str]:
    at = bisect.bisect_left(items, item)
    return items if at < len(items) and items[at] == item else [*items[:at], item, *items[at:]]


def sorted_has(items: list[str], item: str) -> bool:
    """Whether the sorted list ``items`` holds ``item`` (binary search)."""
    at = bisect.bisect_left(items, item)
    return at < len(items) and items[at] == item


def _patched(status: dict[str, Any], entity: str) -> list[str]:
    """Ids of the records of ``entity`` an owner patched: the index lists them as patched, the raw record may differ."""
    prefix = entity + ":"
    return [ref[len(prefix):] for ref in status["overrides"] if ref.startswith(prefix)]
