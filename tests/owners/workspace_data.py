"""Exception records and statuses shaped as the worker's tables hold them, for the workspace's pure tests."""

from __future__ import annotations

from typing import Any

from concord.contracts import events as ev
from concord.domain.routing import load_routing
from concord.domain.status import apply_event, empty_status, refresh_positions
from concord.owners.desk import table_record

NOW = 1_767_225_600_000
HOUR = 3_600_000


def record(n: int, reason: str = "missing_billing_account", *, customer: str | None = None, opened: int = NOW,
           state: str = "open", entity: tuple[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """One exception as exception_to_record holds it (routed by the repository's routing file)."""
    etype, eid = entity or ("deal", f"d-{n}")
    draft = {"exception_id": f"x{n:05d}", "reason_code": reason, "trace_id": f"trace:{n}", "source_system": "crm",
             "entity_type": etype, "entity_id": eid, "customer_id": customer or f"c-{n}", "opened_at": opened,
             "message": f"deal {eid} has no billing account", "suggestions": [
                 {"field": "billing_account_id", "value": f"cus_{n}", "label": "stripe id on the record"}]}
    rec = load_routing().route(draft, opened)
    rec.update(state=state, updated_at=opened, **extra)
    return table_record(rec)


def status_with_chain(customer: str, deal_id: str = "d-1") -> dict[str, Any]:
    """A customer with a won deal, its completed job, an open invoice and a failed payment."""
    st = empty_status(customer)
    lines = [ev.line("SVC-INSTALL", 2, 25_000)]
    acme = ev.customer("Acme", account=None, external_ids={"stripe": "cus_acme"})
    for e in (ev.change_event("customer", customer, 1, acme, customer, at=NOW),
              ev.change_event("deal", deal_id, 1, ev.deal("closed_won", lines), customer, at=NOW),
              ev.change_event("job", "j-1", 1, ev.job("completed", lines, deal_id=deal_id), customer, at=NOW),
              ev.change_event("invoice", "in-1", 1, ev.invoice("open", lines, job_id="j-1"), customer, at=NOW),
              ev.change_event("payment", "py-1", 1, ev.payment("failed", "in-1", 50_000, failure_reason="card"),
                              customer, at=NOW)):
        apply_event(st, e)
    refresh_positions(st)
    return st
