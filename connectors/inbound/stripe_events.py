"""Stripe webhook events → canonical events.

- ``invoice.created|finalized|paid|payment_failed|voided|marked_uncollectible`` → invoice
- ``payment_intent.succeeded|payment_failed`` → payment
- ``customer.updated`` (``data.previous_attributes`` names the changed fields) → customer. Customers
  belong on the CRM's topic (the contract says the CRM owns them), so the event says
  ``source_system`` crm, ``source_vendor`` stripe and its entity id is the Stripe customer id.

Dedupe on the event id (Stripe redelivers). ``seq`` = ``created`` (seconds) × 1000 + the event type's
rank in the object's lifecycle, so two events of the same second never let an older state overwrite a
newer one (``invoice.paid`` ranks above ``invoice.finalized``); not contiguous.

The customer is taken from the Stripe customer's ``metadata.concord_customer_id`` (learnt from
``customer.*`` events), an object's own ``metadata.concord_customer_id``, or the identity map.
``request.idempotency_key`` equal to a Concord command id marks the echo of that command.
Signatures are verified with the official ``stripe`` library (tolerance 300 s).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import stripe

from connectors.inbound import common as c

VENDOR = "stripe"
CONTENT_TYPE = "application/json; format=stripe-event"
TOLERANCE_S = 300
RANK = {
    "invoice.created": 0, "invoice.finalized": 1, "invoice.payment_failed": 2, "invoice.marked_uncollectible": 3,
    "invoice.paid": 4, "invoice.voided": 4,
    "payment_intent.payment_failed": 1, "payment_intent.succeeded": 2,
    "customer.created": 0, "customer.updated": 1,
}


class SignatureError(Exception):
    """The Stripe-Signature header is missing, wrong or stale."""


def verify(body: bytes, header: str | None, secret: str | None, tolerance: int = TOLERANCE_S) -> None:
    """Raise SignatureError unless ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds."""
    try:
        stripe.WebhookSignature.verify_header(body, header, secret, tolerance=tolerance)
    except stripe.SignatureVerificationError as exc:
        raise SignatureError(str(exc).split(".")[0]) from exc
    except UnicodeDecodeError:  # the library decodes first; such a body is checked as bytes, decoded later
        _verify_bytes(body, header, secret, tolerance)


def _verify_bytes(body: bytes, header: str | None, secret: str | None, tolerance: int) -> None:
    """Stripe's v1 scheme over the raw bytes (HMAC-SHA256 of ``t.body``), for a body that is not UTF-8."""
    if not header or not secret:
        raise SignatureError("No Stripe-Signature header value or no webhook secret")
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    stamps = [v for k, v in parts if k == "t"]
    if not stamps or not stamps[0].isdigit():
        raise SignatureError("Unable to extract timestamp and signatures from header")
    expected = hmac.new(secret.encode(), stamps[0].encode() + b"." + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, v) for k, v in parts if k == "v1"):
        raise SignatureError("No signatures found matching the expected signature for payload")
    if tolerance and int(stamps[0]) < time.time() - tolerance:
        raise SignatureError("Timestamp outside the tolerance zone")


def _lines(inv: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for li in (inv.get("lines") or {}).get("data") or []:
        price = li.get("price") or {}
        details = ((li.get("pricing") or {}).get("price_details")) or {}
        meta = li.get("metadata") or {}
        sku = meta.get("sku") or price.get("lookup_key") or price.get("id") or details.get("price") \
            or price.get("product") or details.get("product") or li.get("id")
        qty = li.get("quantity") or 1
        unit = price.get("unit_amount")
        if unit is None and (li.get("pricing") or {}).get("unit_amount_decimal") is not None:
            unit = int(float(li["pricing"]["unit_amount_decimal"]))
        if unit is None:
            unit = int(li.get("amount") or 0) // int(qty)
        out.append(c.line(str(sku), qty, unit, li.get("description") or ""))
    return out


def _customer_of(obj: dict[str, Any], ctx: c.Context) -> tuple[str | None, list[dict[str, Any]]]:
    cust = obj.get("customer")
    cust_id = cust.get("id") if isinstance(cust, dict) else cust
    direct = (obj.get("metadata") or {}).get("concord_customer_id")
    if isinstance(cust, dict):
        direct = direct or (cust.get("metadata") or {}).get("concord_customer_id")
    hints = {"name": obj.get("customer_name"), "email": obj.get("customer_email") or obj.get("receipt_email")}
    return c.resolve_customer(ctx, "billing", cust_id, hints, direct=direct)


def map_record(record: Any, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Map one Stripe event object."""
    if not isinstance(record, dict) or record.get("object", "event") != "event":
        raise c.BadInput("not a Stripe event object")
    event_id = str(c.require(record, "id"))
    etype = str(c.require(record, "type"))
    created = c.to_int(c.require(record, "created"), "created")
    obj = c.require(record, "data", "object")
    if not isinstance(obj, dict):
        raise c.BadInput("data.object is not an object", event_id)
    if etype not in RANK:
        raise c.BadInput(f"event type {etype!r} is not mapped", event_id)
    obj_id = str(c.require(obj, "id", what="data.object.id"))
    prev = (record.get("data") or {}).get("previous_attributes") or {}
    caused_by = c.command_id_from((record.get("request") or {}).get("idempotency_key"),
                                  (obj.get("metadata") or {}).get("concord_command_id"), bare_ok=True)
    meta = obj.get("metadata") or {}
    op = "create" if etype.endswith(".created") else "update"
    changed = sorted(prev)
    if etype.startswith("invoice."):
        entity = "invoice"
        st = obj.get("status_transitions") or {}
        payload = c.invoice(c.require(obj, "status", what="data.object.status"), meta.get("concord_deal_id"),
                            meta.get("concord_job_id"), obj.get("amount_due") or 0, obj.get("amount_paid") or 0,
                            obj.get("currency") or "usd", _lines(obj), c.to_ms(st.get("finalized_at")),
                            c.to_ms(obj.get("due_date")))
        customer_id, candidates = _customer_of(obj, ctx)
        changed = changed or ["status"]
    elif etype.startswith("payment_intent."):
        entity = "payment"
        err = obj.get("last_payment_error") or {}
        status = "succeeded" if etype.endswith(".succeeded") else "failed"
        inv = obj.get("invoice")
        amount = (obj.get("amount_received") if status == "succeeded" else None) or obj.get("amount") or 0
        payload = c.payment(status, meta.get("concord_invoice_id") or (inv.get("id") if isinstance(inv, dict) else inv),
                            amount, obj.get("currency") or "usd",
                            c.to_int(meta.get("attempt") or 1, "metadata.attempt"),
                            (err.get("code") or err.get("message")) if status == "failed" else None)
        customer_id, candidates = _customer_of(obj, ctx)
        changed = changed or ["status"]
    else:
        entity = "customer"
        direct = meta.get("concord_customer_id")
        addr = obj.get("address") or {}
        address = ", ".join(str(addr[k]) for k in ("line1", "line2", "city", "state", "postal_code", "country")
                            if addr.get(k)) or None
        payload = c.customer(obj.get("name") or obj.get("email") or obj_id, obj.get("email"), obj_id, None, None,
                             address, {"billing": obj_id})
        if ctx.identity is not None and direct:
            ctx.identity.link("billing", obj_id, direct)
            ctx.identity.learn_profile(direct, obj.get("name"), obj.get("email"))
        customer_id, candidates = c.resolve_customer(ctx, "billing", obj_id,
                                                     {"name": obj.get("name"), "email": obj.get("email")}, direct)
        field_names = {"name": "name", "email": "email", "address": "billing_address", "metadata": "external_ids"}
        changed = sorted({field_names.get(k, k) for k in prev})
    ev = c.change_event(event_id=f"stripe:{event_id}", vendor=VENDOR, entity_type=entity, entity_id=obj_id,
                        seq=created * 1000 + RANK[etype], op=op, occurred_at=created * 1000, payload=payload, raw=raw,
                        content_type=CONTENT_TYPE, ctx=ctx, customer_id=customer_id, changed_fields=changed,
                        caused_by_command_id=caused_by)
    c.check(ev)
    return c.Outcome(events=[c.Mapped(ev, f"stripe:{event_id}", candidates)])


def parse(raw: bytes) -> Any:
    """A webhook body: one event as JSON."""
    return json.loads(raw)
