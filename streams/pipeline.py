"""The processing core, free of faust: decode, validate, guard, decide; records in, records out.

The faust agents in streams/worker.py only move records between topics and tables and call these
methods, so the same topology runs in tests and benchmarks without a broker.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from streams import guard, metrics, topics
from streams.exceptions import DecodeError, ValidationError
from streams.serde import Codec
from streams.validate import validate_change

SRC_TOPIC, SRC_PARTITION, SRC_OFFSET = "concord-src-topic", "concord-src-partition", "concord-src-offset"


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Record:
    """One consumed record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Out:
    """One record to produce."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def customer_key(event: dict[str, Any]) -> bytes:
    """The status-table key of an event: its customer, or the entity itself while the customer is unknown."""
    cid = event["customer_id"]
    return (cid if cid else f"unknown:{event['entity_type']}:{event['entity_id']}").encode()


def content_digest(event: dict[str, Any]) -> str:
    """A digest of what an event says (op and payload), blind to its ids and timestamps."""
    body = json.dumps([event["op"], event["payload"]], sort_keys=True, default=str).encode()
    return hashlib.blake2b(body, digest_size=12).hexdigest()


class Pipeline:
    """Decode + validate + guard (stage one, per entity) and flow rules (stage two, per customer)."""

    def __init__(self, codec: Codec, decide: Callable[[Any, dict[str, Any], int], Any],
                 route: Callable[[dict[str, Any], int], dict[str, Any]], gap_wait_ms: int = 300_000,
                 clock: Callable[[], int] = now_ms) -> None:
        self.codec = codec
        self._decide = decide  # (status, event, now_ms) -> Outcome(status, commands, exceptions[, facts])
        self._route = route  # (exception draft, now_ms) -> full exception record with owner and SLA
        self.gap_wait_ms = gap_wait_ms
        self.clock = clock
        self.gapped: dict[int, set[bytes]] = {}  # partition -> guard keys with parked events

    # ---- stage one: per entity -------------------------------------------------------------
    def guard(self, rec: Record, cursors: MutableMapping[bytes, Any]) -> list[Out]:
        """Decode, validate and order one changes record; return what to produce."""
        try:
            _, event = self.codec.decode(rec.value)
            validate_change(event, rec.topic)
        except (DecodeError, ValidationError) as exc:
            stage = "decode" if isinstance(exc, DecodeError) else "validate"
            return self.dead_letter(rec, stage, exc)
        gkey = guard.guard_key(event["source_system"], event["entity_type"], event["entity_id"]).encode()
        ref = [rec.topic, rec.partition, rec.offset, rec.value.hex() if rec.value else "", customer_key(event).decode()]
        incoming = guard.Incoming(event["seq"], event["event_id"], content_digest(event), event["seq_contiguous"],
                                  event["op"] == "snapshot", ref)
        cursor, verdict = guard.admit(cursors.get(gkey), incoming, self.clock())
        cursor["p"] = rec.partition
        cursors[gkey] = cursor
        gapped = self.gapped.setdefault(rec.partition, set())
        (gapped.add if cursor["parked"] else gapped.discard)(gkey)
        if verdict.kind == guard.APPLY:
            return [self._accepted(r) for r in verdict.release]
        metrics.ORDERING_CONFLICTS.labels("gap" if verdict.kind == guard.PARK else verdict.kind).inc()
        outcome = "parked" if verdict.kind == guard.PARK else verdict.kind
        metrics.EVENTS.labels(rec.topic, outcome).inc()
        return [self.decision(rec.topic, rec.partition, rec.offset, event, outcome, verdict.reason)]

    def tick(self, partition: int, cursors: MutableMapping[bytes, Any]) -> list[Out]:
        """Raise a sequence_gap exception for every gap on ``partition`` that waited too long."""
        outs: list[Out] = []
        now = self.clock()
        for gkey in sorted(self.gapped.get(partition, ())):
            cursor = cursors.get(gkey)
            if not cursor or not guard.gap_overdue(cursor, now, self.gap_wait_ms):
                continue
            system, entity_type, entity_id = gkey.decode().split(":", 2)
            first = cursor["parked"][0]
            draft = {
                "exception_id": _stable_id("sequence_gap", gkey.decode(), str(first["seq"])),
                "reason_code": "sequence_gap", "trace_id": first["event_id"], "source_system": system,
                "entity_type": entity_type, "entity_id": entity_id,
                "customer_id": None if first["ref"][4].startswith("unknown:") else first["ref"][4],
                "message": f"{system} {entity_type} {entity_id}: waiting since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(cursor['gap_since'] / 1000))} UTC "
                           f"for seq {guard.missing_seqs(cursor)}; {len(cursor['parked'])} later event(s) parked",
                "suggestions": [{"field": "action", "value": "release_gap", "score": 0.5,
                                 "label": "release the parked events without the missing ones"}],
                "caused_by": first["event_id"],
            }
            topic, part, offset, value_hex, _ = first["ref"]
            outs += self._exception_outs(draft, now, (topic, part, offset, None, bytes.fromhex(value_hex)))
            cursors[gkey] = {**cursor, "gap_exception": draft["exception_id"]}
        return outs

    def release(self, gkey: bytes, cursors: MutableMapping[bytes, Any]) -> list[Out]:
        """Apply an entity's parked events in order without the missing ones (an owner's instruction)."""
        cursor = cursors.get(gkey)
        if not cursor or not cursor["parked"]:
            return []
        cursor, refs = guard.release_parked(cursor)
        cursors[gkey] = cursor
        self.gapped.get(cursor.get("p", -1), set()).discard(gkey)
        return [self._accepted(r) for r in refs]

    def _accepted(self, ref: list[Any]) -> Out:
        topic, partition, offset, value_hex, ckey = ref
        headers = ((SRC_TOPIC, topic.encode()), (SRC_PARTITION, str(partition).encode()),
                   (SRC_OFFSET, str(offset).encode()))
        return Out(topics.ACCEPTED.name, ckey.encode(), bytes.fromhex(value_hex), headers)

    # ---- stage two: per customer -----------------------------------------------------------
    def decide(self, rec: Record, statuses: MutableMapping[bytes, Any]) -> list[Out]:
        """Apply one accepted event to its customer's status and emit commands, exceptions and audit."""
        src_topic = rec.headers.get(SRC_TOPIC, rec.topic.encode()).decode()
        src_part = int(rec.headers.get(SRC_PARTITION, str(rec.partition).encode()))
        src_offset = int(rec.headers.get(SRC_OFFSET, str(rec.offset).encode()))
        _, event = self.codec.decode(rec.value)
        key = rec.key or customer_key(event)
        now = self.clock()
        outcome = self._decide(statuses.get(key), event, now)
        statuses[key] = outcome.status
        outs: list[Out] = []
        command_ids = []
        for cmd in outcome.commands:
            outs.append(Out(topics.commands_topic(cmd["target_system"]), cmd["entity_id"].encode(),
                            self.codec.encode("command", cmd)))
            command_ids.append(cmd["command_id"])
            metrics.COMMANDS.labels(cmd["target_system"], cmd["type"]).inc()
            if cmd.get("source_occurred_at"):
                metrics.E2E_LATENCY.observe(max(0.0, (now - cmd["source_occurred_at"]) / 1000))
        exception_ids = []
        original = (src_topic, src_part, src_offset, event["entity_id"].encode(), rec.value)
        open_now = outcome.status.get("exceptions", {}) if isinstance(outcome.status, dict) else {}
        for draft in outcome.exceptions:
            outs += self._exception_outs(draft, now, original)
            exception_ids.append(draft["exception_id"])
            if draft["exception_id"] in open_now:  # the event to replay when the owner fixes the data
                open_now[draft["exception_id"]]["original"] = [src_topic, src_part, src_offset, rec.value.hex()]
        for draft in getattr(outcome, "updated", ()):
            outs += self._exception_outs(draft, now, _original(open_now.get(draft["exception_id"]), original),
                                         opened=False)
        for gone in getattr(outcome, "resolved", ()):
            outs += self._resolved_outs(gone, now, _original(gone, original))
        on_time = getattr(outcome, "facts", {}).get("invoice_on_time")
        if on_time is not None:
            metrics.INVOICES.labels("true" if on_time else "false").inc()
        result = "stale" if getattr(outcome, "facts", {}).get("stale") else "exception" if exception_ids else "applied"
        metrics.EVENTS.labels(src_topic, result).inc()
        outs.append(self.decision(src_topic, src_part, src_offset, event, result,
                                  "; ".join(d["reason_code"] for d in outcome.exceptions) or "applied",
                                  command_ids, exception_ids))
        return outs

    def _exception_outs(self, draft: dict[str, Any], now: int, original: tuple, opened: bool = True) -> list[Out]:
        record = self._route(draft, now)
        topic, part, offset, key, value = original
        record["original"] = {"topic": topic, "partition": part, "offset": offset, "key": key, "value": value}
        if opened:  # an update of an open exception republishes it without counting it again
            metrics.EXCEPTIONS_OPENED.labels(record["owner"], record["reason_code"]).inc()
            metrics.EXCEPTIONS_OPEN.labels(record["owner"], record["reason_code"]).inc()
        return [Out(topics.exceptions_topic(record["owner"]), record["exception_id"].encode(),
                    self.codec.encode("exception", record))]

    def _resolved_outs(self, gone: dict[str, Any], now: int, original: tuple) -> list[Out]:
        """An exception the data no longer warrants: publish it resolved on its owner's queue, count MTTR."""
        record = self._route(gone, now)
        record.update(state="resolved", opened_at=gone["opened_at"], updated_at=now,
                      resolution={"by": "concord", "at": now, "patch": {}, "note": gone["message"]})
        topic, part, offset, key, value = original
        record["original"] = {"topic": topic, "partition": part, "offset": offset, "key": key, "value": value}
        labels = (record["owner"], record["reason_code"])
        metrics.EXCEPTIONS_RESOLVED.labels(*labels).inc()
        metrics.EXCEPTIONS_OPEN.labels(*labels).dec()
        metrics.RESOLUTION_SECONDS.labels(*labels).observe(max(0.0, (now - gone["opened_at"]) / 1000))
        return [Out(topics.exceptions_topic(record["owner"]), record["exception_id"].encode(),
                    self.codec.encode("exception", record))]

    # ---- records about records ---------------------------------------------------------------
    def dead_letter(self, rec: Record, stage: str, exc: Exception) -> list[Out]:
        """A dead-letter record with the original bytes, and the audit decision saying so."""
        now = self.clock()
        error_type = type(exc).__name__
        dl = {"original_topic": rec.topic, "original_partition": rec.partition, "original_offset": rec.offset,
              "original_key": rec.key, "original_value": rec.value, "stage": stage, "error_type": error_type,
              "error": str(exc), "failed_at": now}
        headers = (("concord-stage", stage.encode()), ("concord-error", str(exc).encode()[:1000]),
                   ("concord-error-type", error_type.encode()), (SRC_TOPIC, rec.topic.encode()),
                   (SRC_PARTITION, str(rec.partition).encode()), (SRC_OFFSET, str(rec.offset).encode()))
        metrics.DEADLETTERS.labels(rec.topic, stage).inc()
        metrics.EVENTS.labels(rec.topic, "dead_lettered").inc()
        return [Out(topics.deadletter_topic(rec.topic), rec.key or b"", self.codec.encode("dead_letter", dl), headers),
                self.decision(rec.topic, rec.partition, rec.offset, None, "dead_lettered", f"{stage}: {exc}")]

    def decision(self, topic: str, partition: int, offset: int, event: dict[str, Any] | None, outcome: str,
                 reason: str, command_ids: list[str] | None = None, exception_ids: list[str] | None = None,
                 actor: str | None = None) -> Out:
        """The audit.decisions record of what was decided about one input."""
        ev = event or {}
        rec = {
            "decision_id": f"{topic}/{partition}/{offset}/{outcome}", "trace_id": ev.get("trace_id"),
            "event_id": ev.get("event_id"), "topic": topic, "partition": partition, "offset": offset,
            "source_system": ev.get("source_system"), "entity_type": ev.get("entity_type"),
            "entity_id": ev.get("entity_id"), "customer_id": ev.get("customer_id"), "outcome": outcome,
            "reason": reason, "command_ids": command_ids or [], "exception_ids": exception_ids or [],
            "actor": actor, "decided_at": self.clock(),
        }
        return Out(topics.AUDIT.name, (ev.get("trace_id") or "").encode(), self.codec.encode("decision", rec))


def _original(entry: dict[str, Any] | None, default: tuple) -> tuple:
    """The (topic, partition, offset, key, value) an open exception was raised on, else ``default``."""
    if not entry or not entry.get("original"):
        return default
    topic, part, offset, value_hex = entry["original"]
    return (topic, part, offset, entry.get("entity_id", "").encode() or None, bytes.fromhex(value_hex))


def _stable_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
