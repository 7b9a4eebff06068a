"""Contract checks on decoded records, beyond what Avro decoding already enforces."""

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


_CONTROL_ACTIONS = ("tick", "release_gap")
_OWNER_ACTIONS = ("acknowledge", "resolve", "discard")
_EXCEPTION_STATES = ("open", "acknowledged", "resolved", "escalated", "discarded")


def validate_control(control: dict[str, Any]) -> None:
    """Raise ValidationError unless ``control`` is a tick or a release of a named entity's parked events."""
    if control["action"] not in _CONTROL_ACTIONS:
        raise ValidationError(f"control action {control['action']!r} is not one of {list(_CONTROL_ACTIONS)}")
    if control["action"] == "release_gap" and not control["guard_key"]:
        raise ValidationError("release_gap names no guard_key")


def validate_action(action: dict[str, Any], key: bytes | None) -> None:
    """Raise ValidationError unless ``action`` is an owner's action keyed by the status key it applies to."""
    if action["action"] not in _OWNER_ACTIONS:
        raise ValidationError(f"action {action['action']!r} is not one of {list(_OWNER_ACTIONS)}")
    for name in ("action_id", "exception_id", "customer_key", "by"):
        if not action[name]:
            raise ValidationError(f"{name} is empty")
    if key != action["customer_key"].encode():  # another key may land on a partition that lacks the status
        raise ValidationError(f"keyed {key!r}, not by its customer_key {action['customer_key']!r}")


def validate_exception(record: dict[str, Any], key: bytes | None) -> None:
    """Raise ValidationError unless ``record`` is an exception in a known state keyed by its exception_id."""
    if not record["exception_id"]:
        raise ValidationError("exception_id is empty")
    if key != record["exception_id"].encode():
        raise ValidationError(f"keyed {key!r}, not by its exception_id {record['exception_id']!r}")
    if record["state"] not in _EXCEPTION_STATES:
        raise ValidationError(f"state {record['state']!r} is not one of {list(_EXCEPTION_STATES)}")
