"""Flow rules: ``(status, event) -> (status, commands, exceptions)``, pure and deterministic.

Decisions are derived from the customer's facts, not from the order events arrived in: after each event
the rules list every command the facts warrant and issue those not issued before, and every exception
the facts warrant; an exception that is no longer warranted (the data was fixed) is resolved. So any
interleaving of the same per-entity histories ends in the same status and the same command ids.

After each decision every warranted command is issued and the open exceptions are exactly those warranted,
so what a record warrants can only change when a fact it depends on changes. An event therefore looks again
only at the records it concerns (``touched``: the record itself and those whose rules read it, found through
the status index) and keeps the open exceptions of all others as they are: the same decisions as looking at
every record, at a cost that does not grow with the customer's history. A status without a valid index (one
written before it existed) and an owner's patch are decided in full.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from concord.contracts.topics import SOURCE_OF
from concord.domain import confirm
from concord.domain.flow_config import FlowConfig
from concord.domain.ids import command_id, stable_id
from concord.domain.status import (
    COLLECTION,
    apply_event,
    build_index,
    clone,
    customer_record,
    effective_record,
    empty_status,
    fork,
    index_valid,
    invoice_paid,
    invoices_of,
    refresh_positions,
    sorted_has,
)
from concord.exceptions import ValidationError

__all__ = ["Outcome", "act", "command_id", "decide", "empty_status", "stable_id"]
CUSTOMER_FIELDS = ("billing_account_id", "billing_terms", "billing_policy", "email", "name", "billing_address")
# Reasons only the time-driven rules (concord/domain/timed_rules.py) open and close.
TIMED_REASONS = frozenset({"command_unconfirmed", "unbilled_work", "won_not_billed", "billing_drift",
                           "customer_drift", "overdue_invoice"})
_META = ("event_id", "trace_id", "occurred_at", "seq", "deleted", "won", "issued", "position")


@dataclass
class Outcome:
    """What one event changed and caused."""

    status: dict[str, Any]
    commands: list[dict[str, Any]] = field(default_factory=list)
    exceptions: list[dict[str, Any]] = field(default_factory=list)  # opened now (drafts for routing)
    resolved: list[dict[str, Any]] = field(default_factory=list)  # closed now because the data was fixed
    updated: list[dict[str, Any]] = field(default_factory=list)  # still open, but what is wrong has changed
    facts: dict[str, Any] = field(default_factory=dict)


def decide(status: dict[str, Any] | None, event: dict[str, Any], cfg: FlowConfig, now: int) -> Outcome:
    """Apply ``event`` to a copy of ``status`` and return the new status with what it causes."""
    key = event["customer_id"] or f"unknown:{event['entity_type']}:{event['entity_id']}"
    entity, entity_id = event["entity_type"], event["entity_id"]
    st = _fork_for(status, entity) if status else empty_status(key)
    was_issued = bool(st["invoices"].get(entity_id, {}).get("issued")) if entity == "invoice" else True
    was_completed = bool(st["jobs"].get(entity_id, {}).get("completed_at")) if entity == "job" else True
    incremental = index_valid(st) and st["customer_id"] is not None
    if incremental:
        raw_old = _raw(st, entity, entity_id)
        old = effective_record(st, entity, entity_id) if entity != "customer" else customer_record(st) or {}
    if not apply_event(st, event):
        return Outcome(status if status else st, facts={"stale": True})
    if not incremental:
        build_index(st)
        refresh_positions(st)
        return settle(st, cfg, now, event, was_issued, was_completed)
    new = effective_record(st, entity, entity_id) if entity != "customer" else customer_record(st) or {}
    deals, jobs = _moved(st, entity, entity_id, raw_old, _raw(st, entity, entity_id))
    refresh_positions(st, deals, jobs, owned=(COLLECTION[entity],) if entity in COLLECTION else ())
    return settle(st, cfg, now, event, was_issued, was_completed, touched(st, entity, entity_id, old, new))


def _fork_for(status: dict[str, Any], entity: str) -> dict[str, Any]:
    """A copy of ``status`` that deciding one event of ``entity`` may change without touching the original.

    Only what every decision writes is copied here (the entity's collection, open exceptions); the rest
    (other collections, sequence numbers, commands, the index) is copied where it is changed.
    A status without a valid index is decided in full, and gets a full fork.
    """
    if not index_valid(status) or not status.get("customer_id"):
        return fork(status)
    st = dict(status)
    if entity in COLLECTION:
        st[COLLECTION[entity]] = dict(status[COLLECTION[entity]])
    st["exceptions"] = {k: dict(v) for k, v in status["exceptions"].items()}
    for name in ("overrides", "discarded", "parked", "commands", "overdue"):
        st.setdefault(name, {})
    return st


def _raw(st: dict[str, Any], entity: str, entity_id: str) -> dict[str, Any]:
    if entity == "customer":
        return {}
    return st[COLLECTION[entity]].get(entity_id) or {}


def _moved(st: dict[str, Any], entity: str, entity_id: str, old: dict[str, Any],
           new: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The deals and jobs whose position (which reads the records as stored) an event of ``entity`` may change."""
    deals: set[str] = set()
    jobs: set[str] = set()
    jobs_now = st["jobs"]

    def invoice(inv: dict[str, Any]) -> None:
        jobs.add(inv.get("job_id") or "")
        deals.add(inv.get("deal_id") or "")
        deals.add(jobs_now.get(inv.get("job_id") or "", {}).get("deal_id") or "")

    if entity == "deal":
        deals.add(entity_id)
    elif entity == "job":
        jobs.add(entity_id)
        deals.update((old.get("deal_id") or "", new.get("deal_id") or ""))
    elif entity == "invoice":
        invoice(old)
        invoice(new)
    elif entity == "payment":
        for inv_id in {old.get("invoice_id"), new.get("invoice_id")} - {None}:
            invoice(st["invoices"].get(inv_id) or {})
    deals.discard("")
    jobs.discard("")
    return deals, jobs


# What of a customer's CRM record the deal and job rules read: any other change leaves them as they were.
_CUSTOMER_META = frozenset({"event_id", "trace_id", "occurred_at", "seq"})


def touched(st: dict[str, Any], entity: str, entity_id: str, old: dict[str, Any],
            new: dict[str, Any]) -> dict[str, set[str]]:
    """The records (by entity, ids) whose rules read what one event changed.

    ``old`` and ``new`` are the record as the rules saw it before and see it now. Every other record warrants
    what it warranted.
    """
    out: dict[str, set[str]] = {"deal": set(), "job": set(), "invoice": set(), "payment": set()}
    idx = st["index"]
    if entity == "customer":
        if {k: v for k, v in old.items() if k not in _CUSTOMER_META} != \
                {k: v for k, v in new.items() if k not in _CUSTOMER_META}:  # billing setup: every deal and job
            out["deal"].update(st["deals"])
            out["job"].update(st["jobs"])
        return out
    out[entity].add(entity_id)
    if entity == "deal":
        out["invoice"].update(idx["deal_invoices"].get(entity_id, ()))  # billed against the deal's lines
        out["invoice"].update(idx["orphan_invoices"])  # their suggestions list won deals
        out["job"].update(idx["unlinked_jobs"])  # theirs list won deals without a job
    elif entity == "job":
        out["invoice"].update(idx["job_invoices"].get(entity_id, ()))  # the job's lines, its deal
        if old.get("deal_id") != new.get("deal_id") or not old:
            out["job"].update(idx["unlinked_jobs"])
    elif entity == "invoice":
        for rec in (old, new):
            out["job"].add(rec.get("job_id") or "")  # a cancelled job's invoices
            out["invoice"].update(idx["job_invoices"].get(rec.get("job_id") or "", ()))  # duplicates
            out["invoice"].update(idx["deal_invoices"].get(rec.get("deal_id") or "", ()))
        out["payment"].update(idx["invoice_payments"].get(entity_id, ()))  # a failed payment of a paid invoice
        out["payment"].update(idx["loose_payments"])  # their suggestions list open invoices
    elif entity == "payment":
        for inv_id in {old.get("invoice_id"), new.get("invoice_id")} - {None}:  # whether the invoice is paid
            out["invoice"].add(inv_id)
            out["job"].add(effective_record(st, "invoice", inv_id).get("job_id") or "")
            out["payment"].update(idx["invoice_payments"].get(inv_id, ()))
    for ids in out.values():
        ids.discard("")
    return out


def settle(st: dict[str, Any], cfg: FlowConfig, now: int, event: dict[str, Any],
           was_issued: bool = True, was_completed: bool = True,
           touched: dict[str, set[str]] | None = None) -> Outcome:
    """Issue what the facts in ``st`` warrant and not yet issued; open and resolve exceptions to match.

    ``touched`` (see ``touched``) limits the look to the records an event concerns; None looks at all.
    """
    commands, exceptions = warranted(st, cfg, touched)
    issued = st["issued"] if touched is not None else sorted(set(st["issued"]))
    echo = event.get("caused_by_command_id")
    out = Outcome(st)
    pending = list(st["index"]["pending"]) if index_valid(st) else None
    new_ids = []
    for cmd in commands:
        if sorted_has(issued, cmd["command_id"]) or cmd["command_id"] in new_ids:
            continue
        new_ids.append(cmd["command_id"])
        if echo and cmd["target_system"] == event["source_system"]:
            out.facts.setdefault("suppressed_echo", []).append(cmd["command_id"])
            continue  # the source made this change because we asked; telling it again would loop
        by_entity = cmd.pop("caused_by_entity")
        payload = cmd["payload"]
        cmd["payload"] = json.dumps(payload, sort_keys=True)  # only now: most warranted ones were issued
        out.commands.append({**cmd, "caused_by": sorted({event["event_id"], *by_entity}),
                             "trace_id": cmd["trace_id"] or event["trace_id"], "issued_at": now,
                             "source_occurred_at": event["occurred_at"]})
        if cfg.confirm_within_s.get(cmd["type"]) is not None and cmd["command_id"] not in st["commands"]:
            st["commands"] = dict(st["commands"])  # copied only when it changes (see _fork_for)
            confirm.track(st, out.commands[-1], payload, cfg, now)
            if pending is not None:
                bisect.insort(pending, cmd["command_id"])
    if new_ids:
        issued = list(issued)
        for cid in new_ids:
            bisect.insort(issued, cid)
    st["issued"] = issued
    confirmed = _observe(st, event, now, pending, new_ids, touched is None)
    if confirmed:
        out.facts["confirmed"] = confirmed
    keep = None
    if touched is not None:  # the open exceptions of records not looked at stay open as they are
        keep = {eid for eid, e in st["exceptions"].items() if e["reason_code"] not in TIMED_REASONS
                and e["entity_type"] in touched and e["entity_id"] not in touched[e["entity_type"]]}
    sweep(st, exceptions, now, event, out, lambda reason: reason not in TIMED_REASONS, keep)
    # Judged once per invoice, when both facts are first known: the feeds may bring the invoice before the completion.
    on_time = None
    if event["entity_type"] == "invoice" and not was_issued:
        on_time = _invoiced_on_time(st, event["entity_id"], cfg)
    elif event["entity_type"] == "job" and not was_completed:
        bills = sorted((i["issued_at"], i["id"]) for i in invoices_of(st, job_id=event["entity_id"])
                       if i.get("issued") and i.get("issued_at"))
        on_time = _invoiced_on_time(st, bills[0][1], cfg) if bills else None
    if on_time is not None:
        out.facts["invoice_on_time"] = on_time
    return out


# The records whose change can show a command of each type done (confirm.matching_record): any other event
# can confirm a pending command only by echoing its id.
_CONFIRMED_BY = {"create_invoice": frozenset({"invoice", "job"}), "create_job": frozenset({"job"}),
                 "update_deal_billing_status": frozenset({"deal"}), "void_invoice": frozenset({"invoice"})}


def _observe(st: dict[str, Any], event: dict[str, Any], now: int, pending: list[str] | None,
             fresh: list[str], everything: bool) -> list[str]:
    """confirm.observe over the commands not confirmed yet that this event can confirm, written back to ``st``.

    After every decision no pending command has a record showing it done, so only those just issued
    (``fresh``), the one the event echoes and those whose type the event's entity can confirm are looked at;
    ``everything`` (a decision in full) looks at all pending ones.
    """
    if pending is None:
        return confirm.observe(st, event, now)
    commands, entity, echo = st["commands"], event["entity_type"], event.get("caused_by_command_id")
    look = {cid: commands[cid] for cid in pending if cid in commands and (
        everything or cid == echo or cid in fresh or entity in _CONFIRMED_BY.get(commands[cid]["type"], ()))}
    if not look:
        confirmed: list[str] = []
    else:
        view = dict(st, commands=look)
        confirmed = confirm.observe(view, event, now)
        if confirmed:
            st["commands"] = {**commands, **{cid: view["commands"][cid] for cid in confirmed}}
            done = set(confirmed)
            pending = [cid for cid in pending if cid not in done]
    if pending != st["index"]["pending"]:
        st["index"] = {**st["index"], "pending": pending}
    return confirmed


def sweep(st: dict[str, Any], drafts: list[dict[str, Any]], now: int, event: dict[str, Any], out: Outcome,
          owns: Callable[[str], bool], keep: set[str] | None = None) -> None:
    """Open, update and resolve the exceptions of the reasons ``owns`` accepts so that ``drafts`` are what is open.

    ``keep``: open exceptions that stay as they are (of records the drafts were not made for).
    """
    discarded = st.get("discarded", {})
    wanted = {d["exception_id"]: d for d in drafts if d["exception_id"] not in discarded}
    for eid, draft in wanted.items():
        digest = hashlib.blake2b(json.dumps([draft["message"], draft["suggestions"]], sort_keys=True).encode(),
                                 digest_size=8).hexdigest()
        known = st["exceptions"].get(eid)
        if known is None:
            st["exceptions"][eid] = {"reason_code": draft["reason_code"], "entity_type": draft["entity_type"],
                                     "entity_id": draft["entity_id"], "opened_at": now, "digest": digest,
                                     "amount_at_risk_cents": draft.get("amount_at_risk_cents"),
                                     "currency": draft.get("currency")}
            out.exceptions.append({**draft, "opened_at": now})
        elif known.get("digest") != digest:
            known.update(digest=digest, amount_at_risk_cents=draft.get("amount_at_risk_cents"),
                         currency=draft.get("currency"))
            out.updated.append({**draft, "opened_at": known["opened_at"]})
    why = event.get("why") or f"{event['entity_type']} {event['entity_id']} changed"
    keep = keep or set()
    for eid in sorted(e for e, entry in st["exceptions"].items()
                      if e not in wanted and e not in keep and owns(entry["reason_code"])):
        gone = st["exceptions"].pop(eid)
        gone.pop("digest", None)  # "original" stays: the resolution record names the event it was raised on
        out.resolved.append({**gone, "exception_id": eid, "customer_id": st["customer_id"],
                             "trace_id": event["trace_id"], "source_system": SOURCE_OF.get(gone["entity_type"]),
                             "message": f"resolved: the data now satisfies the rule ({why})"})


# ---- owners' actions -----------------------------------------------------------------------------
def act(status: dict[str, Any], action: dict[str, Any], cfg: FlowConfig, now: int) -> Outcome:
    """Acknowledge, discard or resolve (patch, then replay the rules) one open exception of this customer.

    Raises ValidationError, changing nothing, when the patch names a field the record does not have, a value of
    the wrong type or an unknown SKU, or when the replay still fails for the same reason.
    """
    st = clone(status)
    eid = action["exception_id"]
    entry = st["exceptions"].get(eid)
    if entry is None:
        raise ValidationError(f"exception {eid} is not open")
    replay = {"event_id": action["action_id"], "trace_id": entry.get("trace_id") or action["action_id"],
              "entity_type": entry["entity_type"], "entity_id": entry["entity_id"], "source_system": None,
              "occurred_at": now, "caused_by_command_id": None}
    if action["action"] == "acknowledge":
        entry["state"] = "acknowledged"
        return Outcome(st)
    if action["action"] == "discard":
        st["exceptions"].pop(eid)
        st.setdefault("discarded", {})[eid] = entry["reason_code"]
        build_index(st)
        return settle(st, cfg, now, replay)
    if action["action"] != "resolve":
        raise ValidationError(f"unknown action {action['action']!r}")
    apply_patch(st, entry, action["patch"], cfg)
    build_index(st)  # the index holds the records as patched
    out = settle(st, cfg, now, replay)
    if eid in out.status["exceptions"]:
        raise ValidationError(f"the patch does not fix it: {_why_still(out.status, eid, cfg)}")
    for draft in out.exceptions:  # the replay got further and failed again: same entity, a new reason
        draft["message"] = f"replay after resolving {entry['reason_code']} failed: {draft['message']}"
        draft["attempts"] = entry.get("attempts", 1) + 1
    return out


def _why_still(st: dict[str, Any], eid: str, cfg: FlowConfig) -> str:
    for draft in warranted(st, cfg)[1]:
        if draft["exception_id"] == eid:
            return draft["message"]
    return "it is still warranted"


def apply_patch(st: dict[str, Any], entry: dict[str, Any], patch: dict[str, str], cfg: FlowConfig) -> None:
    """Record an owner's patch as an override of the record the exception is about (or of its customer)."""
    if not patch:
        raise ValidationError("a resolution needs a patch: --set field=value or --choose N")
    entity, entity_id = entry["entity_type"], entry["entity_id"]
    rec = (customer_record(st) or {}) if entity == "customer" else st[COLLECTION[entity]].get(entity_id, {})
    for name, value in patch.items():
        if name.startswith("sku:"):
            sku = name[4:]
            if sku not in {ln["sku"] for ln in rec.get("lines", [])}:
                raise ValidationError(f"{entity} {entity_id} has no line with SKU {sku!r}")
            if value not in cfg.catalog:
                raise ValidationError(f"{value!r} is not in the catalog (known: {', '.join(sorted(cfg.catalog))})")
            target, converted = f"{entity}:{entity_id}", value
        elif name in CUSTOMER_FIELDS and st["customer_id"] and (entity == "customer" or entry["reason_code"] in (
                "missing_billing_account", "missing_billing_terms")):
            target, converted = f"customer:{st['customer_id']}", value
        elif name in rec and name not in _META and name != "lines":
            target, converted = f"{entity}:{entity_id}", _like(rec[name], value, name)
        elif name == "action":
            raise ValidationError("an action suggestion is carried out in the owning system; discard the exception "
                                  "with --why once it is done")
        else:
            known = sorted(k for k in rec if k not in _META and k != "lines")
            raise ValidationError(f"{entity} {entity_id} has no field {name!r} to patch (it has: {', '.join(known)})")
        st["overrides"].setdefault(target, {})[name] = converted


def _like(current: Any, value: str, name: str) -> Any:
    """``value`` converted to the type of the field's current value."""
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, int):
        try:
            return int(value)
        except ValueError:
            raise ValidationError(f"{name} takes a whole number, not {value!r}") from None
    return value or None


# ---- what the facts warrant ---------------------------------------------------------------------
def warranted(st: dict[str, Any], cfg: FlowConfig, touched: dict[str, set[str]] | None = None,
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every command and exception the customer's current facts call for (issued or not).

    With ``touched``, only what those records (and the customer's own record) warrant.
    """
    commands: list[dict[str, Any]] = []
    exceptions: list[dict[str, Any]] = []
    st = _effective(st)
    cust = customer_record(st)
    policy = _policy(cust, cfg)

    def each(entity: str) -> list[tuple[str, dict[str, Any]]]:
        records = st[COLLECTION[entity]]
        if touched is None:
            return sorted(records.items())
        return [(i, records[i]) for i in sorted(touched[entity]) if i in records]

    if cust and st["customer_id"] and not cust.get("deleted"):
        commands += _update_customer(st, cust)
    for deal_id, deal in each("deal"):
        if not deal.get("won") or deal.get("deleted"):
            continue
        ctype, target = ("create_invoice", "billing") if policy == "on_close" else ("create_job", "dispatch")
        if sorted_has(st["issued"], command_id(ctype, target, "deal", deal_id)):
            continue
        lines = deal.get("lines", [])
        problems = _billing_problems(st, cust, cfg, "deal", deal_id, lines, deal)
        if problems:
            exceptions += problems
            continue
        payload = _bill_payload(st, cust, cfg, lines) | {"deal_id": deal_id}
        if ctype == "create_job":
            payload |= {"address": cust.get("billing_address"),
                        "account_ref": (cust.get("external_ids") or {}).get("dispatch")}
        commands.append(_command(ctype, target, st, "deal", deal_id, deal, payload))
    for job_id, job in each("job"):
        commands_j, exceptions_j = _job_rules(st, cust, cfg, policy, job_id, job)
        commands += commands_j
        exceptions += exceptions_j
    for inv_id, inv in each("invoice"):
        commands_i, exceptions_i = _invoice_rules(st, cfg, inv_id, inv)
        commands += commands_i
        exceptions += exceptions_i
    exceptions += _payment_rules(st, each("payment"))
    return commands, exceptions


def _job_rules(st: dict[str, Any], cust: dict[str, Any] | None, cfg: FlowConfig, policy: str, job_id: str,
               job: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    commands: list[dict[str, Any]] = []
    exceptions: list[dict[str, Any]] = []
    if not job.get("completed_at") or job.get("deleted"):
        return commands, exceptions
    if not job.get("deal_id") or not st["customer_id"]:
        missing = " and ".join(n for n, v in (("deal", job.get("deal_id")), ("customer", st["customer_id"])) if not v)
        candidates = _jobless_won(st)
        exceptions.append(_exception(
            "unlinked_job", st, "job", job_id, job,
            f"job {job_id} was completed but names no {missing}, so its work cannot be billed to anyone",
            [{"field": "deal_id", "value": d, "label": f"won deal {d} has no job yet", "score": 0.6}
             for d in candidates[:5]]))
        return commands, exceptions
    if policy == "on_completion":
        cid = command_id("create_invoice", "billing", "job", job_id)
        if not sorted_has(st["issued"], cid):
            lines = job.get("lines", [])
            problems = _billing_problems(st, cust, cfg, "job", job_id, lines, job)
            if problems:
                exceptions += problems
            elif _billable(lines, cfg):
                payload = _bill_payload(st, cust, cfg, lines) | {
                    "job_id": job_id, "deal_id": job["deal_id"], "completed_at": job["completed_at"]}
                commands.append(_command("create_invoice", "billing", st, "job", job_id, job, payload))
    if job.get("status") == "cancelled":
        for inv in invoices_of(st, job_id=job_id):
            if not inv.get("issued"):
                continue
            if cfg.cancelled_after_invoice == "void_invoice" and not invoice_paid(st, inv["id"]):
                commands.append(_command("void_invoice", "billing", st, "invoice", inv["id"], inv,
                                         {"invoice_id": inv["id"], "job_id": job_id,
                                          "reason": f"job {job_id} was cancelled after it was invoiced"}))
            else:
                why = "the invoice is already paid" if invoice_paid(st, inv["id"]) else "policy asks for a review"
                exceptions.append(_exception(
                    "invoiced_job_cancelled", st, "job", job_id, job,
                    f"job {job_id} was cancelled after invoice {inv['id']} was issued and {why}",
                    [{"field": "action", "value": "void_invoice", "label": f"void invoice {inv['id']}",
                      "score": 0.5}, {"field": "action", "value": "credit_note", "label": "issue a credit note",
                                      "score": 0.4}]))
    return commands, exceptions


def _invoice_rules(st: dict[str, Any], cfg: FlowConfig, inv_id: str,
                   inv: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    commands: list[dict[str, Any]] = []
    exceptions: list[dict[str, Any]] = []
    if inv.get("deleted") or not inv.get("issued"):
        return commands, exceptions
    job = st["jobs"].get(inv.get("job_id") or "")
    deal_id = inv.get("deal_id") or (job or {}).get("deal_id")
    if deal_id:  # a voided invoice was still issued once: the CRM heard of it either way
        commands.append(_command("update_deal_billing_status", "crm", st, "deal", deal_id, inv,
                                 {"deal_id": deal_id, "billing_status": "invoiced", "invoice_id": inv_id},
                                 key=("invoiced", inv_id)))
        if invoice_paid(st, inv_id):
            commands.append(_command("update_deal_billing_status", "crm", st, "deal", deal_id, inv,
                                     {"deal_id": deal_id, "billing_status": "paid", "invoice_id": inv_id},
                                     key=("paid", inv_id)))
    if inv.get("status") == "void":
        return commands, exceptions
    if not inv.get("deal_id") and not inv.get("job_id"):
        exceptions.append(_exception(
            "orphan_invoice", st, "invoice", inv_id, inv,
            f"invoice {inv_id} ({inv['amount_due_cents'] / 100:.2f} {inv['currency']}) names no deal and no job",
            [{"field": "deal_id", "value": d, "label": f"deal {d} ({deal['amount_cents'] / 100:.2f})",
              "score": 0.9 if deal["amount_cents"] == inv["amount_due_cents"] else 0.3}
             for d, deal in _first(st, "deal", "won", lambda deal: deal.get("won"))]))
    expected = None
    if inv.get("job_id") and job is not None:
        expected = _total(job.get("lines", []), cfg)
    elif inv.get("deal_id") and not inv.get("job_id") and inv["deal_id"] in st["deals"]:
        expected = _total(st["deals"][inv["deal_id"]].get("lines", []), cfg)
    if expected is not None and cfg.amount_tolerance.exceeded(expected, inv["amount_due_cents"]):
        basis = f"job {inv['job_id']}" if inv.get("job_id") else f"deal {inv['deal_id']}"
        exceptions.append(_exception(
            "amount_mismatch", st, "invoice", inv_id, inv,
            f"invoice {inv_id} asks {inv['amount_due_cents'] / 100:.2f} {inv['currency']} but the billable lines "
            f"of {basis} come to {expected / 100:.2f}",
            [{"field": "amount_due_cents", "value": str(expected), "label": f"the lines of {basis}", "score": 0.9}]))
    siblings = [i for i in invoices_of(st, job_id=inv["job_id"]) if i.get("issued") and i.get("status") != "void"] \
        if inv.get("job_id") else [i for i in invoices_of(st, deal_id=inv.get("deal_id")) if i.get("issued")
                                   and i.get("status") != "void" and not i.get("job_id")] if inv.get("deal_id") else []
    first = min(siblings, key=lambda i: (i.get("issued_at") or 0, i["id"]), default=None)
    if first is not None and first["id"] != inv_id:
        exceptions.append(_exception(
            "duplicate_invoice", st, "invoice", inv_id, inv,
            f"invoice {inv_id} bills the same {'job' if inv.get('job_id') else 'deal'} as invoice {first['id']}",
            [{"field": "action", "value": "void_invoice", "label": f"void {inv_id}, keep {first['id']}",
              "score": 0.8}]))
    return commands, exceptions


def _payment_rules(st: dict[str, Any], payments: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    exceptions = []
    for pay_id, pay in payments:
        if pay.get("deleted") or not pay.get("status"):
            continue
        inv_id = pay.get("invoice_id")
        if not inv_id:
            exceptions.append(_exception(
                "payment_without_invoice", st, "payment", pay_id, pay,
                f"payment {pay_id} of {pay['amount_cents'] / 100:.2f} {pay['currency']} names no invoice",
                [{"field": "invoice_id", "value": i, "label": f"open invoice {i}",
                  "score": 0.9 if v["amount_due_cents"] == pay["amount_cents"] else 0.3}
                 for i, v in _first(st, "invoice", "open_invoices", lambda v: v.get("status") == "open")]))
        elif pay["status"] == "failed" and not invoice_paid(st, inv_id):
            exceptions.append(_exception(
                "payment_failed", st, "payment", pay_id, pay,
                f"payment {pay_id} for invoice {inv_id} failed on attempt {pay['attempt']}"
                f"{': ' + pay['failure_reason'] if pay.get('failure_reason') else ''}",
                [{"field": "action", "value": "retry_payment", "label": "retry the payment method on file",
                  "score": 0.6}, {"field": "action", "value": "contact_customer",
                                  "label": "ask the customer for a new payment method", "score": 0.4}]))
    return exceptions


def _first(st: dict[str, Any], entity: str, listed: str, test: Callable[[dict[str, Any]], bool],
           n: int = 5) -> list[tuple[str, dict[str, Any]]]:
    """The first ``n`` records of ``entity`` (by id) that pass ``test``: from the index's ``listed`` if valid."""
    records = st[COLLECTION[entity]]
    ids = st["index"][listed] if index_valid(st) else sorted(records)
    out = []
    for rec_id in ids:
        if rec_id in records and test(records[rec_id]):
            out.append((rec_id, records[rec_id]))
            if len(out) == n:
                break
    return out


def _jobless_won(st: dict[str, Any]) -> list[str]:
    """Won deals no job names, in order (an unlinked job's suggestions)."""
    if index_valid(st):
        return list(st["index"]["jobless_won"][:5])
    linked = {j.get("deal_id") for j in st["jobs"].values()}
    return [d for d, deal in sorted(st["deals"].items()) if deal.get("won") and d not in linked][:5]


def _update_customer(st: dict[str, Any], cust: dict[str, Any]) -> list[dict[str, Any]]:
    master = {k: cust.get(k) for k in ("name", "email", "billing_address", "billing_terms", "billing_account_id")}
    try:
        digest = _master_digest(tuple(master.items()))
    except TypeError:  # a field that is not a plain string (unhashable): digest it uncached
        digest = _master_digest.__wrapped__(tuple(master.items()))
    payload = master | {"customer_id": st["customer_id"], "external_ids": cust.get("external_ids") or {}}
    return [_command("update_customer", target, st, "customer", st["customer_id"], cust, payload, key=(digest,))
            for target in ("billing", "dispatch")]


@functools.lru_cache(maxsize=1 << 15)
def _master_digest(master: tuple[tuple[str, Any], ...]) -> str:
    """The digest of a customer's master data (cached: it is recomputed on every event of the customer)."""
    return hashlib.blake2b(json.dumps(dict(master), sort_keys=True).encode(), digest_size=8).hexdigest()


# ---- validation and suggestions -------------------------------------------------------------------
def _billing_problems(st: dict[str, Any], cust: dict[str, Any] | None, cfg: FlowConfig, entity_type: str,
                      entity_id: str, lines: list[dict[str, Any]], rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Why ``entity`` cannot be billed yet: unknown customer, no billing account or terms, unmapped SKUs."""
    what = f"{entity_type} {entity_id}"
    problems = []
    if not st["customer_id"]:
        problems.append(_exception(
            "unknown_customer", st, entity_type, entity_id, rec,
            f"{what} names no customer, so it cannot be billed", []))
    elif cust is None or not cust.get("billing_account_id"):
        seen = "the CRM account has no billing account id" if cust else \
            f"no CRM account record has been seen for customer {st['customer_id']}"
        problems.append(_exception("missing_billing_account", st, entity_type, entity_id, rec,
                                   f"{what} is ready to bill but {seen}", _account_candidates(cust, cfg)))
    if cust is not None and st["customer_id"] and not cust.get("billing_terms"):
        problems.append(_exception(
            "missing_billing_terms", st, entity_type, entity_id, rec,
            f"{what} is ready to bill but customer {st['customer_id']} has no billing terms",
            [{"field": "billing_terms", "value": t, "label": t, "score": s}
             for t, s in (("net_30", 0.6), ("net_15", 0.2), ("due_on_receipt", 0.2))]))
    unmapped = sorted({ln["sku"] for ln in lines if ln["sku"] not in cfg.catalog})
    if unmapped:
        problems.append(_exception(
            "unmapped_sku", st, entity_type, entity_id, rec,
            f"{what} has SKU {', '.join(unmapped)} with no billing price in the catalog",
            [{"field": f"sku:{sku}", "value": m, "label": f"{sku} -> {m} ({cfg.catalog[m].name})", "score": 0.7}
             for sku in unmapped for m in difflib.get_close_matches(sku, list(cfg.catalog), n=3, cutoff=0.5)]))
    return problems


def _account_candidates(cust: dict[str, Any] | None, cfg: FlowConfig) -> list[dict[str, Any]]:
    """Likely billing accounts: a prior link the records carry, then directory matches by name and email domain."""
    out: list[dict[str, Any]] = []
    if not cust:
        return out
    for system, native in sorted((cust.get("external_ids") or {}).items()):
        if system in ("stripe", "billing"):
            out.append({"field": "billing_account_id", "value": native, "label": f"prior link from {system}",
                        "score": 0.95})
    domain = (cust.get("email") or "").rpartition("@")[2].lower()
    for acct in cfg.billing_directory:
        score = difflib.SequenceMatcher(None, (cust.get("name") or "").lower(), acct.name.lower()).ratio() * 0.7
        if domain and acct.email.lower().endswith("@" + domain):
            score += 0.3
        if score >= 0.5:
            out.append({"field": "billing_account_id", "value": acct.id, "label": f"{acct.name} <{acct.email}>",
                        "score": round(score, 3)})
    return sorted(out, key=lambda s: -s["score"])[:5]


# ---- building blocks ---------------------------------------------------------------------------------
def _policy(cust: dict[str, Any] | None, cfg: FlowConfig) -> str:
    policy = (cust or {}).get("billing_policy")
    return policy if policy in ("on_close", "on_completion") else cfg.default_billing_policy


def _effective(st: dict[str, Any]) -> dict[str, Any]:
    """The status as the rules should see it: owners' patches laid over the records (never stored into them)."""
    if not st["overrides"]:
        return st
    view = dict(st)
    for ref, patch in st["overrides"].items():
        entity, _, entity_id = ref.partition(":")
        collection = COLLECTION.get(entity)
        if collection is None or entity_id not in st[collection]:
            continue
        rec = st[collection][entity_id]
        fields = {k: v for k, v in patch.items() if not k.startswith("sku:")}
        lines = [dict(ln, sku=patch.get(f"sku:{ln['sku']}", ln["sku"])) for ln in rec.get("lines", [])]
        view[collection] = {**view[collection], entity_id: {**rec, **fields, "lines": lines}}
    return view


def _billable(lines: list[dict[str, Any]], cfg: FlowConfig) -> list[dict[str, Any]]:
    return [ln for ln in lines if ln["sku"] in cfg.catalog and cfg.catalog[ln["sku"]].billable]


def _total(lines: list[dict[str, Any]], cfg: FlowConfig) -> int:
    return sum(ln["quantity"] * ln["unit_price_cents"] for ln in _billable(lines, cfg))


def _bill_payload(st: dict[str, Any], cust: dict[str, Any], cfg: FlowConfig,
                  lines: list[dict[str, Any]]) -> dict[str, Any]:
    billable = _billable(lines, cfg)
    return {
        "customer_id": st["customer_id"], "billing_account_id": cust.get("billing_account_id"),
        "billing_terms": cust.get("billing_terms"),
        "lines": [{"sku": ln["sku"], "price_id": cfg.catalog[ln["sku"]].price_id, "quantity": ln["quantity"],
                   "unit_price_cents": ln["unit_price_cents"], "description": ln["description"]} for ln in billable],
        "amount_cents": _total(lines, cfg),
    }


def _command(ctype: str, target: str, st: dict[str, Any], entity_type: str, entity_id: str, rec: dict[str, Any],
             payload: dict[str, Any], key: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "command_id": command_id(ctype, target, entity_type, entity_id, *key), "type": ctype, "target_system": target,
        "customer_id": st["customer_id"], "entity_type": entity_type, "entity_id": entity_id,
        "payload": payload, "trace_id": rec.get("trace_id"),
        "caused_by_entity": [rec["event_id"]] if rec.get("event_id") else [],
    }


def _exception(reason: str, st: dict[str, Any], entity_type: str, entity_id: str, rec: dict[str, Any], message: str,
               suggestions: list[dict[str, Any]], key: tuple[str, ...] = (), amount: int | None = None,
               currency: str | None = None) -> dict[str, Any]:
    if amount is None:
        amount, currency = _money(st, entity_type, rec)
    return {
        "exception_id": stable_id(reason, entity_type, entity_id, *key), "reason_code": reason,
        "trace_id": rec.get("trace_id") or "", "source_system": SOURCE_OF.get(entity_type),
        "entity_type": entity_type, "entity_id": entity_id, "customer_id": st["customer_id"], "message": message,
        "suggestions": suggestions, "caused_by": rec.get("event_id"), "amount_at_risk_cents": amount,
        "currency": currency,
    }


exception_draft = _exception  # the time-driven rules build their drafts the same way


def is_billable_total(lines: list[dict[str, Any]], cfg: FlowConfig) -> int:
    """The cents of the billable lines among ``lines``."""
    return _total(lines, cfg)


def _money(st: dict[str, Any], entity_type: str, rec: dict[str, Any]) -> tuple[int | None, str | None]:
    """The money an entity's exception puts at risk, and its currency (None where no money is named)."""
    if entity_type == "invoice":
        return rec.get("amount_due_cents"), rec.get("currency")
    if entity_type == "payment":
        return rec.get("amount_cents"), rec.get("currency")
    if entity_type == "deal":
        return rec.get("amount_cents"), rec.get("currency")
    if entity_type == "job":
        lines = rec.get("lines") or []
        deal = st["deals"].get(rec.get("deal_id") or "", {})
        return sum(ln["quantity"] * ln["unit_price_cents"] for ln in lines) if lines else None, deal.get("currency")
    return None, None


def _invoiced_on_time(st: dict[str, Any], inv_id: str, cfg: FlowConfig) -> bool | None:
    """Whether a newly issued invoice went out within policy of the work it bills (None: not for completed work)."""
    inv = st["invoices"][inv_id]
    job = st["jobs"].get(inv.get("job_id") or "")
    if not job or not job.get("completed_at") or not inv.get("issued_at"):
        return None
    return inv["issued_at"] - job["completed_at"] <= cfg.on_time_invoice_hours * 3600 * 1000
