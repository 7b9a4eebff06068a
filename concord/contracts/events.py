"""Builders of canonical change events and their payloads (simulator, benchmarks and tests share them)."""

from __future__ import annotations

from typing import Any

from concord.contracts.topics import SOURCE_OF


def change_event(entity: str, entity_id: str, seq: int, payload: dict[str, Any] | None, customer_id: str | None, *,
                 at: int, event_id: str | None = None, op: str = "update", vendor: str = "generic",
                 contiguous: bool | None = None, trace_id: str | None = None, changed: list[str] | None = None,
                 caused_by_command_id: str | None = None) -> dict[str, Any]:
    """A canonical change event (schemas/change_event.avsc); billing sources do not promise contiguous seqs."""
    system = SOURCE_OF[entity]
    return {
        "event_id": event_id or f"{entity}:{entity_id}:{seq}", "source_system": system, "source_vendor": vendor,
        "entity_type": entity, "entity_id": entity_id, "customer_id": customer_id, "seq": seq,
        "seq_contiguous": system != "billing" if contiguous is None else contiguous, "op": op,
        "occurred_at": at, "ingested_at": at, "trace_id": trace_id or f"trace:{entity}:{entity_id}",
        "changed_fields": changed or [], "payload": payload, "caused_by_command_id": caused_by_command_id,
        "source_payload": None, "source_content_type": None,
    }


def line(sku: str, quantity: int = 1, unit_price_cents: int = 10_000, description: str = "") -> dict[str, Any]:
    """A quote, job or invoice line."""
    return {"sku": sku, "description": description or sku, "quantity": quantity, "unit_price_cents": unit_price_cents}


def total(lines: list[dict[str, Any]]) -> int:
    """The sum of a list of lines."""
    return sum(ln["quantity"] * ln["unit_price_cents"] for ln in lines)


def customer(name: str, *, email: str | None = None, account: str | None = None, terms: str | None = "net_30",
             policy: str | None = None, address: str | None = "1 Main St",
             external_ids: dict[str, str] | None = None) -> dict[str, Any]:
    """A CRM account record."""
    return {"name": name, "email": email, "billing_account_id": account, "billing_terms": terms,
            "billing_policy": policy, "billing_address": address, "external_ids": external_ids or {}}


def deal(stage: str, lines: list[dict[str, Any]], *, name: str = "deal", closed_at: int | None = None,
         billing_status: str | None = None, currency: str = "USD") -> dict[str, Any]:
    """A CRM deal record."""
    return {"name": name, "stage": stage, "amount_cents": total(lines), "currency": currency, "lines": lines,
            "closed_at": closed_at, "billing_status": billing_status}


def job(status: str, lines: list[dict[str, Any]], *, deal_id: str | None, scheduled_for: int | None = None,
        completed_at: int | None = None, account_ref: str | None = None) -> dict[str, Any]:
    """A dispatch job record."""
    return {"deal_id": deal_id, "status": status, "scheduled_for": scheduled_for, "completed_at": completed_at,
            "account_ref": account_ref, "lines": lines}


def invoice(status: str, lines: list[dict[str, Any]], *, deal_id: str | None = None, job_id: str | None = None,
            amount_due_cents: int | None = None, amount_paid_cents: int = 0, issued_at: int | None = None,
            due_at: int | None = None, currency: str = "USD",
            billed_to: dict[str, str | None] | None = None) -> dict[str, Any]:
    """A billing invoice record; ``billed_to``: billing's customer name, email and address, when its feed says."""
    to = billed_to or {}
    return {"status": status, "deal_id": deal_id, "job_id": job_id,
            "amount_due_cents": total(lines) if amount_due_cents is None else amount_due_cents,
            "amount_paid_cents": amount_paid_cents, "currency": currency, "lines": lines, "issued_at": issued_at,
            "due_at": due_at, "customer_name": to.get("name"), "customer_email": to.get("email"),
            "customer_address": to.get("address")}


def payment(status: str, invoice_id: str | None, amount_cents: int, *, attempt: int = 1,
            failure_reason: str | None = None, currency: str = "USD") -> dict[str, Any]:
    """A billing payment record."""
    return {"status": status, "invoice_id": invoice_id, "amount_cents": amount_cents, "currency": currency,
            "attempt": attempt, "failure_reason": failure_reason}
