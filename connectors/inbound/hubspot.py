"""HubSpot webhooks → canonical events: deal.* → deal, company.* → customer; contact.* is identity only.

A webhook POST body is a JSON array of events (``subscriptionType``, ``objectId``, ``propertyName``,
``propertyValue``, ``changeSource``, ``sourceId``, ``occurredAt``, ``eventId``, ``subscriptionId``,
``portalId``, ``attemptNumber``). HubSpot retries, so the dedupe key is
``(subscriptionId, eventId, occurredAt)``.

HubSpot events carry one property each and no record: a ``dealstage`` change maps to a Deal payload
holding the stage (other fields at defaults; ``changed_fields`` says which is real), a company ``name``
change to a Customer payload holding the name; other property changes map to an update with a null
payload and ``changed_fields`` set. A ``*.creation`` event carries no data at all, so it maps to a
``Reread`` (fetch the object from HubSpot's API) rather than to a guessed record.

``seq`` is ``occurredAt`` (ms) × 1000 plus the event's position among that object's events in the
body (a tie-break for several properties changed in the same millisecond); not contiguous.

Signature v3: base64(HMAC-SHA256(client secret, method + uri + body + timestamp)) in
``X-HubSpot-Signature-v3``; requests whose ``X-HubSpot-Request-Timestamp`` is older than 5 minutes are
rejected.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from connectors.inbound import common as c

VENDOR = "hubspot"
CONTENT_TYPE = "application/json; format=hubspot-webhook"
MAX_AGE_MS = 5 * 60 * 1000
OBJECTS = {"deal": "deal", "company": "customer"}
DEAL_PROPERTIES = {"dealname": "name", "dealstage": "stage", "amount": "amount_cents", "closedate": "closed_at",
                   "deal_currency_code": "currency", "billing_status": "billing_status"}
COMPANY_PROPERTIES = {"name": "name", "domain": "email", "billing_account_id": "billing_account_id",
                      "billing_terms": "billing_terms", "address": "billing_address"}


class SignatureError(Exception):
    """The request's signature is missing, wrong or stale."""


def sign_v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """The X-HubSpot-Signature-v3 value HubSpot would send."""
    msg = method.upper().encode() + uri.encode() + body + str(timestamp).encode()
    return base64.b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()


def verify_v3(secret: str, method: str, uri: str, body: bytes, signature: str | None, timestamp: str | None,
              now_ms: int | None = None) -> None:
    """Raise SignatureError unless the v3 signature matches and the timestamp is under 5 minutes old."""
    if not secret:
        raise SignatureError("HUBSPOT_CLIENT_SECRET is not set")
    if not signature or not timestamp:
        raise SignatureError("missing X-HubSpot-Signature-v3 or X-HubSpot-Request-Timestamp")
    try:
        ts = int(timestamp)
    except ValueError:
        raise SignatureError(f"X-HubSpot-Request-Timestamp {timestamp!r} is not epoch milliseconds") from None
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    if now - ts > MAX_AGE_MS:
        raise SignatureError(f"request timestamp is {(now - ts) // 1000}s old (limit 300s)")
    if not hmac.compare_digest(sign_v3(secret, method, uri, body, timestamp), signature):
        raise SignatureError("X-HubSpot-Signature-v3 does not match")


def _stage(value: Any) -> str:
    v = str(value or "").lower().replace("_", "").replace(" ", "")
    return "closed_won" if v == "closedwon" else "closed_lost" if v == "closedlost" else "open"


def _one(e: dict[str, Any], position: int, raw: bytes, ctx: c.Context) -> c.Outcome:
    out = c.Outcome()
    sub_type = str(c.require(e, "subscriptionType"))
    obj_id = str(c.require(e, "objectId"))
    occurred = c.to_int(c.require(e, "occurredAt"), "occurredAt")
    key = f"hs:{e.get('subscriptionId')}:{c.require(e, 'eventId')}:{occurred}"
    obj, _, action = sub_type.partition(".")
    if obj == "contact":
        out.skipped += 1  # contacts are not a Concord entity: counted as skipped, not published
        return out
    entity = OBJECTS.get(obj)
    if entity is None:
        raise c.BadInput(f"subscriptionType {sub_type!r} is not mapped", obj_id)
    if action == "creation":
        out.rereads.append(c.Reread(VENDOR, entity, [obj_id], sub_type,
                                    f"HubSpot {obj} {obj_id} was created; the webhook carries no properties: "
                                    f"re-read it from the CRM objects API", key, raw))
        return out
    prop, value = e.get("propertyName"), e.get("propertyValue")
    payload = None
    changed: list[str] = []
    if action == "deletion":
        op = "delete"
    elif action == "propertyChange":
        op = "update"
        if not prop:
            raise c.BadInput("propertyChange without propertyName", obj_id)
        fields = DEAL_PROPERTIES if entity == "deal" else COMPANY_PROPERTIES
        changed = [fields.get(prop, prop)]
        if entity == "deal" and prop == "dealstage":
            payload = c.deal(_stage(value))
        elif entity == "customer" and prop == "name" and value:
            payload = c.customer(str(value))
    elif action in ("restore", "merge", "associationChange"):
        op = "update"
    else:
        raise c.BadInput(f"subscriptionType {sub_type!r} is not mapped", obj_id)
    if entity == "customer":
        customer_id, candidates = obj_id, []
        if ctx.identity is not None and prop == "name" and value:
            ctx.identity.learn_profile(obj_id, name=str(value))
        if ctx.identity is not None and prop == "domain" and value:
            ctx.identity.learn_profile(obj_id, website=str(value))
    else:
        customer_id, candidates = c.resolve_customer(ctx, "hubspot-deal", obj_id)
    caused_by = c.command_id_from(e.get("sourceId"), e.get("changeSource"))
    if caused_by is None and prop == "concord_command_id":  # the property Concord's HubSpot adapter writes
        caused_by = c.command_id_from(value)
    ev = c.change_event(event_id=key, vendor=VENDOR, entity_type=entity, entity_id=obj_id,
                        seq=occurred * 1000 + min(position, 999), op=op, occurred_at=occurred, payload=payload,
                        raw=raw, content_type=CONTENT_TYPE, ctx=ctx, customer_id=customer_id, changed_fields=changed,
                        caused_by_command_id=caused_by)
    c.check(ev)
    out.events.append(c.Mapped(ev, key, candidates))
    return out


def map_record(record: Any, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Map a webhook body (array of events) or one event; a bad item is rejected alone, the rest go on."""
    events = record if isinstance(record, list) else [record]
    out = c.Outcome()
    positions: dict[tuple[str, Any], int] = {}
    for e in events:
        if not isinstance(e, dict):
            out.rejected.append(c.BadInput(f"a HubSpot event must be a JSON object, got {type(e).__name__}"))
            continue
        k = (str(e.get("objectId")), str(e.get("occurredAt")))
        positions[k] = positions.get(k, -1) + 1
        try:
            out.extend(c.guard(_one, e, positions[k], raw, ctx))
        except c.BadInput as exc:
            if exc.record_id is None and isinstance(e.get("eventId"), str | int):
                exc.record_id = str(e.get("eventId"))
            if len(events) == 1:
                raise
            out.rejected.append(exc)
    return out


def parse(raw: bytes) -> Any:
    """A webhook body: a JSON array of events."""
    return json.loads(raw)
