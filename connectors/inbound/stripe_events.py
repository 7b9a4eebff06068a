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
``customer.*`` events), an object's own ``metadata.concord_customer_id``, or the identity map; the metadata
keys are configuration (connectors/config/join_keys.yaml, ``stripe``).
``request.idempotency_key`` equal to a Concord command id marks the echo of that command.
Signatures are verified with the official ``stripe`` library (tolerance 300 s).

API versions: since 2025-03-31 (basil) a PaymentIntent has no ``invoice``; the link is the InvoicePayment
(``invoice_payment.paid``), mapped to the payment of its PaymentIntent (or Charge) with the invoice id, ranked
after ``payment_intent.succeeded``; a PaymentIntent event without ``invoice`` names the fields it carries in
``changed_fields`` so a link already known is kept. Line SKUs come from the line's ``metadata.sku``, the
price's ``lookup_key`` or id, or (basil) ``pricing.price_details.price``. Failure reasons keep
``last_payment_error`` code, decline code and type. A thin event (``v2.core.event`` from an event destination:
``related_object`` only) carries no record: it becomes a "needs re-read" notice for that object.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from decimal import Decimal, InvalidOperation
from typing import Any

import stripe

from connectors.inbound import common as c
from connectors.inbound import join_keys

VENDOR = "stripe"
CONTENT_TYPE = "application/json; format=stripe-event"
TOLERANCE_S = 300
RANK = {
    "invoice.created": 0, "invoice.finalized": 1, "invoice.payment_failed": 2, "invoice.marked_uncollectible": 3,
    "invoice.paid": 4, "invoice.voided": 4,
    "payment_intent.payment_failed": 1, "payment_intent.succeeded": 2, "invoice_payment.paid": 3,
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


def _lines(inv: dict[str, Any], sku_key: str) -> list[dict[str, Any]]:
    out = []
    for li in (inv.get("lines") or {}).get("data") or []:
        price = li.get("price") or {}
        details = ((li.get("pricing") or {}).get("price_details")) or {}
        meta = li.get("metadata") or {}
        sku = meta.get(sku_key) or price.get("lookup_key") or price.get("id") or details.get("price") \
            or price.get("product") or details.get("product") or li.get("id")
        qty = li.get("quantity") or 1
        unit = price.get("unit_amount")
        if unit is None and (li.get("pricing") or {}).get("unit_amount_decimal") is not None:
            unit = _whole_cents(li["pricing"]["unit_amount_decimal"], f"line {li.get('id')} unit_amount_decimal")
        if unit is None:
            unit = int(li.get("amount") or 0) // int(qty)
        out.append(c.line(str(sku), qty, unit, li.get("description") or ""))
    return out


def _whole_cents(value: Any, what: str) -> int:
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise c.BadInput(f"{what} {value!r} is not a number") from None
    if d != d.to_integral_value():
        raise c.BadInput(f"{what} {value!r} is a fraction of the smallest currency unit")
    return int(d)


def _failure(err: dict[str, Any]) -> str | None:
    """``code/decline_code (type)`` of a last_payment_error, else its message."""
    code = "/".join(str(x) for x in (err.get("code"), err.get("decline_code")) if x)
    if code:
        return f"{code} ({err['type']})" if err.get("type") else code
    return err.get("message") or err.get("type")


THIN_TYPES = {"invoice": "invoice", "payment_intent": "payment", "customer": "customer",
              "invoice_payment": "payment"}


def _thin(record: dict[str, Any], raw: bytes) -> c.Outcome:
    """A thin event names its object but carries none of it: someone must fetch the object."""
    event_id = str(c.require(record, "id"))
    rel = c.require(record, "related_object")
    rtype = str(c.require(rel, "type", what="related_object.type"))
    rid = str(c.require(rel, "id", what="related_object.id"))
    entity = THIN_TYPES.get(rtype)
    if entity is None:
        raise c.BadInput(f"thin event for a {rtype!r} object is not mapped", event_id)
    etype = str(record.get("type") or "")
    return c.Outcome(rereads=[c.Reread(VENDOR, entity, [rid], etype, f"thin event: fetch {rel.get('url') or rid}",
                                       f"stripe:{event_id}", raw)])


def _customer_of(obj: dict[str, Any], ctx: c.Context) -> tuple[str | None, list[dict[str, Any]]]:
    key = join_keys.of(ctx).stripe.customer_id
    cust = obj.get("customer")
    cust_id = cust.get("id") if isinstance(cust, dict) else cust
    direct = (obj.get("metadata") or {}).get(key)
    if isinstance(cust, dict):
        direct = direct or (cust.get("metadata") or {}).get(key)
    hints = {"name": obj.get("customer_name"), "email": obj.get("customer_email") or obj.get("receipt_email")}
    return c.resolve_customer(ctx, "billing", cust_id, hints, direct=direct)


def map_record(record: Any, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Map one Stripe event object."""
    if isinstance(record, dict) and record.get("object") == "v2.core.event":
        return _thin(record, raw)
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
    keys = join_keys.of(ctx).stripe
    op = "create" if etype.endswith(".created") else "update"
    changed = sorted(prev)
    if etype.startswith("invoice."):
        entity = "invoice"
        st = obj.get("status_transitions") or {}
        payload = c.invoice(c.require(obj, "status", what="data.object.status"), meta.get(keys.deal_id),
                            meta.get(keys.job_id),
                            c.to_int(c.require(obj, "amount_due", what="data.object.amount_due"), "amount_due"),
                            c.to_int(c.require(obj, "amount_paid", what="data.object.amount_paid"), "amount_paid"),
                            c.require(obj, "currency", what="data.object.currency"), _lines(obj, keys.sku),
                            c.to_ms(st.get("finalized_at")), c.to_ms(obj.get("due_date")),
                            {"name": obj.get("customer_name"), "email": obj.get("customer_email"),
                             "address": _address_line(obj.get("customer_address"))})
        customer_id, candidates = _customer_of(obj, ctx)
        if ctx.identity is not None:  # an InvoicePayment names only its invoice: find the customer through it
            ctx.identity.link("billing_invoice", obj_id, customer_id)
        changed = changed or ["status"]
    elif etype == "invoice_payment.paid":
        entity = "payment"
        pay = c.require(obj, "payment", what="data.object.payment")
        inv = c.require(obj, "invoice", what="data.object.invoice")
        ref = pay.get(pay.get("type") or "payment_intent") if isinstance(pay, dict) else None
        obj_id = str((ref.get("id") if isinstance(ref, dict) else ref) or obj_id)  # the payment's id joins its events
        paid = obj.get("amount_paid")
        payload = c.payment("succeeded", inv.get("id") if isinstance(inv, dict) else str(inv),
                            c.to_int(paid if paid is not None else c.require(obj, "amount_requested"), "amount_paid"),
                            c.require(obj, "currency", what="data.object.currency"), 1, None)
        customer_id, candidates = c.resolve_customer(ctx, "billing_invoice", payload["invoice_id"],
                                                     direct=meta.get(keys.customer_id))
        changed = ["amount_cents", "currency", "invoice_id", "status"]  # attempt stays as the PaymentIntent said
    elif etype.startswith("payment_intent."):
        entity = "payment"
        err = obj.get("last_payment_error") or {}
        status = "succeeded" if etype.endswith(".succeeded") else "failed"
        inv = obj.get("invoice")
        amount = (obj.get("amount_received") if status == "succeeded" else None) or \
            c.require(obj, "amount", what="data.object.amount")
        payload = c.payment(status, meta.get(keys.invoice_id) or (inv.get("id") if isinstance(inv, dict) else inv),
                            c.to_int(amount, "amount"), c.require(obj, "currency", what="data.object.currency"),
                            c.to_int(meta.get(keys.attempt) or 1, f"metadata.{keys.attempt}"),
                            _failure(err) if status == "failed" else None)
        customer_id, candidates = _customer_of(obj, ctx)
        if "invoice" not in obj and not meta.get(keys.invoice_id):  # basil: the InvoicePayment links it
            changed = ["amount_cents", "attempt", "currency", "failure_reason", "status"]
        changed = changed or ["status"]
    else:
        entity = "customer"
        direct = meta.get(keys.customer_id)
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


def _address_line(address: Any) -> str | None:
    """Stripe's address object (line1, line2, city, state, postal_code, country) as one line; None when absent."""
    if not isinstance(address, dict):
        return None
    parts = [address.get(k) for k in ("line1", "line2", "city", "state", "postal_code", "country")]
    return ", ".join(str(p) for p in parts if p) or None
