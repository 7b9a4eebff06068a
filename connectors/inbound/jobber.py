"""Jobber (field service) webhooks → canonical job events.

Jobber posts ``{"data": {"webHookEvent": {"topic", "appId", "accountId", "itemId", "occurredAt"}}}``;
the flat form ``{"topic", "accountId", "itemId", "occurredAt", "data": {...}}`` is accepted too. Jobber's
own webhooks carry ids only; a relay that fetched the job (GraphQL ``job { id jobStatus client { id name
emails { address } } startAt completedAt lineItems { nodes { name quantity unitPrice } } }``) can put
it under ``data.job`` (or ``webHookEvent.job``), and then the event carries the full record.

- JOB_CREATE / JOB_UPDATE with job data → create / update; without data → ``Reread`` (fetch the job).
- JOB_COMPLETE → status completed (the record itself when given, else a status-only payload).
- JOB_DESTROY → delete. VISIT_COMPLETE → an update of the visit's job (``data.job`` needed, its
  ``itemId`` is the visit's), else ``Reread``.
- ``seq`` = ``occurredAt`` (Jobber's schema spells it ``occuredAt``; both are read) in ms; not contiguous.
  Dedupe key: topic, itemId, occurredAt.
- Signature: base64(HMAC-SHA256(app secret, raw body)) in ``X-Jobber-Hmac-SHA256``.
- The job's client id is its account reference; the identity map resolves it to a customer. The custom
  fields naming the CRM account and deal are configuration (connectors/config/join_keys.yaml, ``jobber``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from connectors.inbound import common as c
from connectors.inbound import join_keys

VENDOR = "jobber"
CONTENT_TYPE = "application/json; format=jobber-webhook"
TOPICS = {"JOB_CREATE", "JOB_UPDATE", "JOB_COMPLETE", "JOB_DESTROY", "VISIT_COMPLETE"}
STATUS = {"requires_invoicing": "completed", "archived": "completed", "completed": "completed",
          "active": "dispatched", "today": "dispatched", "in_progress": "dispatched",
          "upcoming": "scheduled", "unscheduled": "scheduled", "late": "scheduled", "action_required": "scheduled",
          "on_hold": "scheduled", "scheduled": "scheduled", "cancelled": "cancelled", "canceled": "cancelled"}


class SignatureError(Exception):
    """The X-Jobber-Hmac-SHA256 header is missing or wrong."""


def sign(secret: str, body: bytes) -> str:
    """The X-Jobber-Hmac-SHA256 value for ``body``."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def verify(secret: str | None, body: bytes, signature: str | None) -> None:
    """Raise SignatureError unless ``signature`` is the body's HMAC with ``secret``."""
    if not secret:
        raise SignatureError("JOBBER_WEBHOOK_SECRET is not set")
    if not signature:
        raise SignatureError("missing X-Jobber-Hmac-SHA256")
    if not hmac.compare_digest(sign(secret, body), signature.strip()):
        raise SignatureError("X-Jobber-Hmac-SHA256 does not match")


def custom_fields(j: dict[str, Any]) -> dict[str, Any]:
    """A job's custom fields by label: GraphQL's list (``[{label, valueText | value…}]``) or a relay's object."""
    fields = j.get("customFields") or {}
    if isinstance(fields, dict):
        return fields
    if not isinstance(fields, list):
        raise c.BadInput("customFields is neither a list of custom fields nor an object", str(j.get("id") or ""))
    out: dict[str, Any] = {}
    for f in fields:
        if isinstance(f, dict) and f.get("label"):
            out[str(f["label"])] = next((f[k] for k in ("valueText", "valueNumeric", "valueTrueFalse", "value")
                                         if k in f), None)
    return out


def _job_payload(j: dict[str, Any], status: str | None, keys: join_keys.JobberKeys) -> dict[str, Any]:
    native = str(j.get("jobStatus") or j.get("status") or "").lower()
    custom = custom_fields(j)
    if str(custom.get(keys.cancelled) or "").lower() in ("true", "yes", "1"):
        native = "cancelled"  # Jobber has no cancelled status: a closed job carries it in a custom field
    st = status or STATUS.get(native)
    if st is None:
        raise c.BadInput(f"job status {native!r} is not mapped", str(j.get("id") or ""))
    nodes = (j.get("lineItems") or {}).get("nodes", []) if isinstance(j.get("lineItems"), dict) \
        else j.get("lineItems") or []
    lines = [c.line(n.get("name") or n.get("sku") or "item", n.get("quantity", 1),
                    c.to_cents(n.get("unitPrice"), "unitPrice"), n.get("description") or "") for n in nodes]
    client = j.get("client") or {}
    deal = j.get("dealId") or custom.get(keys.deal_id)
    return c.job(st, deal, c.to_ms(j.get("startAt")), c.to_ms(j.get("completedAt")),
                 client.get("id") or j.get("clientId"), lines)


def map_record(record: Any, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Map one Jobber webhook body."""
    if not isinstance(record, dict):
        raise c.BadInput("a Jobber webhook body must be a JSON object")
    hook = ((record.get("data") or {}).get("webHookEvent")) if isinstance(record.get("data"), dict) else None
    extra = record.get("data") if hook is None else hook
    hook = hook or record
    topic = str(c.require(hook, "topic")).upper()
    item = str(c.require(hook, "itemId"))
    # Jobber's own GraphQL schema spells the field occuredAt; both spellings are read
    field_name = "occuredAt" if hook.get("occurredAt") is None and hook.get("occuredAt") is not None else "occurredAt"
    occurred = c.to_ms(c.require(hook, field_name, what="occurredAt (or occuredAt)"), field_name)
    if occurred is None:
        raise c.BadInput(f"{field_name} is empty", item)
    key = f"jobber:{topic}:{item}:{occurred}"
    if topic not in TOPICS:
        raise c.BadInput(f"topic {topic!r} is not mapped ({sorted(TOPICS)})", item)
    j = (extra or {}).get("job") if isinstance(extra, dict) else None
    if j is None and isinstance(extra, dict) and ("jobStatus" in extra or "status" in extra):
        j = extra
    out = c.Outcome()
    if topic == "VISIT_COMPLETE" and not (j and j.get("id")):
        out.rereads.append(c.Reread(VENDOR, "job", [item], topic, f"visit {item} completed; the webhook does not "
                                    "say which job: re-read the visit's job from Jobber", key, raw))
        return out
    if topic in ("JOB_CREATE", "JOB_UPDATE") and not j:
        out.rereads.append(c.Reread(VENDOR, "job", [item], topic, f"Jobber job {item} changed ({topic}); the "
                                    "webhook carries no job data: re-read it from Jobber's API", key, raw))
        return out
    job_id = str((j or {}).get("id") or item)
    op = {"JOB_CREATE": "create", "JOB_DESTROY": "delete"}.get(topic, "update")
    payload, changed = None, []
    if op != "delete":
        payload = _job_payload(j or {}, "completed" if topic == "JOB_COMPLETE" else None, join_keys.of(ctx).jobber)
        changed = ["status"] if topic in ("JOB_COMPLETE", "VISIT_COMPLETE") else []
    client = (j or {}).get("client") or {}
    emails = client.get("emails") or []
    email = emails[0].get("address") if emails and isinstance(emails[0], dict) else None
    custom = custom_fields(j or {})
    direct = custom.get(join_keys.of(ctx).jobber.customer_id)
    cid, cands = c.resolve_customer(ctx, "dispatch", client.get("id"), {"name": client.get("name"), "email": email},
                                    direct)
    if ctx.identity is not None and direct:
        ctx.identity.link("dispatch", client.get("id"), direct)
    ev = c.change_event(event_id=key, vendor=VENDOR, entity_type="job", entity_id=job_id, seq=occurred, op=op,
                        occurred_at=occurred, payload=payload, raw=raw, content_type=CONTENT_TYPE, ctx=ctx,
                        customer_id=cid, changed_fields=changed,
                        caused_by_command_id=c.command_id_from(custom.get("concord_command_id"), bare_ok=True))
    c.check(ev)
    out.events.append(c.Mapped(ev, key, cands))
    return out


def parse(raw: bytes) -> Any:
    """A webhook body as JSON."""
    return json.loads(raw)
