"""Exports as people download them (vendor CSV reports, list-API JSON, snapshots) → canonical snapshot events.

A vendor CSV export is mapped by a ``CsvFormat``: which columns hold the record id, the customer (directly or
through the identity map, the join key), each payload field and the line items. JSON from Stripe's list API
goes through the Stripe connector, a Debezium snapshot through the Debezium connector, the generic
spreadsheet and canonical events through theirs, so an audit reads exports exactly as ingest reads feeds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connectors.inbound import common as c
from connectors.inbound import ingest

DATES = ("closed_at", "scheduled_for", "completed_at", "issued_at", "due_at", "occurred_at")


@dataclass(frozen=True)
class CsvFormat:
    """How one vendor's CSV export maps to one entity type."""

    name: str
    vendor: str
    entity: str
    signature: tuple[str, ...]  # headers that identify the export (all present)
    id: str
    columns: dict[str, str]  # payload field (or occurred_at) -> column header
    customer: str | None = None  # column holding the Concord customer id (the CRM account id)
    customer_via: tuple[str, str] | None = None  # (system, column): resolved through the identity map
    links: dict[str, str] = field(default_factory=dict)  # system -> column: cross-references this export teaches
    lines: dict[str, str] = field(default_factory=dict)  # sku, quantity, unit_price, description -> column
    values: dict[str, dict[str, str]] = field(default_factory=dict)  # field -> vendor value -> Concord value


FORMATS: tuple[CsvFormat, ...] = (
    CsvFormat("salesforce-accounts", "salesforce", "customer", ("Account ID", "Account Name"), "Account ID",
              {"name": "Account Name", "email": "Billing Email", "billing_account_id": "Billing Account ID",
               "billing_terms": "Billing Terms", "billing_policy": "Billing Policy",
               "billing_address": "Billing Street", "occurred_at": "Last Modified Date"},
              customer="Account ID", links={"billing": "Stripe Customer ID", "dispatch": "Jobber Client ID"}),
    CsvFormat("salesforce-opportunities", "salesforce", "deal", ("Opportunity ID", "Stage"), "Opportunity ID",
              {"name": "Opportunity Name", "stage": "Stage", "currency": "Opportunity Currency",
               "closed_at": "Close Date", "billing_status": "Billing Status", "occurred_at": "Last Modified Date"},
              customer="Account ID",
              lines={"sku": "Product Code", "quantity": "Quantity", "unit_price": "Sales Price",
                     "description": "Product Name"}),
    CsvFormat("hubspot-deals", "hubspot", "deal", ("Record ID", "Deal Stage"), "Record ID",
              {"name": "Deal Name", "stage": "Deal Stage", "currency": "Currency", "closed_at": "Close Date",
               "billing_status": "Billing Status", "occurred_at": "Last Modified Date"},
              customer="Concord Customer ID",
              lines={"sku": "Line Item SKU", "quantity": "Line Item Quantity", "unit_price": "Line Item Unit Price",
                     "description": "Line Item Name"},
              values={"stage": {"closedwon": "closed_won", "closedlost": "closed_lost", "appointmentscheduled": "open",
                                "qualifiedtobuy": "open", "presentationscheduled": "open",
                                "decisionmakerboughtin": "open", "contractsent": "open"}}),
    CsvFormat("jobber-jobs", "jobber", "job", ("Job #", "Client ID"), "Job #",
              {"status": "Job Status", "deal_id": "Deal ID", "scheduled_for": "Start Date",
               "completed_at": "Completed Date", "account_ref": "Client ID", "occurred_at": "Last Updated"},
              customer_via=("dispatch", "Client ID"),
              lines={"sku": "Product/Service", "quantity": "Qty", "unit_price": "Unit Price",
                     "description": "Description"},
              values={"status": {"requires invoicing": "completed", "archived": "completed", "upcoming": "scheduled",
                                 "today": "dispatched", "active": "scheduled", "late": "scheduled"}}),
    CsvFormat("stripe-invoices", "stripe", "invoice", ("id", "Amount Due", "Status"), "id",
              {"status": "Status", "amount_due": "Amount Due", "amount_paid": "Amount Paid", "currency": "Currency",
               "issued_at": "Finalized At (UTC)", "due_at": "Due Date (UTC)", "deal_id": "concord_deal_id (metadata)",
               "job_id": "concord_job_id (metadata)", "occurred_at": "Date (UTC)"},
              customer_via=("billing", "Customer")),
    CsvFormat("stripe-payments", "stripe", "payment", ("id", "Amount", "Status", "Created (UTC)"), "id",
              {"status": "Status", "amount": "Amount", "currency": "Currency", "invoice_id": "Invoice ID",
               "failure_reason": "Decline Reason", "occurred_at": "Created (UTC)"},
              customer_via=("billing", "Customer ID"),
              values={"status": {"paid": "succeeded", "succeeded": "succeeded", "failed": "failed",
                                 "refunded": "refunded"}}),
)
BY_NAME = {f.name: f for f in FORMATS}
# Formats that teach the identity map come first, so every other export can join on what they taught.
OTHER_FORMATS = ("stripe-list", "debezium", "csv", "canonical")
STRIPE_LIST_TYPES = {"draft": "invoice.created", "open": "invoice.finalized", "paid": "invoice.paid",
                     "void": "invoice.voided", "uncollectible": "invoice.marked_uncollectible"}


def detect(data: bytes, name: str) -> str:
    """The format of an export, from its header row or its JSON shape; BadInput saying why not."""
    head = data.lstrip()[:1]
    if head in (b"{", b"["):
        try:
            doc = json.loads(data.decode("utf-8"))
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("object") == "list":
            return "stripe-list"
        first = doc[0] if isinstance(doc, list) and doc else doc
        if first is None:
            first = ingest.split_units(data)[0][1]
        if isinstance(first, dict):
            if "event_id" in first and "source_system" in first:
                return "canonical"
            body = first.get("payload", first) if isinstance(first.get("payload", first), dict) else first
            if "op" in body and ("after" in body or "before" in body):
                return "debezium"
        raise c.BadInput(f"{name}: JSON that is neither a Stripe list, a Debezium snapshot nor canonical events")
    try:
        header = next(csv.reader(io.StringIO(data.decode("utf-8-sig"))), [])
    except UnicodeDecodeError as exc:
        raise c.BadInput(f"{name}: not UTF-8 text: {exc}") from None
    cols = {h.strip() for h in header}
    for fmt in FORMATS:
        if all(s in cols for s in fmt.signature):
            return fmt.name
    if "customer_id" in {h.lower() for h in cols}:
        return "csv"
    raise c.BadInput(f"{name}: cannot tell which export this is from its header {sorted(cols)[:8]}; "
                     f"known: {', '.join([*BY_NAME, *OTHER_FORMATS])}")


def read(fmt: str, data: bytes, ctx: c.Context, name: str) -> ingest.Batch:
    """Map one export in format ``fmt``: events, and a dead letter per row or item that could not be read."""
    if fmt in BY_NAME:
        return _csv_batch(BY_NAME[fmt], data, ctx, name)
    if fmt == "stripe-list":
        return ingest.normalize("stripe", data, ctx, name=name, units=_stripe_units(data, name))
    return ingest.normalize(fmt, data, ctx, name=name)


def _stripe_units(data: bytes, name: str) -> list[tuple[bytes, Any]]:
    """Each object of a Stripe list response, wrapped as the event that would have announced its state."""
    doc = json.loads(data.decode("utf-8"))
    units: list[tuple[bytes, Any]] = []
    for n, obj in enumerate(doc.get("data") or [], 1):
        raw = json.dumps(obj, sort_keys=True).encode()
        if not isinstance(obj, dict) or obj.get("object") not in ("invoice", "payment_intent"):
            units.append((raw, c.BadInput(f"item {n} is not an invoice or payment_intent object")))
            continue
        if obj["object"] == "invoice":
            etype = STRIPE_LIST_TYPES.get(str(obj.get("status")))
            st = obj.get("status_transitions") or {}
            created = st.get("paid_at") or st.get("voided_at") or st.get("finalized_at") or obj.get("created")
        else:
            etype = {"succeeded": "payment_intent.succeeded", "requires_payment_method":
                     "payment_intent.payment_failed"}.get(str(obj.get("status")))
            created = obj.get("created")
        if etype is None:
            units.append((raw, c.BadInput(f"item {n} ({obj.get('id')}): status {obj.get('status')!r} is not mapped")))
            continue
        units.append((raw, {"object": "event", "id": f"export_{obj.get('id')}_{obj.get('status')}", "type": etype,
                            "created": created, "data": {"object": obj}}))
    return units


def _cell(row: dict[str, str], col: str | None) -> str:
    return (row.get(col) or "").strip() if col else ""


def _value(fmt: CsvFormat, name: str, row: dict[str, str]) -> Any:
    raw = _cell(row, fmt.columns.get(name))
    if not raw:
        return None
    if name in DATES:
        return c.to_ms(raw, fmt.columns[name])
    if name in ("amount_due", "amount_paid", "amount"):
        return c.to_cents(raw.replace(",", ""), fmt.columns[name])
    mapped = fmt.values.get(name, {})
    return mapped.get(raw.lower(), raw)


def _payload(fmt: CsvFormat, row: dict[str, str], lines: list[dict[str, Any]]) -> dict[str, Any]:
    v: Callable[[str], Any] = lambda n: _value(fmt, n, row)  # noqa: E731
    cur = (v("currency") or "USD").upper()
    total = sum(ln["quantity"] * ln["unit_price_cents"] for ln in lines)
    if fmt.entity == "customer":
        return c.customer(v("name"), v("email"), v("billing_account_id"), v("billing_terms"), v("billing_policy"),
                          v("billing_address"), {s: _cell(row, col) for s, col in fmt.links.items()})
    if fmt.entity == "deal":
        return c.deal(v("stage") or "open", v("name") or "", total, cur, lines, v("closed_at"), v("billing_status"))
    if fmt.entity == "job":
        return c.job(v("status") or "scheduled", v("deal_id"), v("scheduled_for"), v("completed_at"),
                     v("account_ref"), lines)
    if fmt.entity == "invoice":
        return c.invoice(str(v("status") or "draft").lower(), v("deal_id"), v("job_id"), v("amount_due") or 0,
                         v("amount_paid") or 0, cur, lines, v("issued_at"), v("due_at"))
    return c.payment(str(v("status") or "").lower() or "succeeded", v("invoice_id"), v("amount") or 0, cur, 1,
                     v("failure_reason"))


def _line(fmt: CsvFormat, row: dict[str, str]) -> dict[str, Any] | None:
    sku = _cell(row, fmt.lines.get("sku"))
    if not sku:
        return None
    price = _cell(row, fmt.lines.get("unit_price")).replace(",", "")
    return c.line(sku, _cell(row, fmt.lines.get("quantity")) or 1, c.to_cents(price, fmt.lines.get("unit_price", "")),
                  _cell(row, fmt.lines.get("description")))


def _csv_batch(fmt: CsvFormat, data: bytes, ctx: c.Context, name: str) -> ingest.Batch:
    """Rows grouped by record id (a record's line items span rows); one snapshot event per record."""
    batch = ingest.Batch(fmt.vendor)
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig")))
    header = [h.strip() for h in next(reader, [])]
    groups: dict[str, list[tuple[int, dict[str, str], bytes]]] = {}
    for n, cells in enumerate(reader, start=2):  # row 1 is the header: numbers match a spreadsheet's
        if not any(x.strip() for x in cells):
            continue
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        row = {h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header)}
        rid = _cell(row, fmt.id)
        if not rid:
            batch.deadletters.append(_dead(fmt, buf.getvalue().encode(), f"missing {fmt.id}", None, ctx,
                                           f"{name} row {n}"))
            continue
        groups.setdefault(rid, []).append((n, row, buf.getvalue().encode()))
    header_bytes = io.StringIO()
    csv.writer(header_bytes, lineterminator="\n").writerow(header)
    for rid, items in groups.items():
        raw = header_bytes.getvalue().encode() + b"".join(r for _, _, r in items)
        where = f"{name} row {items[0][0]}"
        try:
            first = items[0][1]
            lines = []
            for n, row, _ in items:
                where = f"{name} row {n}"  # the row a bad line item is on, not just its record's first
                ln = _line(fmt, row)
                if ln:
                    lines.append(ln)
            where = f"{name} row {items[0][0]}"
            payload = _payload(fmt, first, lines)
            customer_id = _customer(fmt, first, ctx)
            for system, col in fmt.links.items():
                if ctx.identity is not None:
                    ctx.identity.link(system, _cell(first, col), customer_id)
            occurred = _value(fmt, "occurred_at", first)
            digest = hashlib.sha256(raw).hexdigest()[:16]
            event_id = f"export:{fmt.name}:{rid}:{digest}"
            ev = c.change_event(event_id=event_id, vendor=fmt.vendor, entity_type=fmt.entity, entity_id=rid,
                                seq=occurred or items[-1][0], op="snapshot", occurred_at=occurred, payload=payload,
                                raw=raw, content_type=f"text/csv; format={fmt.name}", ctx=ctx,
                                customer_id=customer_id)
            c.check(ev)
        except c.BadInput as exc:
            batch.deadletters.append(_dead(fmt, raw, str(exc), rid, ctx, where))
            continue
        batch.events.append(c.Mapped(ev, event_id))
    return batch


def _customer(fmt: CsvFormat, row: dict[str, str], ctx: c.Context) -> str | None:
    if fmt.customer:
        return _cell(row, fmt.customer) or None
    if fmt.customer_via and ctx.identity is not None:
        system, col = fmt.customer_via
        native = _cell(row, col)
        return ctx.identity.resolve(system, native) if native else None
    return None


def _dead(fmt: CsvFormat, raw: bytes, error: str, rid: str | None, ctx: c.Context, where: str) -> ingest.DeadLetter:
    return ingest.DeadLetter(rid.encode() if rid else None, {
        "original_topic": f"audit.{fmt.name}", "original_partition": -1, "original_offset": -1,
        "original_key": rid.encode() if rid else None, "original_value": raw, "stage": "normalize",
        "error_type": "BadInput", "error": error, "failed_at": ctx.clock()}, where)
