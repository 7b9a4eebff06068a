"""Debezium change events (dispatch / billing databases) → canonical events for jobs, invoices and payments.

Accepted, as Debezium deployments deliver them:
- the standard envelope (``before``, ``after``, ``op`` c/u/d/r/t, ``source``, ``ts_ms``), with the JSON
  converter's ``schema`` + ``payload`` wrapper or without it; with ``schemas.enable=true`` every column is
  read by its embedded Connect schema (Date, Timestamp, MicroTimestamp, NanoTimestamp, ZonedTimestamp,
  Decimal, VariableScaleDecimal);
- a Kafka record dump (``topic``, ``partition``, ``offset``, ``timestamp``, ``key``, ``value``, ``headers``;
  kcat's ``-J`` form with ``payload`` and ``ts`` too); a tombstone (``null`` value) is skipped;
- ``ExtractNewRecordState`` output: the flat row, with the metadata ``add.fields`` puts beside it
  (``__op``, ``__table``, ``__lsn``, ``__source_ts_ms``, ``__deleted``); the table is ``__table`` or the
  dump's topic (``server.schema.table``);
- the outbox ``EventRouter``'s output: a dump on ``<topic_prefix><aggregate type>`` with key = aggregate id,
  value = the payload and headers ``id`` (the event id) and ``eventType`` / ``type``; or the outbox table's
  own change events.

Columns are read through the table's mapping (``debezium_mapping``: source column → Concord field, with its
type); the entity comes from the table or aggregate type, never from the row's shape.
- ``seq``: the Postgres LSN (``source.lsn``, else the last of ``source.sequence``), else MySQL's binlog
  position, else ``txId``; not contiguous (an LSN is a log position, not a per-row version). The router's
  output has no LSN: the payload's version field, else the record's offset in its partition (the key is the
  aggregate id, so one aggregate's events share a partition, in order).
- REPLICA IDENTITY DEFAULT: updates arrive with ``before`` null (changed fields are then unknown) and
  deletes carry only the key columns in ``before``.
"""

from __future__ import annotations

import json
from typing import Any

from connectors.inbound import common as c
from connectors.inbound import debezium_mapping as dm

VENDOR = "debezium"
CONTENT_TYPE = "application/json; format=debezium"
OPS = {"c": "create", "u": "update", "d": "delete", "r": "snapshot"}
# Keys of a Kafka record dump (console consumers, UIs, kcat -J); a Debezium value has none but "payload".
_DUMP_KEYS = {"topic", "partition", "offset", "timestamp", "timestampType", "key", "value", "headers", "tstype",
              "ts", "broker", "payload", "key_schema_id", "value_schema_id", "leaderEpoch"}


def _config(ctx: c.Context) -> dm.DebeziumConfig:
    return ctx.settings.get("debezium") or dm.default_config()


def _headers(raw: Any) -> dict[str, str]:
    """Record headers from a dump: a mapping, [k, v] pairs, {key, value} objects or kcat's flat list."""
    if raw in (None, [], {}):
        return {}
    if isinstance(raw, dict):
        return {str(k): v for k, v in raw.items()}
    if isinstance(raw, list):
        if all(isinstance(h, dict) and "key" in h for h in raw):
            return {str(h["key"]): h.get("value") for h in raw}
        if all(isinstance(h, list | tuple) and len(h) == 2 for h in raw):
            return {str(k): v for k, v in raw}
        if len(raw) % 2 == 0 and all(isinstance(h, str | None) for h in raw):
            return {str(raw[i]): raw[i + 1] for i in range(0, len(raw), 2)}
    raise c.BadInput("record headers are not a mapping or a list of key/value pairs")


def _is_dump(record: dict[str, Any]) -> bool:
    if not set(record) <= _DUMP_KEYS:
        return False
    if "value" in record:
        return True
    return "payload" in record and {"topic", "offset"} <= set(record)  # kcat -J


def _json_value(value: Any) -> Any:
    if isinstance(value, str) and value.strip()[:1] in ("{", "[", '"'):
        try:
            return json.loads(value)
        except ValueError:
            raise c.BadInput("record value is a string that is not JSON") from None
    return value


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


def row_payload(entity: str, f: dict[str, Any]) -> dict[str, Any]:
    """The payload record of one row's mapped fields."""
    if entity == "job":
        return c.job(f["status"], f.get("deal_id"), f.get("scheduled_for"), f.get("completed_at"),
                     f.get("account_ref"), f.get("lines") or [])
    if entity == "invoice":
        return c.invoice(f["status"], f.get("deal_id"), f.get("job_id"), f["amount_due_cents"],
                         f["amount_paid_cents"], f["currency"], f.get("lines") or [], f.get("issued_at"),
                         f.get("due_at"))
    if entity == "payment":
        return c.payment(f["status"], f.get("invoice_id"), f["amount_cents"], f["currency"], f["attempt"],
                         f.get("failure_reason"))
    raise c.BadInput(f"entity {entity!r} has no row mapping")


def _customer(entity: str, f: dict[str, Any], ctx: c.Context) -> tuple[str | None, list[dict[str, Any]]]:
    direct = f.get("customer_id")
    hints = {"name": f.get("customer_name")}
    if entity == "job":
        cid, cands = c.resolve_customer(ctx, "dispatch", f.get("account_ref"), hints, direct)
        if ctx.identity is not None and direct:
            ctx.identity.link("dispatch", f.get("account_ref"), direct)
        return cid, cands
    if ctx.identity is not None and direct:
        ctx.identity.link("billing", f.get("billing_customer_id"), direct)
    return c.resolve_customer(ctx, "billing", f.get("billing_customer_id"), hints, direct)


def _event(*, event_id: str, entity: str, entity_id: str, seq: int, op: str, occurred: int | None,
           fields: dict[str, Any] | None, raw: bytes, ctx: c.Context, changed: list[str]) -> c.Outcome:
    cid: str | None
    cands: list[dict[str, Any]]
    if fields is None:  # a delete: the key columns only
        cid, cands = None, []
    else:
        cid, cands = _customer(entity, fields, ctx)
    payload = None if fields is None else row_payload(entity, fields)
    ev = c.change_event(event_id=event_id, vendor=VENDOR, entity_type=entity, entity_id=entity_id, seq=seq, op=op,
                        occurred_at=occurred, payload=payload, raw=raw, content_type=CONTENT_TYPE, ctx=ctx,
                        customer_id=cid, changed_fields=changed,
                        caused_by_command_id=c.command_id_from((fields or {}).get("concord_command_id"),
                                                               bare_ok=True))
    c.check(ev)
    return c.Outcome(events=[c.Mapped(ev, event_id, cands)])


def _outbox_payload(payload: Any, agg_id: str) -> dict[str, Any]:
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            raise c.BadInput("outbox payload is not JSON", agg_id) from None
    if not isinstance(payload, dict):
        raise c.BadInput("outbox payload is not an object", agg_id)
    return payload


def _outbox_event(*, agg: str, agg_id: str, event_id: str | None, etype: str, payload: Any, seq: int | None,
                  occurred: int | None, raw: bytes, ctx: c.Context) -> c.Outcome:
    cfg = _config(ctx)
    tm = cfg.aggregate(agg)
    if tm is None:
        raise c.BadInput(f"outbox aggregate type {agg!r} is not mapped ({sorted(cfg.outbox.aggregates)})", agg_id)
    body = _outbox_payload(payload, agg_id)
    vf = cfg.outbox.version_field
    if vf and body.get(vf) is not None:
        seq = c.to_int(body[vf], f"outbox payload {vf}")
    if seq is None:
        raise c.BadInput(f"outbox event has no {vf or 'version'} field and no offset: no ordering", agg_id)
    low = etype.lower()
    op = "delete" if low.endswith(("deleted", "delete", "destroyed")) else \
        "create" if low.endswith(("created", "create")) else "update"
    fields = None if op == "delete" else dm.fields_of(tm, body, f"outbox {agg} payload")
    return _event(event_id=f"dbz-outbox:{event_id or f'{tm.entity}:{agg_id}:{seq}'}", entity=tm.entity,
                  entity_id=agg_id, seq=seq, op=op, occurred=occurred or c.to_ms(body.get("occurred_at")),
                  fields=fields, raw=raw, ctx=ctx, changed=[str(x) for x in body.get("changed_fields") or []])


def _outbox_row(row: dict[str, Any], seq: int | None, occurred: int | None, raw: bytes, ctx: c.Context) -> c.Outcome:
    agg_id = str(c.require(row, "aggregateid"))
    return _outbox_event(agg=str(c.require(row, "aggregatetype")), agg_id=agg_id,
                         event_id=str(row["id"]) if row.get("id") else None, etype=str(row.get("type") or ""),
                         payload=row.get("payload"), seq=seq, occurred=occurred, raw=raw, ctx=ctx)


def _router_output(dump: dict[str, Any], value: Any, headers: dict[str, Any], raw: bytes,
                   ctx: c.Context) -> c.Outcome:
    topic = str(dump.get("topic") or "")
    agg = topic[len(_config(ctx).outbox.topic_prefix):]
    key = dump.get("key")
    if key is None or key == "":
        raise c.BadInput(f"outbox record on {topic} has no key (the aggregate id)")
    agg_id = str(key if not isinstance(key, dict) else key.get("payload", key))
    offset = dump.get("offset")
    return _outbox_event(agg=agg, agg_id=agg_id, event_id=headers.get("id"),
                         etype=str(headers.get("eventType") or headers.get("type") or ""), payload=value,
                         seq=c.to_int(offset, "offset") if offset is not None else None,
                         occurred=c.to_ms(dump.get("timestamp") or dump.get("ts"), "timestamp"), raw=raw, ctx=ctx)


def _table_map(ctx: c.Context, schema: str | None, table: str) -> dm.TableMap:
    cfg = _config(ctx)
    tm = cfg.table(schema, table, ctx.settings.get("tables"))
    if tm is None:
        raise c.BadInput(f"table {table!r} is not mapped to an entity ({sorted(cfg.tables)})")
    return tm


def _changed(tm: dm.TableMap, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return sorted(name for name, col in tm.fields.items() if before.get(col.column) != after.get(col.column))


def _envelope(record: dict[str, Any], raw: bytes, ctx: c.Context) -> c.Outcome:
    op_code = record["op"]
    if op_code == "t":
        return c.Outcome(skipped=1)  # truncate: no row to map
    if op_code not in OPS:
        raise c.BadInput(f"op {op_code!r} is not c, u, d or r")
    src = c.require(record, "source")
    table = c.require(src, "table", what="source.table")
    tm = _table_map(ctx, src.get("schema"), table)
    before, after = record.get("before"), record.get("after")
    seq = _seq(src)
    occurred = c.to_ms(src.get("ts_ms") or record.get("ts_ms"), "ts_ms")
    if tm.entity == "outbox":
        if after is None:
            return c.Outcome(skipped=1)  # the outbox row's own deletion
        return _outbox_row(after, seq, occurred, raw, ctx)
    op = OPS[op_code]
    row = before if op == "delete" else after
    if not isinstance(row, dict):
        raise c.BadInput(f"op {op_code} without {'before' if op == 'delete' else 'after'} row")
    entity_id = dm.read(c.require(row, tm.id or "id", what=f"{table}.{tm.id}"), "id", f"{table}.{tm.id}")
    fields = None if op == "delete" else dm.fields_of(tm, row, table)
    changed = _changed(tm, before, after or {}) if op == "update" and isinstance(before, dict) else []
    return _event(event_id=f"dbz:{src.get('name', '')}:{table}:{entity_id}:{seq}:{op_code}", entity=tm.entity,
                  entity_id=entity_id, seq=seq, op=op, occurred=occurred, fields=fields, raw=raw, ctx=ctx,
                  changed=changed)


def _flattened(row: dict[str, Any], dump: dict[str, Any] | None, raw: bytes, ctx: c.Context) -> c.Outcome:
    """ExtractNewRecordState output: the row, with ``__``-prefixed metadata from ``add.fields``."""
    meta = {k[2:].removeprefix("source_"): v for k, v in row.items() if k.startswith("__")}
    data = {k: v for k, v in row.items() if not k.startswith("__")}
    topic = str((dump or {}).get("topic") or "")
    parts = topic.split(".")
    table = meta.get("table") or (parts[-1] if len(parts) >= 2 else None)
    if not table:
        raise c.BadInput("a flattened row needs its table: add.fields=op,table,lsn,source.ts_ms, or the record's "
                         "topic (server.schema.table)")
    schema = meta.get("schema") or (parts[-2] if len(parts) >= 3 else None)
    tm = _table_map(ctx, schema, str(table))
    try:
        seq = _seq(meta)
    except c.BadInput:
        raise c.BadInput("a flattened row has no ordering: add.fields must include lsn (Postgres), or file and pos "
                         "(MySQL)") from None
    deleted = str(meta.get("deleted", "")).lower() == "true" or meta.get("op") == "d"
    op_code = "d" if deleted else str(meta.get("op") or "r")  # no __op: the full row, i.e. a snapshot of it
    if op_code not in OPS:
        raise c.BadInput(f"__op {op_code!r} is not c, u, d or r")
    if tm.entity == "outbox":
        return c.Outcome(skipped=1) if deleted else _outbox_row(data, seq, c.to_ms(meta.get("ts_ms")), raw, ctx)
    entity_id = dm.read(c.require(data, tm.id or "id", what=f"{table}.{tm.id}"), "id", f"{table}.{tm.id}")
    fields = None if deleted else dm.fields_of(tm, data, str(table))
    occurred = c.to_ms(meta.get("ts_ms") or (dump or {}).get("timestamp"), "__source_ts_ms")
    server = meta.get("name") or (parts[0] if len(parts) >= 3 else "")
    return _event(event_id=f"dbz:{server}:{table}:{entity_id}:{seq}:{op_code}", entity=tm.entity,
                  entity_id=entity_id, seq=seq, op=OPS[op_code], occurred=occurred, fields=fields, raw=raw, ctx=ctx,
                  changed=[])


def _unwrap_schema(record: dict[str, Any]) -> Any:
    """``{schema, payload}`` → the payload, every value read by its embedded schema."""
    schema, payload = record["schema"], record["payload"]
    if payload is None or not isinstance(schema, dict) or not schema.get("fields"):
        return payload  # a schema without fields (schemas.enable=false relays) types nothing
    return dm.typed(payload, schema, "value")


def map_record(record: Any, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Map one Debezium record (envelope, record dump, flattened row, tombstone or outbox event)."""
    dump: dict[str, Any] | None = None
    headers: dict[str, Any] = {}
    if isinstance(record, dict) and _is_dump(record):
        dump = record
        headers = _headers(record.get("headers"))
        record = _json_value(record["value"] if "value" in record else record["payload"])
    if record is None:
        return c.Outcome(skipped=1)  # tombstone: log compaction's marker after a delete
    prefix = _config(ctx).outbox.topic_prefix
    if dump is not None and prefix and str(dump.get("topic") or "").startswith(prefix):
        return _router_output(dump, record, headers, raw, ctx)
    if not isinstance(record, dict):
        raise c.BadInput("a Debezium record must be a JSON object")
    if "schema" in record and "payload" in record:
        record = _unwrap_schema(record)
        if record is None:
            return c.Outcome(skipped=1)
        if not isinstance(record, dict):
            raise c.BadInput("a Debezium payload must be a JSON object")
    if "op" in record:
        return _envelope(record, raw, ctx)
    if "aggregatetype" in record:
        return _outbox_row(record, None, None, raw, ctx)
    if any(k.startswith("__") for k in record) or (dump is not None and dump.get("topic")):
        return _flattened(record, dump, raw, ctx)
    if "id" in headers and dump is not None:
        raise c.BadInput(f"record with an id header on topic {dump.get('topic')!r}: outbox router output is "
                         f"read from topics starting {prefix!r}")
    raise c.BadInput("not a Debezium record: no op and source (envelope), no __ metadata (ExtractNewRecordState) "
                     "and no topic to name its table")


def parse(raw: bytes) -> Any:
    """One record as JSON (``null`` is a tombstone)."""
    return json.loads(raw) if raw.strip() else None
