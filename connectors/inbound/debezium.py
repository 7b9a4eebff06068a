"""Debezium change events (dispatch / billing databases) → canonical events for jobs, invoices and payments.

Accepted: the JSON converter's envelope with ``schema`` + ``payload`` or the payload alone
(``before``, ``after``, ``op`` c/u/d/r/t, ``source``, ``ts_ms``); a Kafka record dump
``{"key": ..., "value": ...}``; a tombstone (``null`` value after a delete → nothing, counted as skipped);
and the outbox event router's output (``aggregatetype``, ``aggregateid``, ``type``, ``payload``), or the
outbox table's own change events.

- table → entity: ``TABLES`` (``jobs`` → job, ``invoices`` → invoice, ``payments`` → payment), overridable
  with ``settings["tables"]``; a ``schema.table`` key wins over ``table``.
- ``seq``: the Postgres LSN (``source.lsn``, else the last of ``source.sequence``), else MySQL's
  binlog position, else ``txId``; not contiguous (an LSN is a log position, not a per-row version).
  The outbox router's output has no LSN: its ``payload.version`` (or a ``seq``/``lsn`` field) is used.
- REPLICA IDENTITY DEFAULT: updates arrive with ``before`` null (changed fields are then unknown) and
  deletes carry only the key columns in ``before``.
- Row columns (names as in Concord's payload records; dates as epoch µs/ms or ISO strings):
  jobs(id, customer_id, deal_id, status, scheduled_for, completed_at, account_ref),
  invoices(id, customer_id, billing_customer_id, deal_id, job_id, status, amount_due_cents,
  amount_paid_cents, currency, issued_at, due_at), payments(id, customer_id, invoice_id, status,
  amount_cents, currency, attempt, failure_reason); line items as a JSON ``lines`` column.
"""

from __future__ import annotations

import json
from typing import Any

from connectors.inbound import common as c

VENDOR = "debezium"
CONTENT_TYPE = "application/json; format=debezium"
TABLES = {"jobs": "job", "invoices": "invoice", "payments": "payment", "outbox": "outbox"}
OPS = {"c": "create", "u": "update", "d": "delete", "r": "snapshot"}


def _lines(value: Any) -> list[dict[str, Any]]:
    if value in (None, ""):
        return []
    if isinstance(value, str):
        value = json.loads(value)
    return [c.line(li.get("sku"), li.get("quantity", 1), li.get("unit_price_cents", 0), li.get("description", ""))
            for li in value]


def row_payload(entity: str, row: dict[str, Any]) -> dict[str, Any]:
    """The payload record of one table row."""
    if entity == "job":
        return c.job(row.get("status"), row.get("deal_id"), c.to_ms(row.get("scheduled_for")),
                     c.to_ms(row.get("completed_at")), row.get("account_ref"), _lines(row.get("lines")))
    if entity == "invoice":
        return c.invoice(row.get("status"), row.get("deal_id"), row.get("job_id"), row.get("amount_due_cents") or 0,
                         row.get("amount_paid_cents") or 0, row.get("currency") or "USD", _lines(row.get("lines")),
                         c.to_ms(row.get("issued_at")), c.to_ms(row.get("due_at")))
    if entity == "payment":
        return c.payment(row.get("status"), row.get("invoice_id"), row.get("amount_cents") or 0,
                         row.get("currency") or "USD", row.get("attempt") or 1, row.get("failure_reason"))
    raise c.BadInput(f"entity {entity!r} has no row mapping")


def _seq(src: dict[str, Any]) -> int:
    if src.get("lsn") is not None:
        return c.to_int(src["lsn"], "source.lsn")
    seqs = src.get("sequence")
    if seqs:
        parts = json.loads(seqs) if isinstance(seqs, str) else seqs
        if parts and parts[-1] is not None:
            return c.to_int(parts[-1], "source.sequence")
    if src.get("pos") is not None:  # MySQL: file index and position
        file_no = c.to_int(str(src.get("file") or "0").rsplit(".", 1)[-1] or 0, "source.file")
        return file_no * 10**12 + c.to_int(src["pos"], "source.pos") * 100 + c.to_int(src.get("row") or 0, "row")
    tx = src.get("txId")
    if tx is not None:
        return c.to_int(tx, "source.txId")
    raise c.BadInput("source has no lsn, sequence, binlog position or txId: no ordering")


def _customer(entity: str, row: dict[str, Any], ctx: c.Context) -> tuple[str | None, list[dict[str, Any]]]:
    direct = row.get("customer_id")
    if entity == "job":
        cid, cands = c.resolve_customer(ctx, "dispatch", row.get("account_ref"), {"name": row.get("customer_name")},
                                        direct)
        if ctx.identity is not None and direct:
            ctx.identity.link("dispatch", row.get("account_ref"), direct)
        return cid, cands
    if ctx.identity is not None and direct:
        ctx.identity.link("billing", row.get("billing_customer_id"), direct)
    return c.resolve_customer(ctx, "billing", row.get("billing_customer_id"), {"name": row.get("customer_name")},
                              direct)


def _outbox(row: dict[str, Any], seq: int | None, occurred: int | None, raw: bytes, ctx: c.Context) -> c.Outcome:
    agg = str(c.require(row, "aggregatetype")).lower().rstrip("s")
    agg_id = str(c.require(row, "aggregateid"))
    payload = row.get("payload")
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            raise c.BadInput("outbox payload is not JSON", agg_id) from None
    if not isinstance(payload, dict):
        raise c.BadInput("outbox payload is not an object", agg_id)
    if agg not in ("job", "invoice", "payment"):
        raise c.BadInput(f"outbox aggregatetype {row.get('aggregatetype')!r} is not job, invoice or payment", agg_id)
    if seq is None:
        v = payload.get("version", row.get("seq", row.get("lsn")))
        if v is None:
            raise c.BadInput("outbox event has no version, seq or lsn: no ordering", agg_id)
        seq = c.to_int(v, "version")
    etype = str(row.get("type") or "")
    op = "delete" if etype.lower().endswith(("deleted", "delete", "destroyed")) else \
        "create" if etype.lower().endswith(("created", "create")) else "update"
    body = None if op == "delete" else row_payload(agg, payload)
    cid, cands = _customer(agg, payload, ctx)
    event_id = f"dbz-outbox:{row.get('id') or f'{agg}:{agg_id}:{seq}'}"
    ev = c.change_event(event_id=event_id, vendor=VENDOR, entity_type=agg, entity_id=agg_id, seq=seq, op=op,
                        occurred_at=occurred or c.to_ms(payload.get("occurred_at")), payload=body, raw=raw,
                        content_type=CONTENT_TYPE, ctx=ctx, customer_id=cid,
                        changed_fields=list(payload.get("changed_fields") or []),
                        caused_by_command_id=c.command_id_from(payload.get("concord_command_id"), bare_ok=True))
    c.check(ev)
    return c.Outcome(events=[c.Mapped(ev, event_id, cands)])


def map_record(record: Any, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Map one Debezium record (envelope, record dump, tombstone or outbox event)."""
    if isinstance(record, dict) and set(record) <= {"key", "value", "headers", "topic", "partition", "offset"} \
            and "value" in record:
        record = record["value"]
    if record is None:
        return c.Outcome(skipped=1)  # tombstone: log compaction's marker after a delete
    if not isinstance(record, dict):
        raise c.BadInput("a Debezium record must be a JSON object")
    if "schema" in record and "payload" in record:
        record = record["payload"]
        if record is None:
            return c.Outcome(skipped=1)
    if "aggregatetype" in record:
        return _outbox(record, None, None, raw, ctx)
    op_code = c.require(record, "op")
    if op_code == "t":
        return c.Outcome(skipped=1)  # truncate: no row to map
    if op_code not in OPS:
        raise c.BadInput(f"op {op_code!r} is not c, u, d or r")
    src = c.require(record, "source")
    table = c.require(src, "table", what="source.table")
    tables = {**TABLES, **ctx.settings.get("tables", {})}
    entity = tables.get(f"{src.get('schema')}.{table}") or tables.get(table)
    before, after = record.get("before"), record.get("after")
    if entity is None:
        raise c.BadInput(f"table {table!r} is not mapped to an entity ({sorted(tables)})")
    seq = _seq(src)
    occurred = c.to_ms(src.get("ts_ms") or record.get("ts_ms"), "ts_ms")
    if entity == "outbox":
        if after is None:
            return c.Outcome(skipped=1)  # the outbox row's own deletion
        return _outbox(after, seq, occurred, raw, ctx)
    op = OPS[op_code]
    row = before if op == "delete" else after
    if not isinstance(row, dict):
        raise c.BadInput(f"op {op_code} without {'before' if op == 'delete' else 'after'} row")
    entity_id = str(c.require(row, "id", what=f"{table}.id"))
    payload = None if op == "delete" else row_payload(entity, row)
    changed: list[str] = []
    if op == "update" and isinstance(before, dict):
        changed = sorted(k for k in set(before) | set(after or {}) if before.get(k) != (after or {}).get(k))
    cid, cands = _customer(entity, row, ctx) if op != "delete" else c.resolve_customer(ctx, "none", None,
                                                                                        direct=row.get("customer_id"))
    event_id = f"dbz:{src.get('name', '')}:{table}:{entity_id}:{seq}:{op_code}"
    ev = c.change_event(event_id=event_id, vendor=VENDOR, entity_type=entity, entity_id=entity_id, seq=seq, op=op,
                        occurred_at=occurred, payload=payload, raw=raw, content_type=CONTENT_TYPE, ctx=ctx,
                        customer_id=cid, changed_fields=changed,
                        caused_by_command_id=c.command_id_from((after or {}).get("concord_command_id"), bare_ok=True))
    c.check(ev)
    return c.Outcome(events=[c.Mapped(ev, event_id, cands)])


def parse(raw: bytes) -> Any:
    """One record as JSON (``null`` is a tombstone)."""
    return json.loads(raw) if raw.strip() else None
