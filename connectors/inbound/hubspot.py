"""HubSpot webhooks → canonical events: deal.* → deal, company.* → customer; contact.* is identity only.

A webhook POST body is a JSON array of events (``subscriptionType``, ``objectId``, ``propertyName``,
``propertyValue``, ``changeSource``, ``sourceId``, ``occurredAt``, ``eventId``, ``subscriptionId``,
``portalId``, ``attemptNumber``). HubSpot retries, so the dedupe key is
``(subscriptionId, eventId, occurredAt)``.

Both subscription formats are read: legacy ``deal.*`` / ``company.*`` and ``object.*`` with ``objectTypeId``
(0-2 company, 0-3 deal, 0-1 contact).

HubSpot events carry one property each and no record: a property change maps to a partial payload
holding that property's value (``dealstage`` through the stage map in connectors/config/hubspot.yaml —
an unlisted stage is rejected, not read as open —, ``dealname``, ``amount``, ``closedate``,
``deal_currency_code``, ``billing_status``; company ``name``, ``billing_account_id``, ``billing_terms``,
``address``), other fields at defaults and ``changed_fields`` naming the real one; other properties map
to an update with a null payload. A ``*.creation`` event carries no data at all, so it maps to a
``Reread`` (fetch the object from HubSpot's API) rather than to a guessed record.
An ``associationChange`` between a deal and a company (primary) links the deal to that company's
customer; a merge updates the surviving record, deletes each merged-away one and remaps its id to the
survivor in the identity map.

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
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from concord.domain.yamlconf import load_model
from concord.exceptions import ConfigError
from connectors.inbound import common as c

VENDOR = "hubspot"
CONTENT_TYPE = "application/json; format=hubspot-webhook"
MAX_AGE_MS = 5 * 60 * 1000
OBJECTS = {"deal": "deal", "company": "customer"}
OBJECT_TYPE_IDS = {"0-1": "contact", "0-2": "company", "0-3": "deal"}  # object.* subscriptions name types by id
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "hubspot.yaml"
DEAL_PROPERTIES = {"dealname": "name", "dealstage": "stage", "amount": "amount_cents", "closedate": "closed_at",
                   "deal_currency_code": "currency", "billing_status": "billing_status"}
COMPANY_PROPERTIES = {"name": "name", "domain": "email", "billing_email": "email",
                      "billing_account_id": "billing_account_id", "billing_terms": "billing_terms",
                      "billing_policy": "billing_policy", "address": "billing_address"}
LINES_PROPERTY = "concord_line_items"  # deal property: the deal's line items as JSON, kept by a workflow


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


class StageMap(BaseModel):
    """connectors/config/hubspot.yaml: deal stage id → won / lost / open, listed or from a saved pipelines response."""

    model_config = ConfigDict(extra="forbid")
    stages: dict[str, Literal["won", "lost", "open"]] = {}
    pipelines_cache: str | None = None  # a saved GET /crm/v3/pipelines/deals response, relative to this file

    @field_validator("stages", mode="before")
    @classmethod
    def _ids_as_text(cls, v: Any) -> Any:
        return {str(k): val for k, val in v.items()} if isinstance(v, dict) else v  # YAML reads 93310247 as a number


def stages_from_pipelines(doc: Any, where: str = "pipelines response") -> dict[str, str]:
    """Each stage id of a CRM pipelines API response as won, lost or open (a closed stage's probability says which)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise ConfigError(f"{where}: not a pipelines API response (no results list)")
    out: dict[str, str] = {}
    for pipe in doc["results"]:
        for st in (pipe or {}).get("stages") or []:
            meta = st.get("metadata") or {}
            sid = str(st.get("id") or "")
            if not sid:
                raise ConfigError(f"{where}: pipeline {pipe.get('id')!r} has a stage without an id")
            if str(meta.get("isClosed", "false")).lower() != "true":
                out[sid] = "open"
                continue
            try:
                probability = float(str(meta.get("probability")))
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: closed stage {sid!r} has no probability to tell won from lost") from None
            if probability not in (0.0, 1.0):
                raise ConfigError(f"{where}: closed stage {sid!r} has probability {probability}: list it under "
                                  "stages as won or lost")
            out[sid] = "won" if probability == 1.0 else "lost"
    return out


def load_config(path: str | Path | None = None) -> StageMap:
    """The stage map: ``path``, else $CONCORD_HUBSPOT_CONFIG, else connectors/config/hubspot.yaml."""
    chosen = Path(path or os.environ.get("CONCORD_HUBSPOT_CONFIG") or DEFAULT_CONFIG)
    cfg = load_model(chosen, StageMap)
    if cfg.pipelines_cache:
        cache = (chosen.parent / cfg.pipelines_cache).resolve()
        try:
            doc = json.loads(cache.read_text())
        except OSError as exc:
            raise ConfigError(f"{chosen}: pipelines_cache {cache}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"{cache}: not JSON: {exc}") from None
        listed = cfg.stages  # the stages written in the file win over the saved answer
        cfg = StageMap.model_validate({"stages": {**stages_from_pipelines(doc, str(cache)), **listed}})
    if not cfg.stages:
        raise ConfigError(f"{chosen}:1: stages: list the deal stages or name a pipelines_cache")
    return cfg


@lru_cache(maxsize=1)
def _default_config() -> StageMap:
    return load_config()


def _stage(value: Any, ctx: c.Context, obj_id: str) -> str:
    """Concord's stage for a HubSpot stage id, by the configured map; an unlisted stage is not guessed."""
    stages = (ctx.settings.get("hubspot") or _default_config()).stages
    v = str(value or "")
    found = stages.get(v) or stages.get(v.lower())
    if found is None:
        raise c.BadInput(f"deal stage {v!r} is not in the stage map (connectors/config/hubspot.yaml): add it as "
                         "won, lost or open", obj_id)
    return {"won": "closed_won", "lost": "closed_lost", "open": "open"}[found]


def _deal_payload(prop: str, value: Any, ctx: c.Context, obj_id: str) -> dict[str, Any] | None:
    """A partial Deal carrying the one property the event changed (``changed_fields`` says which)."""
    if prop == "dealstage":
        return c.deal(_stage(value, ctx, obj_id))
    if value is None or value == "":
        return None  # a cleared property: the change is named, no value to carry
    if prop == "dealname":
        return c.deal("open", name=str(value))
    if prop == "amount":
        return c.deal("open", amount_cents=c.to_cents(value, "amount"))
    if prop == "closedate":
        return c.deal("open", closed_at=c.to_ms(value, "closedate"))
    if prop == "deal_currency_code":
        return c.deal("open", currency=str(value))
    if prop == "billing_status":
        return c.deal("open", billing_status=str(value))
    return None


def _company_payload(prop: str, value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if prop == "name":
        return c.customer(str(value))
    if prop == "billing_account_id":
        return c.customer("", billing_account_id=str(value))
    if prop == "billing_terms":
        return c.customer("", billing_terms=str(value))
    if prop == "billing_email":
        return c.customer("", email=str(value))
    if prop == "billing_policy":
        return c.customer("", billing_policy=str(value))
    if prop == "address":
        return c.customer("", billing_address=str(value))
    return None


def _kind(e: dict[str, Any]) -> tuple[str, str]:
    """(object, action) of a legacy ``deal.propertyChange`` or an ``object.propertyChange`` with objectTypeId."""
    sub_type = str(c.require(e, "subscriptionType"))
    obj, _, action = sub_type.partition(".")
    if obj == "object":
        type_id = str(e.get("objectTypeId") or e.get("fromObjectTypeId") or "")
        obj = OBJECT_TYPE_IDS.get(type_id, f"objectTypeId {type_id or '(none)'}")
    return obj, action


def _association(e: dict[str, Any], key: str, occurred: int, raw: bytes, ctx: c.Context) -> c.Outcome:
    """A deal↔company association: the deal now belongs to that company's customer (or, removed, to none)."""
    kind = str(e.get("associationType") or "")
    type_ids = (OBJECT_TYPE_IDS.get(str(e.get("fromObjectTypeId"))), OBJECT_TYPE_IDS.get(str(e.get("toObjectTypeId"))))
    frm, to = str(c.require(e, "fromObjectId")), str(c.require(e, "toObjectId"))
    if kind == "DEAL_TO_COMPANY" or type_ids == ("deal", "company"):
        deal_id, company_id = frm, to
    elif kind == "COMPANY_TO_DEAL" or type_ids == ("company", "deal"):
        deal_id, company_id = to, frm
    else:
        return c.Outcome(skipped=1)  # contacts, line items, tickets: not a deal's customer
    if e.get("isPrimaryAssociation") is False:
        return c.Outcome(skipped=1)  # a secondary company does not own the deal
    removed = bool(e.get("associationRemoved"))
    if ctx.identity is not None:
        if removed:
            ctx.identity.unlink("hubspot-deal", deal_id, company_id)
        else:
            ctx.identity.link("hubspot-deal", deal_id, company_id)
    customer_id = None if removed else (ctx.identity.resolve("hubspot-company", company_id) if ctx.identity else None) \
        or company_id
    ev = c.change_event(event_id=key, vendor=VENDOR, entity_type="deal", entity_id=deal_id, seq=occurred * 1000,
                        op="update", occurred_at=occurred, payload=None, raw=raw, content_type=CONTENT_TYPE, ctx=ctx,
                        customer_id=customer_id, changed_fields=[])
    c.check(ev)
    return c.Outcome(events=[c.Mapped(ev, key)])


def _merge(e: dict[str, Any], entity: str, key: str, occurred: int, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Merged records: the survivor is updated, each merged-away id is deleted and remapped to it."""
    survivor = str(e.get("newObjectId") or e.get("primaryObjectId") or c.require(e, "objectId"))
    merged = [str(m) for m in e.get("mergedObjectIds") or [] if str(m) != survivor]
    out = c.Outcome()
    if entity == "customer" and ctx.identity is not None:
        for m in merged:
            ctx.identity.merge("hubspot-company", m, survivor)
    deal_customer = c.resolve_customer(ctx, "hubspot-deal", survivor)[0] if entity == "deal" else None
    for n, (oid, op) in enumerate([(survivor, "update"), *((m, "delete") for m in merged)]):
        cid = oid if entity == "customer" else deal_customer  # a merged-away company's own status is the one deleted
        ev = c.change_event(event_id=f"{key}:{oid}", vendor=VENDOR, entity_type=entity, entity_id=oid,
                            seq=occurred * 1000 + n, op=op, occurred_at=occurred, payload=None, raw=raw,
                            content_type=CONTENT_TYPE, ctx=ctx, customer_id=cid, changed_fields=[])
        c.check(ev)
        out.events.append(c.Mapped(ev, f"{key}:{oid}"))
    return out


def _one(e: dict[str, Any], position: int, raw: bytes, ctx: c.Context) -> c.Outcome:
    out = c.Outcome()
    sub_type = str(c.require(e, "subscriptionType"))
    occurred = c.to_int(c.require(e, "occurredAt"), "occurredAt")
    key = f"hs:{e.get('subscriptionId')}:{c.require(e, 'eventId')}:{occurred}"
    obj, action = _kind(e)
    if action == "associationChange":
        return _association(e, key, occurred, raw, ctx)
    obj_id = str(c.require(e, "objectId"))
    if obj == "contact":
        out.skipped += 1  # contacts are not a Concord entity: counted as skipped, not published
        return out
    entity = OBJECTS.get(obj)
    if entity is None:
        raise c.BadInput(f"subscriptionType {sub_type!r} ({obj}) is not mapped", obj_id)
    if action == "creation":
        out.rereads.append(c.Reread(VENDOR, entity, [obj_id], sub_type,
                                    f"HubSpot {obj} {obj_id} was created; the webhook carries no properties: "
                                    f"re-read it from the CRM objects API", key, raw,
                                    seq=occurred * 1000 + min(position, 999)))
        return out
    if action == "merge":
        return _merge(e, entity, key, occurred, raw, ctx)
    prop, value = e.get("propertyName"), e.get("propertyValue")
    payload = None
    changed: list[str] = []
    if action == "deletion":
        op = "delete"
    elif action == "propertyChange":
        op = "update"
        if not prop:
            raise c.BadInput("propertyChange without propertyName", obj_id)
        if "propertyValue" not in e:  # the change is named, its value is not sent: read the object
            out.rereads.append(c.Reread(VENDOR, entity, [obj_id], sub_type,
                                        f"HubSpot {obj} {obj_id} property {prop} changed; the webhook carries no "
                                        "value: re-read it from the CRM objects API", key, raw,
                                        seq=occurred * 1000 + min(position, 999)))
            return out
        fields = DEAL_PROPERTIES if entity == "deal" else COMPANY_PROPERTIES
        changed = [fields.get(prop, prop)]
        payload = _deal_payload(prop, value, ctx, obj_id) if entity == "deal" else _company_payload(prop, value)
    elif action == "restore":
        op = "update"
    else:
        raise c.BadInput(f"subscriptionType {sub_type!r} is not mapped", obj_id)
    customer_id: str | None
    if entity == "customer":
        customer_id = (ctx.identity.resolve("hubspot-company", obj_id) if ctx.identity else None) or obj_id
        candidates: list[dict[str, Any]] = []
        if ctx.identity is not None and prop == "name" and value:
            ctx.identity.learn_profile(customer_id, name=str(value))
        if ctx.identity is not None and prop == "domain" and value:
            ctx.identity.learn_profile(customer_id, website=str(value))
        if ctx.identity is not None and prop == "billing_account_id" and value:
            ctx.identity.link("billing", str(value), customer_id)
    else:
        customer_id, candidates = c.resolve_customer(ctx, "hubspot-deal", obj_id)
        if customer_id and ctx.identity is not None:  # a company merged away since the association was seen
            customer_id = ctx.identity.resolve("hubspot-company", customer_id) or customer_id
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


def _hubspot_lines(value: Any, obj_id: str) -> list[dict[str, Any]]:
    """The deal's lines from its ``concord_line_items`` property (a JSON array of line items).

    Each item names its fields as HubSpot line items do: ``hs_sku``, ``quantity``, ``price`` (major units), ``name``.
    """
    if value in (None, ""):
        return []
    try:
        items = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        raise c.BadInput(f"deal {obj_id} {LINES_PROPERTY} is not JSON", obj_id) from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise c.BadInput(f"deal {obj_id} {LINES_PROPERTY} is not a JSON array of line items", obj_id)
    return [c.line(c.require(i, "hs_sku", what=f"{LINES_PROPERTY}[].hs_sku"), i.get("quantity", 1),
                   c.to_cents(c.require(i, "price", what=f"{LINES_PROPERTY}[].price"), f"{LINES_PROPERTY}[].price"),
                   i.get("name") or "") for i in items]


def snapshot(entity: str, record: dict[str, Any], seq: int, event_id: str, raw: bytes, ctx: c.Context) -> c.Mapped:
    """A deal or company read from the CRM objects API (``properties``, associated ``companies``) as a snapshot."""
    obj_id = str(c.require(record, "id", what="id"))
    props = record.get("properties") or {}
    if entity == "deal":
        stage = props.get("dealstage")
        if stage in (None, ""):
            raise c.BadInput(f"deal {obj_id} has no dealstage", obj_id)
        payload = c.deal(_stage(stage, ctx, obj_id), props.get("dealname") or "",
                         c.to_cents(props.get("amount"), "amount") if props.get("amount") not in (None, "") else 0,
                         props.get("deal_currency_code") or "USD",
                         _hubspot_lines(props.get(LINES_PROPERTY), obj_id),
                         closed_at=c.to_ms(props.get("closedate"), "closedate"),
                         billing_status=props.get("billing_status") or None)
        companies = [str(x) for x in (record.get("associations") or {}).get("companies") or []]
        customer_id = None
        if companies:
            customer_id = (ctx.identity.resolve("hubspot-company", companies[0]) if ctx.identity else None) \
                or companies[0]
            if ctx.identity is not None:
                ctx.identity.link("hubspot-deal", obj_id, companies[0])
        candidates: list[dict[str, Any]] = []
        if customer_id is None:
            customer_id, candidates = c.resolve_customer(ctx, "hubspot-deal", obj_id)
    else:
        if not props.get("name"):
            raise c.BadInput(f"company {obj_id} has no name", obj_id)
        customer_id = (ctx.identity.resolve("hubspot-company", obj_id) if ctx.identity else None) or obj_id
        payload = c.customer(str(props["name"]), props.get("billing_email") or None,
                             props.get("billing_account_id") or None, props.get("billing_terms") or None,
                             props.get("billing_policy") or None, props.get("address") or None,
                             {"billing": str(props.get("billing_account_id") or "")})
        candidates = []
        if ctx.identity is not None:
            ctx.identity.link("billing", props.get("billing_account_id"), customer_id)
            ctx.identity.learn_profile(customer_id, name=str(props["name"]), website=props.get("domain"))
    ev = c.change_event(event_id=event_id, vendor=VENDOR, entity_type=entity, entity_id=obj_id, seq=seq,
                        op="snapshot", occurred_at=seq // 1000, payload=payload, raw=raw, content_type=CONTENT_TYPE,
                        ctx=ctx, customer_id=customer_id, changed_fields=[])
    c.check(ev)
    return c.Mapped(ev, event_id, candidates)


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
