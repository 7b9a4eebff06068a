"""Events already in canonical shape (JSON / JSON lines) → validated canonical events.

Each object must have the change_event.avsc fields; ``ingested_at`` (now), ``trace_id`` (derived from
the event id), ``changed_fields`` and ``source_payload`` (the original bytes) are filled in when absent.
Every event is checked by encoding it with the Avro schema and by the workers' contract check.
"""

from __future__ import annotations

import base64
from typing import Any

from concord.contracts.codec import Codec
from connectors.inbound import common as c

VENDOR = "canonical"
CONTENT_TYPE = "application/json; format=concord-change-event"
_CODEC = Codec()
REQUIRED = ("event_id", "source_system", "entity_type", "entity_id", "seq", "op", "occurred_at")


def map_record(record: Any, raw: bytes, ctx: c.Context) -> c.Outcome:
    """Validate one canonical event."""
    if not isinstance(record, dict):
        raise c.BadInput("a canonical change event must be a JSON object")
    missing = [f for f in REQUIRED if record.get(f) is None]
    if missing:
        raise c.BadInput(f"missing required field {', '.join(missing)}", str(record.get("event_id") or ""))
    ev = dict(record)
    ev.setdefault("source_vendor", "generic")
    ev.setdefault("customer_id", None)
    ev.setdefault("seq_contiguous", False)
    ev.setdefault("ingested_at", ctx.clock())
    ev.setdefault("trace_id", c.trace_id_for(str(ev["event_id"])))
    ev.setdefault("changed_fields", [])
    ev.setdefault("payload", None)
    ev.setdefault("caused_by_command_id", None)
    if isinstance(ev.get("source_payload"), str):
        ev["source_payload"] = base64.b64decode(ev["source_payload"])
    ev.setdefault("source_payload", raw)
    ev.setdefault("source_content_type", CONTENT_TYPE)
    for f in ("occurred_at", "ingested_at"):
        ev[f] = c.to_ms(ev[f], f)
    try:
        _, ev = _CODEC.decode(_CODEC.encode("change_event", ev))
    except Exception as exc:
        raise c.BadInput(f"does not fit schemas/change_event.avsc: {type(exc).__name__}: {exc}",
                         str(ev["event_id"])) from exc
    c.check(ev)
    return c.Outcome(events=[c.Mapped(ev, f"canonical:{ev['event_id']}")])
