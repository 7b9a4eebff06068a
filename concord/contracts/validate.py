"""Contract checks on a decoded change event, beyond what Avro decoding already enforces."""

from __future__ import annotations

from typing import Any

from concord.contracts.topics import SOURCE_OF
from concord.exceptions import ValidationError

# The payload record each entity type carries, told apart by a field only that record has.
_PAYLOAD_MARK = {"customer": "billing_account_id", "deal": "stage", "job": "scheduled_for",
                 "invoice": "amount_due_cents", "payment": "attempt"}
_STATES = {
    "deal": ("stage", {"open", "closed_won", "closed_lost"}),
    "job": ("status", {"scheduled", "dispatched", "completed", "cancelled"}),
    "invoice": ("status", {"draft", "open", "paid", "void", "uncollectible"}),
    "payment": ("status", {"succeeded", "failed", "refunded"}),
}


def validate_change(event: dict[str, Any], topic: str) -> None:
    """Raise ValidationError naming the first field that breaks the contract for ``topic``."""
    entity = event["entity_type"]
    if entity not in SOURCE_OF:
        raise ValidationError(f"entity_type {entity!r} is not one of {sorted(SOURCE_OF)}")
    expected_topic = f"changes.{SOURCE_OF[entity]}.{entity}"
    if topic != expected_topic or event["source_system"] != SOURCE_OF[entity]:
        raise ValidationError(
            f"a {event['source_system']} {entity} event does not belong on {topic} (expected {expected_topic})")
    for name in ("event_id", "entity_id", "trace_id"):
        if not event[name]:
            raise ValidationError(f"{name} is empty")
    if event["seq"] < 0:
        raise ValidationError(f"seq {event['seq']} is negative")
    payload = event["payload"]
    if payload is None:
        if event["op"] in ("create", "snapshot"):
            raise ValidationError(f"op {event['op']} needs a {entity} payload")
        return
    if _PAYLOAD_MARK[entity] not in payload:
        raise ValidationError(f"payload is not a {entity} record")
    if entity in _STATES:
        field, allowed = _STATES[entity]
        if payload[field] not in allowed:
            raise ValidationError(f"{entity}.{field} {payload[field]!r} is not one of {sorted(allowed)}")
    for line in payload.get("lines", ()):
        if line["quantity"] <= 0 or line["unit_price_cents"] < 0:
            raise ValidationError(f"line {line['sku']!r} has quantity {line['quantity']} and unit price "
                                  f"{line['unit_price_cents']}")
