"""Salesforce Change Data Capture → canonical events: Account → customer, Opportunity → deal.

Accepted shapes: a CometD / Streaming API message (``{"data": {"payload": ..., "event": {"replayId": n}}}``),
``{"payload": ..., "event": ...}``, or the bare event payload with its ``ChangeEventHeader``.

- ``recordIds`` with several ids: one canonical event per record (Salesforce merged the same change).
- Pub/Sub API events decoded by a relay (``{"schemaId", "replayId", "payload"}``, the event's Avro schema
  embedded as ``schema`` or found in ``$CONCORD_SALESFORCE_SCHEMA_DIR/<schemaId>.avsc``): bitmap
  ``changedFields`` / ``nulledFields`` / ``diffFields`` (``0x…``, nested ``<field index>-0x…``) are decoded
  against that schema (bit i = the schema's field i).
- ``seq``: one scheme per channel, ``commitNumber`` (in every header, whatever the delivery) unless the
  channel is configured for ``replayId`` (``settings["salesforce_seq"]`` / ``$CONCORD_SALESFORCE_SEQ``);
  a record lacking the configured one is rejected, never ordered on the other's scale. Times 1000 plus the
  header's ``sequenceNumber`` (the position inside the transaction, not a version) as a tie-break.
  Salesforce does not promise gap-free sequences per record, so ``seq_contiguous`` is false.
- ``GAP_*`` events and wildcard record ids carry no field data: they map to a ``Reread`` of those records
  (the ingest command dead-letters it with stage ``gap``), never to a guessed change; ``GAP_OVERFLOW`` is a
  resync request for the entity type from that commit on (its record id is a placeholder).
- Compound fields (``BillingAddress``): an update names the changed parts (``BillingAddress.City``) and
  carries only those, so the whole value is unknown: the update becomes a ``Reread`` of the record, which
  ``concord fetch`` publishes whole at the update's place in order (a partial event there first would make
  the guard drop the whole record as stale).
- ``GAP_OVERFLOW``: a resync request (``Reread`` without ids, ``since_ms`` = the overflow's commit time);
  ``concord fetch`` reads every record of the type modified since then (SOQL on ``SystemModstamp``) and
  publishes each as a snapshot at the overflow's place in order.
- ``changeOrigin`` ``...;client=concord:<command_id>`` marks the echo of a Concord command.
- Opportunity products: the ``Line_Items__c`` long-text field (a JSON array of OpportunityLineItem fields,
  kept current by a flow) becomes the deal's lines; OpportunityLineItem change events are not mapped yet.
- UPDATE events carry only the changed fields; the payload then holds those (others at defaults),
  ``changed_fields`` names the Concord fields that really changed; an update that changes no mapped field
  has a null payload.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

from connectors.inbound import common as c
from connectors.inbound import join_keys

VENDOR = "salesforce"
CONTENT_TYPE = "application/json; format=salesforce-cdc"
OPS = {"CREATE": "create", "UPDATE": "update", "DELETE": "delete", "UNDELETE": "create"}
GAPS = {"GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE", "GAP_OVERFLOW"}
ENTITIES = {"Account": "customer", "Opportunity": "deal"}

# Native field → Concord field, per entity (custom fields are this org's; configurable via settings).
ACCOUNT_FIELDS = {"Name": "name", "Email__c": "email", "Billing_Terms__c": "billing_terms",
                  "Billing_Policy__c": "billing_policy", "BillingAddress": "billing_address"}  # + join_keys.yaml
OPPORTUNITY_FIELDS = {"Name": "name", "StageName": "stage", "Amount": "amount_cents", "CurrencyIsoCode": "currency",
                      "CloseDate": "closed_at", "IsWon": "stage", "IsClosed": "stage",
                      "Billing_Status__c": "billing_status", "Line_Items__c": "lines"}


def _unwrap(record: dict[str, Any]) -> tuple[dict[str, Any], int | None, Any]:
    """(payload, replayId, the event's Avro schema when the delivery names or carries one)."""
    if "data" in record and isinstance(record["data"], dict) and "payload" in record["data"]:
        record = record["data"]
    replay, schema = None, None
    if "payload" in record and isinstance(record["payload"], dict):
        replay = (record.get("event") or {}).get("replayId", record.get("replayId"))
        schema = record.get("schema") if isinstance(record.get("schema"), dict | str) else None
        schema = schema or record.get("schemaId")
        record = record["payload"]
    if not isinstance(record, dict) or "ChangeEventHeader" not in record:
        raise c.BadInput("not a Change Data Capture event: no ChangeEventHeader")
    return record, (_replay_id(replay) if replay is not None else None), schema


def _replay_id(value: Any) -> int:
    """A replayId: a number (CometD) or the Pub/Sub API's opaque bytes as base64 (big-endian)."""
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().isdigit()):
        return c.to_int(value, "replayId")
    try:
        return int.from_bytes(base64.b64decode(str(value), validate=True), "big")
    except (ValueError, TypeError):
        raise c.BadInput(f"replayId {value!r} is neither a number nor base64 bytes") from None


_BITMAP = re.compile(r"^(?:(\d+)-)?0x([0-9A-Fa-f]+)$")


def _schema_fields(schema: Any, ctx: c.Context) -> list[dict[str, Any]]:
    """The top-level fields of the event's Avro schema (embedded, configured, or from the schema directory)."""
    if isinstance(schema, str) and not schema.lstrip().startswith("{"):
        known = ctx.settings.get("salesforce_schemas") or {}
        found = known.get(schema)
        folder = os.environ.get("CONCORD_SALESFORCE_SCHEMA_DIR")
        if found is None and folder and (Path(folder) / f"{schema}.avsc").is_file():
            found = (Path(folder) / f"{schema}.avsc").read_text()
        if found is None:
            raise c.BadInput(f"changedFields is a Pub/Sub bitmap and event schema {schema!r} is not known: put it in "
                             "$CONCORD_SALESFORCE_SCHEMA_DIR/<schemaId>.avsc")
        schema = found
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise c.BadInput("the event's Avro schema is not JSON") from None
    if not isinstance(schema, dict) or not isinstance(schema.get("fields"), list):
        raise c.BadInput("changedFields is a Pub/Sub bitmap and the event carries no Avro schema to decode it")
    return schema["fields"]


def _record_fields(avro_type: Any) -> list[dict[str, Any]] | None:
    for t in avro_type if isinstance(avro_type, list) else [avro_type]:
        if isinstance(t, dict) and t.get("type") == "record":
            return t.get("fields") or []
    return None


def _bits(hexdigits: str, fields: list[dict[str, Any]], where: str) -> list[str]:
    value, names = int(hexdigits, 16), []
    for i in range(value.bit_length()):
        if value >> i & 1:
            if i >= len(fields):
                raise c.BadInput(f"{where} bit {i} is past the schema's {len(fields)} fields")
            names.append(str(fields[i]["name"]))
    return names


def decode_field_list(items: list[Any], schema: Any, ctx: c.Context, what: str) -> list[str]:
    """Field names from a header field list: names as they are, Pub/Sub bitmaps decoded against the schema."""
    if not any(isinstance(i, str) and _BITMAP.match(i) for i in items):
        return [str(i) for i in items]
    fields = _schema_fields(schema, ctx)
    out: list[str] = []
    for item in items:
        m = _BITMAP.match(str(item))
        if not m:
            out.append(str(item))
            continue
        if m.group(1) is None:
            out += _bits(m.group(2), fields, what)
            continue
        parent_at = int(m.group(1))
        if parent_at >= len(fields):
            raise c.BadInput(f"{what} {item!r} names field {parent_at}, past the schema's {len(fields)} fields")
        nested = _record_fields(fields[parent_at].get("type"))
        if nested is None:
            raise c.BadInput(f"{what} {item!r}: schema field {fields[parent_at]['name']} is not a record")
        out += [f"{fields[parent_at]['name']}.{n}" for n in _bits(m.group(2), nested, what)]
    return out


def _address(addr: Any) -> str | None:
    if isinstance(addr, dict):
        parts = [addr.get(k) for k in ("Street", "City", "State", "PostalCode", "Country")]
        return ", ".join(str(p) for p in parts if p) or None
    return addr or None


def _stage(body: dict[str, Any]) -> str | None:
    if body.get("IsWon") is True:
        return "closed_won"
    if body.get("IsClosed") is True and body.get("IsWon") is False:
        return "closed_lost"
    name = body.get("StageName")
    if name is None:
        return None
    n = str(name).lower().replace(" ", "").replace("_", "")
    return "closed_won" if n == "closedwon" else "closed_lost" if n == "closedlost" else "open"


def _customer_payload(body: dict[str, Any], present: set[str], keys: join_keys.SalesforceKeys,
                      partial: bool = False) -> dict[str, Any] | None:
    if not partial and ("Name" not in present or body.get("Name") is None):
        return None
    billing, dispatch = body.get(keys.billing_account_id), body.get(keys.dispatch_account_id)
    return c.customer(body.get("Name"), body.get("Email__c"), billing, body.get("Billing_Terms__c"),
                      body.get("Billing_Policy__c"), _address(body.get("BillingAddress")),
                      {"dispatch": str(dispatch or ""), "billing": str(billing or "")})


def _lines(value: Any) -> list[dict[str, Any]]:
    """The deal lines of ``Line_Items__c``.

    The field holds the opportunity's products as a JSON array of OpportunityLineItem fields (``ProductCode``,
    ``Quantity``, ``UnitPrice`` in major units, ``Description``), kept current by a flow.
    """
    if value in (None, ""):
        return []
    try:
        items = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        raise c.BadInput("Line_Items__c is not JSON") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise c.BadInput("Line_Items__c is not a JSON array of line items")
    return [c.line(c.require(i, "ProductCode", what="Line_Items__c[].ProductCode"), i.get("Quantity", 1),
                   c.to_cents(i.get("UnitPrice"), "Line_Items__c[].UnitPrice"), i.get("Description") or "")
            for i in items]


def _deal_payload(body: dict[str, Any], present: set[str], partial: bool = False) -> dict[str, Any] | None:
    stage = _stage(body)
    if stage is None and not partial:
        return None
    stage = stage or "open"  # a partial update: changed_fields says the stage is not news
    closed_at = c.to_ms(body.get("CloseDate"), "CloseDate") if stage != "open" or partial else None
    return c.deal(stage, body.get("Name") or "", c.to_cents(body.get("Amount"), "Amount"),
                  body.get("CurrencyIsoCode") or "USD", _lines(body.get("Line_Items__c")), closed_at,
                  body.get("Billing_Status__c"))


_ADDRESS_PARTS = {"street": "Street", "city": "City", "state": "State", "postalCode": "PostalCode",
                  "country": "Country", "latitude": "Latitude", "longitude": "Longitude",
                  "geocodeAccuracy": "GeocodeAccuracy"}


def cdc_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A REST API record's fields as a change event carries them (compound addresses' parts capitalised)."""
    out = {}
    for k, v in record.items():
        if k == "attributes":
            continue
        out[k] = {_ADDRESS_PARTS.get(p, p): x for p, x in v.items()} if isinstance(v, dict) else v
    return out


def resync_fields(entity: str, ctx: c.Context) -> list[str]:
    """The native fields a resync reads for ``entity`` (what the mapping reads, join keys included)."""
    if entity == "deal":
        return sorted({*OPPORTUNITY_FIELDS, "AccountId"})
    keys = join_keys.of(ctx).salesforce
    return sorted({*ACCOUNT_FIELDS, "Website", keys.billing_account_id, keys.dispatch_account_id})


def with_record(message: dict[str, Any], record_id: str, fields: dict[str, Any] | None) -> dict[str, Any]:
    """The gap ``message`` as the change it stood for: one record, its fields read from the API (None: deleted)."""
    doc = json.loads(json.dumps(message))
    holder = doc["data"] if isinstance(doc.get("data"), dict) and "payload" in doc["data"] else doc
    payload = holder["payload"] if isinstance(holder.get("payload"), dict) else holder
    hdr = payload["ChangeEventHeader"]
    hdr["recordIds"] = [record_id]
    hdr["changeType"] = "DELETE" if fields is None else "CREATE"
    hdr["changedFields"] = hdr["nulledFields"] = hdr["diffFields"] = []
    payload.update(fields or {})
    return doc


def map_record(record: Any, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Map one CDC event (any accepted shape) to canonical events or re-read notices."""
    if not isinstance(record, dict):
        raise c.BadInput("a Change Data Capture event must be a JSON object")
    body, replay, schema = _unwrap(record)
    hdr = body["ChangeEventHeader"]
    entity_name = c.require(hdr, "entityName", what="ChangeEventHeader.entityName")
    change = str(c.require(hdr, "changeType", what="ChangeEventHeader.changeType")).upper()
    ids = c.require(hdr, "recordIds", what="ChangeEventHeader.recordIds")
    if not isinstance(ids, list) or not ids:
        raise c.BadInput("ChangeEventHeader.recordIds is empty")
    txn = hdr.get("transactionKey") or ""
    seq_no = c.to_int(hdr.get("sequenceNumber") or 0, "sequenceNumber")
    entity = ENTITIES.get(entity_name)
    if entity is None:
        raise c.BadInput(f"entity {entity_name!r} is not mapped (Account, Opportunity)", ids[0])
    out = c.Outcome()
    wildcard = any(str(i).endswith("*") for i in ids)
    if change == "GAP_OVERFLOW":
        # the last good point: the overflowing transaction's commit time (its records were changed at or after it)
        since = c.to_ms(c.require(hdr, "commitTimestamp", what="ChangeEventHeader.commitTimestamp"),
                        "commitTimestamp")
        if since is None:
            raise c.BadInput("GAP_OVERFLOW with an empty commitTimestamp: no point to resync from", ids[0])
        out.rereads.append(c.Reread(VENDOR, entity, [], change,
                                    f"overflow event: a transaction changed too many {entity_name} records for "
                                    f"change events; resync {entity_name} records modified since "
                                    f"{c.iso_ms(since)} (commit {hdr.get('commitNumber')}) from Salesforce",
                                    f"sf:{txn}:{seq_no}:{change}:{since}", raw, since_ms=since))
        return out
    if change in GAPS or wildcard:
        reason = ("gap event: Salesforce sent the change without field data" if change in GAPS
                  else "wildcard record id: a field type conversion touched every record")
        out.rereads.append(c.Reread(VENDOR, entity, [str(i) for i in ids], change,
                                    f"{reason}; re-read {entity_name} {', '.join(map(str, ids))} from Salesforce",
                                    f"sf:{txn}:{seq_no}:{change}:{','.join(map(str, ids))}", raw))
        return out  # concord fetch reads the records and maps them through with_record()
    if change not in OPS:
        raise c.BadInput(f"changeType {change!r} is not a Change Data Capture change type", ids[0])
    op = OPS[change]
    scheme = ctx.settings.get("salesforce_seq") or os.environ.get("CONCORD_SALESFORCE_SEQ") or "commitNumber"
    if scheme == "replayId":
        if replay is None:
            raise c.BadInput("this channel is ordered by replayId and the delivery has none", ids[0])
        base = replay
    else:
        base = c.to_int(c.require(hdr, "commitNumber", what="ChangeEventHeader.commitNumber"), "commitNumber")
    seq = base * 1000 + min(seq_no, 999)
    occurred = c.to_ms(c.require(hdr, "commitTimestamp", what="ChangeEventHeader.commitTimestamp"), "commitTimestamp")
    caused_by = c.command_id_from(hdr.get("changeOrigin"), body.get("Concord_Command_Id__c"))
    keys = join_keys.of(ctx).salesforce
    fields = OPPORTUNITY_FIELDS if entity == "deal" else {
        **ACCOUNT_FIELDS, keys.billing_account_id: "billing_account_id", keys.dispatch_account_id: "external_ids"}
    present = {k for k in body if k != "ChangeEventHeader"}
    lists = {k: decode_field_list(list(hdr.get(k) or []), schema, ctx, f"ChangeEventHeader.{k}")
             for k in ("changedFields", "nulledFields", "diffFields")}
    partial_compound: set[str] = set()
    if op == "update":
        native_changed = set(lists["changedFields"]) | set(lists["nulledFields"]) | set(lists["diffFields"])
        # BillingAddress.City changed: the event carries City alone, so the whole address is not known
        partial_compound = {f.split(".", 1)[0] for f in native_changed if "." in f} & set(fields)
        changed = [fields[f] for f in sorted(native_changed) if f in fields and f not in partial_compound]
        if partial_compound:
            out.rereads.append(c.Reread(VENDOR, entity, [str(i) for i in ids], change,
                                        f"compound field {', '.join(sorted(partial_compound))} changed in part "
                                        f"({', '.join(sorted(f for f in native_changed if '.' in f))}); re-read "
                                        f"{entity_name} {', '.join(map(str, ids))} for its whole value",
                                        f"sf:{txn}:{seq_no}:compound:{','.join(map(str, ids))}", raw))
            # one event at this seq: the record read whole, not a partial one the guard would keep first
            return out
    else:
        changed = [fields[f] for f in sorted(present) if f in fields]
    changed = list(dict.fromkeys(changed))
    for rid in map(str, ids):
        payload = None
        if op != "delete" and not (op == "update" and not changed):
            partial = op == "update"
            payload = _customer_payload(body, present, keys, partial) if entity == "customer" else \
                _deal_payload(body, present, partial)
            if op == "create" and payload is None:
                raise c.BadInput(f"{change} of {entity_name} {rid} lacks its "
                                 f"{'Name' if entity == 'customer' else 'StageName'}", rid)
        customer_id: str | None
        candidates: list[dict[str, Any]]
        if entity == "customer":
            customer_id, candidates = rid, []
            if ctx.identity is not None and payload is not None:
                ctx.identity.link("crm", rid, rid)
                ctx.identity.link("billing", body.get(keys.billing_account_id), rid)
                ctx.identity.link("dispatch", body.get(keys.dispatch_account_id), rid)
                ctx.identity.learn_profile(rid, body.get("Name"), body.get("Email__c"), body.get("Website"))
        else:
            account = body.get("AccountId")
            if account and ctx.identity is not None:
                ctx.identity.link("crm-deal", rid, str(account))
            # The CRM account id is the customer id; an update without AccountId is resolved through the
            # deal → account link an earlier event taught the identity map.
            customer_id, candidates = (str(account), []) if account else c.resolve_customer(ctx, "crm-deal", rid)
        event_id = f"sf:{replay if replay is not None else txn}:{seq_no}:{rid}"
        ev = c.change_event(event_id=event_id, vendor=VENDOR, entity_type=entity, entity_id=rid, seq=seq, op=op,
                            occurred_at=occurred, payload=payload, raw=raw, content_type=CONTENT_TYPE, ctx=ctx,
                            customer_id=customer_id, changed_fields=changed, caused_by_command_id=caused_by)
        c.check(ev)
        out.events.append(c.Mapped(ev, f"sf:{txn}:{seq_no}:{rid}:{change}", candidates))
    return out


def parse(raw: bytes) -> Any:
    """A webhook body: one CDC event as JSON."""
    return json.loads(raw)
