"""The spreadsheet teams export today → canonical snapshot events.

One row per deal / job / invoice line. Columns (header row required, names case-insensitive, order free;
only ``customer_id`` is required, every other column may be absent or blank):

===================  =====================================================================
column               meaning
===================  =====================================================================
customer_id          Concord customer id (the CRM account id)
customer_name        the customer's name
customer_email       the customer's billing e-mail
billing_account_id   the billing system's customer id
deal_id              CRM deal id
deal_name            deal name
deal_stage           open, closed_won, closed_lost (also "won", "Closed Won", ...)
job_id               dispatch job id
job_status           scheduled, dispatched, completed, cancelled
scheduled_for        job date (ISO 8601 date or date-time)
completed_at         job completion date
invoice_id           billing invoice id
invoice_status       draft, open, paid, void, uncollectible
issued_at            invoice date
due_at               invoice due date
currency             ISO currency code (default USD)
sku                  line item code; a row without sku adds no line
description          line description
quantity             line quantity (integer > 0, default 1)
unit_price           line unit price in major units ("12.50")
version              a number that grows each time the row's record changes (optional)
===================  =====================================================================

Rows are grouped per entity: one event per customer, deal, job and invoice mentioned, with the lines
of every row naming that deal / job / invoice. ``op`` is ``snapshot``. ``seq`` is the largest
``version`` of the entity's rows, else the row number of its last row; ``seq_contiguous`` is false.
Row numbers only order rows within one file: give a ``version`` column when importing repeatedly.
A bad row (unknown status, quantity 0, unparseable number or date) is rejected alone.
"""

from __future__ import annotations

import csv
import hashlib
import io
from typing import Any

from connectors.inbound import boundary
from connectors.inbound import common as c

VENDOR = "csv"
CONTENT_TYPE = "text/csv"
COLUMNS = ("customer_id", "customer_name", "customer_email", "billing_account_id", "deal_id", "deal_name",
           "deal_stage", "job_id", "job_status", "scheduled_for", "completed_at", "invoice_id", "invoice_status",
           "issued_at", "due_at", "currency", "sku", "description", "quantity", "unit_price", "version")


def read_rows(data: bytes) -> tuple[list[str], list[tuple[int, dict[str, str], bytes]]]:
    """(header, [(row number, row, the row's own CSV bytes with the header)])."""
    text = boundary.text(data, "CSV")
    csv.field_size_limit(boundary.Limits.from_env().string_chars)  # CONCORD_INPUT_STRING_CHARS bounds a cell
    try:
        return _rows(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:  # e.g. a cell over the limit, a bare CR inside an unquoted cell
        raise c.BadInput(f"CSV is malformed: {exc}") from None


def _rows(reader: Any) -> tuple[list[str], list[tuple[int, dict[str, str], bytes]]]:
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise c.BadInput("empty CSV: no header row") from None
    if "customer_id" not in header:
        raise c.BadInput(f"CSV header has no customer_id column: {header}")
    unknown = [h for h in header if h and h not in COLUMNS]
    if unknown:
        raise c.BadInput(f"unknown CSV columns {unknown}; see connectors/inbound/csv_import.py")
    rows = []
    for n, cells in enumerate(reader, start=1):
        if not any(x.strip() for x in cells):
            continue
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerow(cells)
        rows.append((n, {h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header)},
                     buf.getvalue().encode()))
    if not rows:  # like an empty JSON input: nothing to map is said, not passed over in silence
        raise c.BadInput("CSV has a header row but no data rows")
    return header, rows


def _row_line(row: dict[str, str]) -> dict[str, Any] | None:
    if not row.get("sku"):
        return None
    return c.line(row["sku"], row.get("quantity") or 1, c.to_cents(row.get("unit_price"), "unit_price"),
                  row.get("description") or "")


def _check_row(row: dict[str, str]) -> None:
    if not row.get("customer_id"):
        raise c.BadInput("missing required field customer_id")
    for col, allowed in (("deal_stage", c.DEAL_STAGES), ("job_status", c.JOB_STATUSES),
                         ("invoice_status", c.INVOICE_STATUSES)):
        if row.get(col):
            c.state(row[col], allowed, col)
    for col in ("scheduled_for", "completed_at", "issued_at", "due_at"):
        c.to_ms(row.get(col), col)
    if row.get("version"):
        c.to_int(row["version"], "version")
    _row_line(row)


def map_file(data: bytes, ctx: c.Context, name: str = "") -> c.Outcome:
    """Map a whole CSV export (rows must be seen together: an entity's lines span rows)."""
    header, rows = read_rows(data)
    out = c.Outcome()
    good: list[tuple[int, dict[str, str], bytes]] = []
    for n, row, raw in rows:
        try:
            _check_row(row)
            good.append((n, row, raw))
        except c.BadInput as exc:
            exc.args = (f"row {n}: {exc}",)
            exc.record_id = exc.record_id or f"{name}:{n}"
            exc.raw = raw
            out.rejected.append(exc)
    groups: dict[tuple[str, str], list[tuple[int, dict[str, str], bytes]]] = {}
    for item in good:
        row = item[1]
        for entity, col in (("customer", "customer_id"), ("deal", "deal_id"), ("job", "job_id"),
                            ("invoice", "invoice_id")):
            if row.get(col):
                groups.setdefault((entity, row[col]), []).append(item)
    for (entity, eid), items in groups.items():
        rows_ = [r for _, r, _ in items]
        first = rows_[0]
        versions = [c.to_int(r["version"], "version") for r in rows_ if r.get("version")]
        seq = max(versions) if versions else items[-1][0]
        raw = b"".join([items[0][2]] + [i[2].split(b"\n", 1)[1] for i in items[1:]])
        lines = [ln for ln in (_row_line(r) for r in rows_) if ln]
        cur = first.get("currency") or "USD"
        customer_id = first["customer_id"]
        if entity == "customer":
            payload = c.customer(first.get("customer_name") or "", first.get("customer_email") or None,
                                 first.get("billing_account_id") or None,
                                 external_ids={"billing": first.get("billing_account_id") or ""})
            if ctx.identity is not None:
                ctx.identity.link("billing", first.get("billing_account_id"), customer_id)
                ctx.identity.learn_profile(customer_id, first.get("customer_name"), first.get("customer_email"))
        elif entity == "deal":
            stage = first.get("deal_stage") or "open"
            payload = c.deal(stage, first.get("deal_name") or "", sum(ln["quantity"] * ln["unit_price_cents"]
                                                                      for ln in lines), cur, lines)
        elif entity == "job":
            payload = c.job(first.get("job_status") or "scheduled", first.get("deal_id") or None,
                            c.to_ms(first.get("scheduled_for")), c.to_ms(first.get("completed_at")), None, lines)
        else:
            total = sum(ln["quantity"] * ln["unit_price_cents"] for ln in lines)
            payload = c.invoice(first.get("invoice_status") or "draft", first.get("deal_id") or None,
                                first.get("job_id") or None, total, total if first.get("invoice_status") == "paid"
                                else 0, cur, lines, c.to_ms(first.get("issued_at")), c.to_ms(first.get("due_at")))
        digest = hashlib.sha256(raw).hexdigest()[:16]
        event_id = f"csv:{entity}:{eid}:{seq}:{digest}"
        try:
            ev = c.change_event(event_id=event_id, vendor=VENDOR, entity_type=entity, entity_id=eid, seq=seq,
                                op="snapshot", occurred_at=None, payload=payload, raw=raw, content_type=CONTENT_TYPE,
                                ctx=ctx, customer_id=customer_id, changed_fields=[])
            c.check(ev)
        except c.BadInput as exc:
            exc.record_id = exc.record_id or eid
            exc.raw = raw
            out.rejected.append(exc)
            continue
        out.events.append(c.Mapped(ev, event_id))
    return out
