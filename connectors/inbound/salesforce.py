"""Salesforce Change Data Capture → canonical events: Account → customer, Opportunity → deal.

Accepted shapes: a CometD / Streaming API message (``{"data": {"payload": ..., "event": {"replayId": n}}}``),
``{"payload": ..., "event": ...}``, or the bare event payload with its ``ChangeEventHeader``.

- ``recordIds`` with several ids: one canonical event per record (Salesforce merged the same change).
- ``seq``: the ``replayId`` when the delivery carries one, else ``commitNumber``; times 1000 plus the
  header's ``sequenceNumber`` (the position inside the transaction, not a version) as a tie-break.
  Salesforce does not promise gap-free sequences per record, so ``seq_contiguous`` is false.
- ``GAP_*`` and ``GAP_OVERFLOW`` events and wildcard record ids carry no field data: they map to a
  ``Reread`` (the ingest command dead-letters it with stage ``gap``), never to a guessed change.
- ``changeOrigin`` ``...;client=concord:<command_id>`` marks the echo of a Concord command.
- Opportunity products: the ``Line_Items__c`` long-text field (a JSON array of OpportunityLineItem fields,
  kept current by a flow) becomes the deal's lines; OpportunityLineItem change events are not mapped yet.
- UPDATE events carry only the changed fields; the payload then holds those (others at defaults),
  ``changed_fields`` names the Concord fields that really changed. An update that does not carry the
  record's state field (Account ``Name``, Opportunity ``StageName``) has a null payload.
"""

from __future__ import annotations

import json
from typing import Any

from connectors.inbound import common as c

VENDOR = "salesforce"
CONTENT_TYPE = "application/json; format=salesforce-cdc"
OPS = {"CREATE": "create", "UPDATE": "update", "DELETE": "delete", "UNDELETE": "create"}
GAPS = {"GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE", "GAP_OVERFLOW"}
ENTITIES = {"Account": "customer", "Opportunity": "deal"}

# Native field → Concord field, per entity (custom fields are this org's; configurable via settings).
ACCOUNT_FIELDS = {"Name": "name", "Email__c": "email", "Billing_Account_Id__c": "billing_account_id",
                  "Billing_Terms__c": "billing_terms", "Billing_Policy__c": "billing_policy",
                  "BillingAddress": "billing_address", "Dispatch_Account_Id__c": "external_ids"}
OPPORTUNITY_FIELDS = {"Name": "name", "StageName": "stage", "Amount": "amount_cents", "CurrencyIsoCode": "currency",
                      "CloseDate": "closed_at", "IsWon": "stage", "IsClosed": "stage",
                      "Billing_Status__c": "billing_status", "Line_Items__c": "lines"}


def _unwrap(record: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    if "data" in record and isinstance(record["data"], dict) and "payload" in record["data"]:
        record = record["data"]
    replay = None
    if "payload" in record and isinstance(record["payload"], dict):
        replay = (record.get("event") or {}).get("replayId", record.get("replayId"))
        record = record["payload"]
    if not isinstance(record, dict) or "ChangeEventHeader" not in record:
        raise c.BadInput("not a Change Data Capture event: no ChangeEventHeader")
    return record, (c.to_int(replay, "replayId") if replay is not None else None)


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


def _customer_payload(body: dict[str, Any], present: set[str]) -> dict[str, Any] | None:
    if "Name" not in present or body.get("Name") is None:
        return None
    return c.customer(body.get("Name"), body.get("Email__c"), body.get("Billing_Account_Id__c"),
                      body.get("Billing_Terms__c"), body.get("Billing_Policy__c"), _address(body.get("BillingAddress")),
                      {"dispatch": body.get("Dispatch_Account_Id__c"), "billing": body.get("Billing_Account_Id__c")})


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


def _deal_payload(body: dict[str, Any], present: set[str]) -> dict[str, Any] | None:
    stage = _stage(body)
    if stage is None:
        return None
    closed_at = c.to_ms(body.get("CloseDate"), "CloseDate") if stage != "open" else None
    return c.deal(stage, body.get("Name") or "", c.to_cents(body.get("Amount"), "Amount"),
                  body.get("CurrencyIsoCode") or "USD", _lines(body.get("Line_Items__c")), closed_at,
                  body.get("Billing_Status__c"))


def map_record(record: Any, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Map one CDC event (any accepted shape) to canonical events or re-read notices."""
    if not isinstance(record, dict):
        raise c.BadInput("a Change Data Capture event must be a JSON object")
    body, replay = _unwrap(record)
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
    if change in GAPS or wildcard:
        reason = ("overflow event: the transaction changed too many records for field data" if change == "GAP_OVERFLOW"
                  else "gap event: Salesforce sent the change without field data" if change in GAPS
                  else "wildcard record id: a field type conversion touched every record")
        out.rereads.append(c.Reread(VENDOR, entity, [str(i) for i in ids], change,
                                    f"{reason}; re-read {entity_name} {', '.join(map(str, ids))} from Salesforce",
                                    f"sf:{txn}:{seq_no}:{change}:{','.join(map(str, ids))}", raw))
        return out
    if change not in OPS:
        raise c.BadInput(f"changeType {change!r} is not a Change Data Capture change type", ids[0])
    op = OPS[change]
    commit = hdr.get("commitNumber")
    if replay is None and commit is None:
        raise c.BadInput("neither replayId nor ChangeEventHeader.commitNumber: no ordering", ids[0])
    base = replay if replay is not None else c.to_int(commit, "commitNumber")
    seq = base * 1000 + min(seq_no, 999)
    occurred = c.to_ms(c.require(hdr, "commitTimestamp", what="ChangeEventHeader.commitTimestamp"), "commitTimestamp")
    caused_by = c.command_id_from(hdr.get("changeOrigin"), body.get("Concord_Command_Id__c"))
    fields = ACCOUNT_FIELDS if entity == "customer" else OPPORTUNITY_FIELDS
    present = {k for k in body if k != "ChangeEventHeader"}
    nulled = set(hdr.get("nulledFields") or [])
    if op == "update":
        native_changed = set(hdr.get("changedFields") or []) | nulled | set(hdr.get("diffFields") or [])
        changed = [fields[f] for f in sorted(native_changed) if f in fields]
    else:
        changed = [fields[f] for f in sorted(present) if f in fields]
    for rid in map(str, ids):
        payload = None
        if op != "delete":
            payload = _customer_payload(body, present) if entity == "customer" else _deal_payload(body, present)
            if op == "create" and payload is None:
                raise c.BadInput(f"{change} of {entity_name} {rid} lacks its "
                                 f"{'Name' if entity == 'customer' else 'StageName'}", rid)
        if entity == "customer":
            customer_id, candidates = rid, []
            if ctx.identity is not None and payload is not None:
                ctx.identity.link("crm", rid, rid)
                ctx.identity.link("billing", body.get("Billing_Account_Id__c"), rid)
                ctx.identity.link("dispatch", body.get("Dispatch_Account_Id__c"), rid)
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
