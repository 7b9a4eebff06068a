"""The ``stripe`` target (billing): commands applied through the official ``stripe`` library.

- ``create_invoice``: ``Invoice.create`` (draft, ``auto_advance`` so Stripe finalizes it) with
  ``idempotency_key=command_id``, then one ``InvoiceItem.create`` per line (key ``<command_id>:line:<n>``).
  Stripe forgets idempotency keys after 24 h, so for an older command the invoice is first looked up
  by ``metadata['concord_command_id']`` (Search API) and only the missing lines are added.
- ``void_invoice``: the invoice's metadata is marked, then ``Invoice.void_invoice``; an invoice already
  void is a duplicate.
- ``update_customer``: ``Customer.modify`` on the billing account id (the Stripe customer id).

Every object carries ``metadata.concord_command_id = concord:<command_id>`` so the inbound Stripe
connector recognises the echo (connectors/README.md). The key comes from ``STRIPE_API_KEY`` only.
The library's own retries are off: the consumer's backoff retries, with the same idempotency key.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import stripe

from connectors.outbound.base import (
    APPLIED,
    DUPLICATE,
    Command,
    FatalError,
    PermanentError,
    Result,
    TargetError,
    TransientError,
    check,
)

TYPES = frozenset({"create_invoice", "void_invoice", "update_customer"})
IDEMPOTENCY_WINDOW_MS = 24 * 3600 * 1000


class StripeTarget:
    """Billing commands applied to a Stripe account."""

    name = "stripe"
    types = TYPES

    def __init__(self, api_key: str | None = None, api_base: str | None = None, currency: str = "usd",
                 idempotency_window_ms: int = IDEMPOTENCY_WINDOW_MS) -> None:
        self.api_key = api_key or os.environ.get("STRIPE_API_KEY")
        if not self.api_key:
            raise FatalError("the stripe target needs STRIPE_API_KEY in the environment")
        self._saved_base = stripe.api_base
        if api_base:
            stripe.api_base = api_base.rstrip("/")  # the legacy resource API reads the module's base
        self.currency = currency
        self.window_ms = idempotency_window_ms

    def _opts(self, key: str | None = None) -> dict[str, Any]:
        opts: dict[str, Any] = {"api_key": self.api_key, "max_network_retries": 0}
        if key:
            opts["idempotency_key"] = key
        return opts

    def apply(self, cmd: Command) -> Result:
        """Apply ``cmd`` to Stripe; Stripe errors become transient / permanent / fatal errors."""
        check(cmd, self.types, self.name)
        try:
            return getattr(self, f"_{cmd.type}")(cmd)
        except stripe.StripeError as exc:
            raise _classify(exc, cmd.type) from None

    def _metadata(self, cmd: Command) -> dict[str, str]:
        md = {"concord_command_id": cmd.marker, "concord_trace_id": cmd.trace_id}
        for k in ("customer_id", "deal_id", "job_id"):
            if cmd.payload.get(k):
                md[f"concord_{k}"] = str(cmd.payload[k])
        return md

    def _create_invoice(self, cmd: Command) -> Result:
        p = cmd.payload
        customer = p.get("billing_account_id")
        if not customer:
            raise PermanentError(f"customer {p['customer_id']} has no billing_account_id (Stripe customer id)")
        existing = None
        if int(time.time() * 1000) - cmd.issued_at >= self.window_ms:
            found = stripe.Invoice.search(query=f"metadata['concord_command_id']:'{cmd.marker}'", limit=1,
                                          **self._opts())
            existing = found.data[0] if found.data else None
        if existing is not None:
            invoice = existing
            listed = stripe.InvoiceItem.list(invoice=invoice.id, limit=100, **self._opts())
            have = {(it.to_dict().get("metadata") or {}).get("concord_line") for it in listed.data}
        else:
            params: dict[str, Any] = {"customer": customer, "auto_advance": True, "metadata": self._metadata(cmd),
                                      "pending_invoice_items_behavior": "exclude"}
            m = re.fullmatch(r"net_?(\d+)", str(p.get("billing_terms") or ""))
            if m:
                params.update(collection_method="send_invoice", days_until_due=int(m.group(1)))
            invoice = stripe.Invoice.create(**params, **self._opts(cmd.command_id))
            have = set()
        added = 0
        for i, ln in enumerate(p["lines"]):
            if str(i) in have:
                continue
            item: dict[str, Any] = {"customer": customer, "invoice": invoice.id, "quantity": ln["quantity"],
                                    "description": ln.get("description") or ln.get("sku") or "",
                                    "metadata": {**self._metadata(cmd), "concord_line": str(i),
                                                 "concord_sku": str(ln.get("sku") or "")}}
            if ln.get("price_id"):
                item["pricing"] = {"price": ln["price_id"]}
            else:
                item.update(currency=p.get("currency") or self.currency,
                            unit_amount_decimal=str(ln["unit_price_cents"]))
            stripe.InvoiceItem.create(**item, **self._opts(f"{cmd.command_id}:line:{i}"))
            added += 1
        return Result(DUPLICATE if existing is not None and not added else APPLIED, invoice.id)

    def _void_invoice(self, cmd: Command) -> Result:
        inv_id = str(cmd.payload["invoice_id"])
        try:
            stripe.Invoice.modify(inv_id, metadata={"concord_command_id": cmd.marker,
                                                    "concord_void_reason": str(cmd.payload.get("reason") or "")},
                                  **self._opts(f"{cmd.command_id}:mark"))
            stripe.Invoice.void_invoice(inv_id, **self._opts(cmd.command_id))
        except stripe.InvalidRequestError:
            current = stripe.Invoice.retrieve(inv_id, **self._opts())
            if current.status == "void":
                return Result(DUPLICATE, inv_id)
            raise
        return Result(APPLIED, inv_id)

    def _update_customer(self, cmd: Command) -> Result:
        p = cmd.payload
        customer = p.get("billing_account_id")
        if not customer:
            raise PermanentError(f"customer {p['customer_id']} has no billing_account_id (Stripe customer id)")
        params: dict[str, Any] = {"metadata": {**self._metadata(cmd), "concord_customer_id": str(p["customer_id"])}}
        if p.get("name"):
            params["name"] = p["name"]
        if p.get("email"):
            params["email"] = p["email"]
        if p.get("billing_address"):
            params["address"] = {"line1": str(p["billing_address"])}
        stripe.Customer.modify(customer, **params, **self._opts(cmd.command_id))
        return Result(APPLIED, customer)

    def close(self) -> None:
        """Give the module its API base back."""
        stripe.api_base = self._saved_base


def _classify(exc: stripe.StripeError, what: str) -> TargetError:
    status = exc.http_status
    said = getattr(exc, "user_message", None) or str(exc) or type(exc).__name__
    code = f" ({exc.code})" if getattr(exc, "code", None) else ""
    msg = f"Stripe answered {status or 'nothing'} to {what}{code}: {said}"
    if isinstance(exc, stripe.APIConnectionError) or status is None:
        return TransientError(msg)
    if status in (409, 429) or status >= 500:  # 409: the same idempotency key is in flight
        retry_after = (exc.headers or {}).get("Retry-After") if hasattr(exc, "headers") else None
        try:
            return TransientError(msg, float(retry_after) if retry_after else None)
        except ValueError:
            return TransientError(msg)
    if status in (401, 403):
        return FatalError(msg + " (check STRIPE_API_KEY)")
    return PermanentError(msg)
