"""The processing core, free of faust: decode, validate, guard, decide; records in, records out.

The faust agents in concord/runtime/worker.py only move records between topics and tables and call these
methods, so the same topology runs in tests and benchmarks without a broker.

Every stage has a named error policy (``ErrorPolicy``, declared beside it): a record the stage cannot use
becomes a dead letter with its original bytes and the stage's table is left as it was, so nothing a stage
is given can make it raise; infrastructure errors (broker, registry, store) propagate, so the worker
crashes without committing and the record is processed again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.contracts.deadletter import (
    DEFAULT_MAX_RECORD_BYTES,
    SRC_OFFSET,
    SRC_PARTITION,
    SRC_TOPIC,
    DeadLetter,
    Origin,
    dead_letter,
)
from concord.contracts.validate import validate_action, validate_change, validate_control, validate_exception
from concord.domain import guard
from concord.domain.ids import command_id, stable_id
from concord.domain.routing import sla_ran_out
from concord.domain.status import clone, last_seq
from concord.exceptions import (
    ConcordError,
    DecodeError,
    EncodeError,
    RuleError,
    TooLarge,
    ValidationError,
)
from concord.runtime import metrics

__all__ = ["SRC_OFFSET", "SRC_PARTITION", "SRC_TOPIC", "ErrorPolicy", "Out", "Pipeline", "Record"]


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

    @property
    def origin(self) -> Origin:
        """Where this record came from."""
        return Origin(self.topic, self.partition, self.offset, self.key, self.value)


@dataclass(frozen=True)
class Out:
    """One record to produce."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    dead_letter: DeadLetter | None = field(default=None, compare=False)  # set on a record a stage could not use


# Errors a record causes by itself: processing it again raises them again, so it is dead-lettered, not retried.
# Each belongs to the step named in the dead letter's ``stage``; processing bugs that one record triggers
# (KeyError and kin) count as that record's data error, or it would stop its partition for good.
_STEPS: tuple[tuple[type[Exception], str], ...] = (
    (DecodeError, "decode"), (ValidationError, "validate"), (RuleError, "process"), (EncodeError, "process"),
    (KeyError, "process"), (TypeError, "process"), (ValueError, "process"), (AttributeError, "process"),
    (IndexError, "process"), (ArithmeticError, "process"),
)


@dataclass(frozen=True)
class ErrorPolicy:
    """A stage's named error policy: the topics it reads and the errors that make a record a dead letter."""

    stage: str  # the worker agent the stage runs in
    reads: tuple[str, ...]
    data_errors: tuple[type[Exception], ...] = tuple(t for t, _ in _STEPS)

    def step(self, exc: Exception) -> str:
        """The step a data error belongs to: decode, validate or process."""
        return next(step for kind, step in _STEPS if isinstance(exc, kind))


# One policy per stage, for every topic a worker reads (a test holds this to Deployment.worker_inputs); an
# internal topic is named by its base name, which each deployment prefixes with its app id.
ORDER_CHANGES = ErrorPolicy("order_changes", tuple(t.name for t in topics.CHANGES))
CONTROL_GUARDS = ErrorPolicy("control_guards", (topics.GUARD_CONTROLS.name,))
DECIDE_CHANGES = ErrorPolicy("decide_changes", (topics.ACCEPTED.name,))
ACT_ON_EXCEPTIONS = ErrorPolicy("act_on_exceptions", (topics.EXCEPTION_ACTIONS.name,))
TRACK_EXCEPTIONS = ErrorPolicy("track_exceptions", tuple(t.name for t in topics.EXCEPTIONS))
POLICIES: tuple[ErrorPolicy, ...] = (ORDER_CHANGES, CONTROL_GUARDS, DECIDE_CHANGES, ACT_ON_EXCEPTIONS, TRACK_EXCEPTIONS)


class _Staged:
    """A table as one record's processing sees it: writes are kept back until the record succeeded."""

    __slots__ = ("table", "writes")

    def __init__(self, table: MutableMapping[bytes, Any]) -> None:
        self.table = table
        self.writes: dict[bytes, Any] = {}

    def get(self, key: bytes, default: Any = None) -> Any:
        if key in self.writes:
            return self.writes[key]
        return self.table.get(key, default)

    def __getitem__(self, key: bytes) -> Any:
        return self.get(key)

    def __setitem__(self, key: bytes, value: Any) -> None:
        self.writes[key] = value

    def commit(self) -> None:
        for key, value in self.writes.items():
            self.table[key] = value


def _rule(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with any error of its own (not Concord's) raised as RuleError naming the rule."""
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except ConcordError:
            raise
        except Exception as exc:  # rules are pure: whatever they raise, they raise again for this record
            raise RuleError(f"rule {name} raised {type(exc).__name__}: {exc}") from exc
    return call


def customer_key(event: dict[str, Any]) -> bytes:
    """The status-table key of an event: its customer, or the entity itself while the customer is unknown."""
    cid = event["customer_id"]
    return (cid if cid else f"unknown:{event['entity_type']}:{event['entity_id']}").encode()


def content_digest(event: dict[str, Any]) -> str:
    """A digest of what an event says (op and payload), blind to its ids and timestamps."""
    body = json.dumps([event["op"], event["payload"]], sort_keys=True, default=str).encode()
    return hashlib.blake2b(body, digest_size=12).hexdigest()


_FORWARDED_MAX = 4096  # decoded events kept for the decide stage (see Pipeline._forwarded)


class Pipeline:
    """Decode + validate + guard (stage one, per entity) and flow rules (stage two, per customer)."""

    def __init__(self, codec: Codec, names: topics.Deployment, decide: Callable[[Any, dict[str, Any], int], Any],
                 route: Callable[[dict[str, Any], int], dict[str, Any]], gap_wait_ms: int = 300_000,
                 clock: Callable[[], int] = now_ms, parks: Callable[[str], bool] = lambda reason: False,
                 act: Callable[[Any, dict[str, Any], int], Any] | None = None,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.codec = codec
        self.names = names  # the deployment's internal topics
        self._decide = _rule("decide", decide)  # (status, event, now_ms) -> Outcome(status, commands, exceptions)
        self._route = _rule("route", route)  # (exception draft, now_ms) -> full exception record with owner and SLA
        self.gap_wait_ms = gap_wait_ms
        self.clock = clock
        self._parks = _rule("parks", parks)  # reason code -> whether later events of the entity wait behind it
        # (status, owner action, now_ms) -> Outcome; raises ValidationError for a bad patch
        self._act = _rule("act", act) if act is not None else None
        self.max_record_bytes = max_record_bytes  # a larger input could not be forwarded: it is dead-lettered
        self.gapped: dict[int, set[bytes]] = {}  # partition -> guard keys with parked events
        # value -> the change event the guard decoded from it and forwarded on accepted.changes, so that the
        # decide stage, when it runs in this process, does not decode the same bytes again (each taken once)
        self._forwarded: dict[bytes, dict[str, Any]] = {}

    def _apply(self, policy: ErrorPolicy, rec: Record, table: MutableMapping[bytes, Any],
               step: Callable[[Record, MutableMapping[bytes, Any]], list[Out]]) -> list[Out]:
        """Run ``step`` on one record under ``policy``: its outputs, or its dead letter and the table untouched."""
        if rec.value is not None and len(rec.value) > self.max_record_bytes:
            exc = TooLarge(f"record is {len(rec.value)} bytes, over the {self.max_record_bytes}-byte limit")
            return self.dead_letter(rec, "decode", exc, policy)
        staged: Any = _Staged(table)  # a mapping to the stage, whatever the table behind it
        try:
            outs = step(rec, staged)
        except policy.data_errors as exc:
            return self.dead_letter(rec, policy.step(exc), exc, policy)
        staged.commit()
        return outs

    # ---- stage one: per entity -------------------------------------------------------------
    def guard(self, rec: Record, cursors: MutableMapping[bytes, Any]) -> list[Out]:
        """Decode, validate and order one changes record (or obey a guard.controls one); return what to produce."""
        if rec.topic == self.names.guard_controls:
            return self.control(rec, cursors)
        return self._apply(ORDER_CHANGES, rec, cursors, self._guard)

    def _guard(self, rec: Record, cursors: MutableMapping[bytes, Any]) -> list[Out]:
        _, event = self.codec.decode_topic(rec.topic, rec.value)
        validate_change(event, rec.topic)
        gkey = guard.guard_key(event["source_system"], event["entity_type"], event["entity_id"]).encode()
        ref = [rec.topic, rec.partition, rec.offset, rec.value.hex() if rec.value else "", customer_key(event).decode()]
        incoming = guard.Incoming(event["seq"], event["event_id"], content_digest(event), event["seq_contiguous"],
                                  event["op"] == "snapshot", ref)
        before = cursors.get(gkey) or {}
        cursor, verdict = guard.admit(before or None, incoming, self.clock())
        cursor["p"] = rec.partition
        cursors[gkey] = cursor
        gapped = self.gapped.setdefault(rec.partition, set())
        (gapped.add if cursor["parked"] else gapped.discard)(gkey)
        if verdict.kind == guard.APPLY:
            outs = [self._accepted(r) for r in verdict.release]
            if len(self._forwarded) >= _FORWARDED_MAX:  # the decide stage runs elsewhere: forget the oldest
                del self._forwarded[next(iter(self._forwarded))]
            self._forwarded[rec.value] = event
            if before.get("gap_exception") and not cursor.get("gap_exception"):  # the gap filled itself
                outs += self._gap_filled(before, event, rec)
            return outs
        metrics.ORDERING_CONFLICTS.labels("gap" if verdict.kind == guard.PARK else verdict.kind).inc()
        outcome = "parked" if verdict.kind == guard.PARK else verdict.kind
        metrics.EVENTS.labels(rec.topic, outcome).inc()
        return [self.decision(rec.topic, rec.partition, rec.offset, event, outcome, verdict.reason)]

    def control(self, rec: Record, cursors: MutableMapping[bytes, Any]) -> list[Out]:
        """Obey one guard.controls record: a timer tick, or an owner releasing an entity's parked events."""
        return self._apply(CONTROL_GUARDS, rec, cursors, self._control)

    def _control(self, rec: Record, cursors: MutableMapping[bytes, Any]) -> list[Out]:
        _, control = self.codec.decode_topic(rec.topic, rec.value)
        validate_control(control)
        if control["action"] == "tick":
            return self.tick(rec.partition, cursors)
        return self.release(control["guard_key"].encode(), cursors)

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
                "exception_id": stable_id("sequence_gap", gkey.decode(), str(first["seq"])),
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
            cursors[gkey] = {**cursor, "gap_exception": draft["exception_id"], "gap_exception_at": now}
        return outs

    def _gap_filled(self, before: dict[str, Any], event: dict[str, Any], rec: Record) -> list[Out]:
        """The sequence_gap exception of a gap the late event filled: resolved without anyone's help."""
        gone = {"exception_id": before["gap_exception"], "reason_code": "sequence_gap", "trace_id": event["trace_id"],
                "source_system": event["source_system"], "entity_type": event["entity_type"],
                "entity_id": event["entity_id"], "customer_id": event["customer_id"],
                "opened_at": before.get("gap_exception_at") or self.clock(),
                "message": f"resolved: seq {event['seq']} arrived and the parked events were applied in order"}
        return self._resolved_outs(gone, self.clock(), (rec.topic, rec.partition, rec.offset, rec.key, rec.value))

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
        return Out(self.names.accepted, ckey.encode(), bytes.fromhex(value_hex), headers)

    # ---- stage two: per customer -----------------------------------------------------------
    def decide(self, rec: Record, statuses: MutableMapping[bytes, Any]) -> list[Out]:
        """Apply one accepted event to its customer's status and emit commands, exceptions and audit."""
        if rec.topic == self.names.exception_actions:
            return self.act(rec, statuses)
        return self._apply(DECIDE_CHANGES, rec, statuses, self._decide_one)

    def _decide_one(self, rec: Record, statuses: MutableMapping[bytes, Any]) -> list[Out]:
        src = _source(rec)
        event = self._forwarded.pop(rec.value, None) if rec.topic == self.names.accepted and rec.value else None
        if event is None:
            _, event = self.codec.decode_topic(rec.topic, rec.value)
        validate_change(event, src[0])
        key = rec.key or customer_key(event)
        status = statuses.get(key)
        ref = f"{event['entity_type']}:{event['entity_id']}"
        blocker = self._blocker(status, event["entity_type"], event["entity_id"])
        if blocker and event["seq"] <= last_seq(status, event["entity_type"], event["entity_id"]):
            blocker = None  # delivered again after a restart: it was decided before the exception, decide it so again
        if blocker:  # a later event never overtakes the one an owner is fixing
            queue = (status.get("parked") or {}).get(ref, [])
            if list(src) not in [entry[:3] for entry in queue]:  # not when a restart delivers a parked one again
                status = clone(status)
                status.setdefault("parked", {}).setdefault(ref, []).append([*src, rec.value.hex()])
                statuses[key] = status
                metrics.EVENTS.labels(src[0], "parked").inc()
            return [self.decision(*src, event, "parked", f"behind open exception {blocker}")]
        outcome = self._decide(status, event, self.clock())
        statuses[key] = outcome.status
        return self._emit(outcome, event, src, rec.value) + self._release_unblocked(key, statuses)

    def _blocker(self, status: Any, entity_type: str, entity_id: str) -> str | None:
        """The open exception the entity's later events must wait behind, if any."""
        if not isinstance(status, dict):
            return None
        for eid, entry in sorted(status.get("exceptions", {}).items()):
            if entry["entity_type"] == entity_type and entry["entity_id"] == entity_id and self._parks(
                    entry["reason_code"]):
                return eid
        return None

    def _release_unblocked(self, key: bytes, statuses: MutableMapping[bytes, Any]) -> list[Out]:
        """Replay, in arrival order, the parked events of entities no longer behind an exception."""
        outs: list[Out] = []
        status = statuses.get(key)
        while isinstance(status, dict):
            ready = [ref for ref, queue in sorted(status.get("parked", {}).items())
                     if queue and not self._blocker(status, *ref.split(":", 1))]
            if not ready:
                break
            status = clone(status)
            topic, part, offset, value_hex = status["parked"][ready[0]].pop(0)
            if not status["parked"][ready[0]]:
                del status["parked"][ready[0]]
            statuses[key] = status
            value = bytes.fromhex(value_hex)
            _, event = self.codec.decode(value)
            outcome = self._decide(status, event, self.clock())
            statuses[key] = status = outcome.status
            outs += self._emit(outcome, event, (topic, part, offset), value, released=True)
        return outs

    def _emit(self, outcome: Any, event: dict[str, Any], src: tuple[str, int, int], value: bytes,
              actor: str | None = None, patch: dict[str, str] | None = None, released: bool = False,
              result: str | None = None) -> list[Out]:
        """The records one decision produces: commands, exceptions opened/updated/resolved, and its audit."""
        src_topic, src_part, src_offset = src
        now = self.clock()
        outs: list[Out] = []
        command_ids = []
        for cmd in outcome.commands:
            outs.append(Out(topics.commands_topic(cmd["target_system"]), cmd["entity_id"].encode(),
                            self.codec.encode("command", cmd)))
            command_ids.append(cmd["command_id"])
            metrics.COMMANDS.labels(cmd["target_system"], cmd["type"]).inc()
            if cmd.get("source_occurred_at") and actor is None:
                metrics.E2E_LATENCY.observe(max(0.0, (now - cmd["source_occurred_at"]) / 1000))
        exception_ids = []
        original = (src_topic, src_part, src_offset, event["entity_id"].encode(), value)
        open_now = outcome.status.get("exceptions", {}) if isinstance(outcome.status, dict) else {}
        for gone in getattr(outcome, "resolved", ()):
            outs += self._resolved_outs(gone, now, _original(gone, original), actor, patch)
        for draft in outcome.exceptions:
            record = self._route(draft, now)
            outs += self._exception_outs(draft, now, original, routed=record)
            exception_ids.append(draft["exception_id"])
            if draft["exception_id"] in open_now:  # the event to replay, and who may fix it
                open_now[draft["exception_id"]].update(
                    original=[src_topic, src_part, src_offset, value.hex()], owner=record["owner"],
                    backup=record["backup_owner"], trace_id=draft["trace_id"], message=draft["message"])
        for draft in getattr(outcome, "updated", ()):
            outs += self._exception_outs(draft, now, _original(open_now.get(draft["exception_id"]), original),
                                         opened=False)
            if draft["exception_id"] in open_now:
                open_now[draft["exception_id"]]["message"] = draft["message"]
        on_time = getattr(outcome, "facts", {}).get("invoice_on_time")
        if on_time is not None:
            metrics.INVOICES.labels("true" if on_time else "false").inc()
        result = result or ("stale" if getattr(outcome, "facts", {}).get("stale") else
                            "exception" if exception_ids else "applied")
        if actor is None:
            metrics.EVENTS.labels(src_topic, result).inc()
        reason = "; ".join(d["reason_code"] for d in outcome.exceptions) or result
        if released:
            reason = f"released from park: {reason}"
        outs.append(self.decision(src_topic, src_part, src_offset, event, result, reason, command_ids, exception_ids,
                                  actor))
        return outs

    # ---- owners' actions on exceptions ---------------------------------------------------------
    def act(self, rec: Record, statuses: MutableMapping[bytes, Any]) -> list[Out]:
        """Acknowledge, resolve (patch and replay) or discard an exception, in order with the customer's events."""
        return self._apply(ACT_ON_EXCEPTIONS, rec, statuses, self._act_one)

    def _act_one(self, rec: Record, statuses: MutableMapping[bytes, Any]) -> list[Out]:
        _, action = self.codec.decode_topic(rec.topic, rec.value)
        validate_action(action, rec.key)
        key = action["customer_key"].encode()
        status = statuses.get(key)
        entry = (status or {}).get("exceptions", {}).get(action["exception_id"]) if isinstance(status, dict) else None
        now = self.clock()
        coords = (rec.topic, rec.partition, rec.offset)
        event = {"trace_id": (entry or {}).get("trace_id") or action["action_id"], "event_id": action["action_id"],
                 "source_system": None, "entity_type": (entry or {}).get("entity_type"),
                 "entity_id": (entry or {}).get("entity_id"), "customer_id": (status or {}).get("customer_id"),
                 "occurred_at": now, "caused_by_command_id": None}
        if entry is None or self._act is None:
            return [self.decision(*coords, event, "ignored", f"{action['action']} {action['exception_id']}: "
                                  "not open (already resolved or discarded)", actor=action["by"])]
        try:
            outcome = self._act(status, action, now)
        except ValidationError as exc:
            metrics.REPLAYS.labels("failed").inc()
            return [self.decision(*coords, event, "rejected", f"{action['action']}: {exc}", actor=action["by"])]
        statuses[key] = outcome.status
        outs: list[Out] = []
        if action["action"] == "acknowledge":
            outs += self._state_outs(entry, action["exception_id"], "acknowledged", now, action)
        elif action["action"] == "discard":
            outs += self._state_outs(entry, action["exception_id"], "discarded", now, action)
            metrics.RESOLUTIONS.labels(entry.get("owner", "?")).inc()
        else:
            metrics.REPLAYS.labels("succeeded").inc()
            metrics.RESOLUTIONS.labels(entry.get("owner", "?")).inc()
        done = {"acknowledge": "acknowledged", "discard": "discarded", "resolve": "resolved"}[action["action"]]
        outs += self._emit(outcome, event, coords, rec.value, actor=action["by"], patch=action["patch"], result=done)
        return outs + self._release_unblocked(key, statuses)

    def _state_outs(self, entry: dict[str, Any], eid: str, state: str, now: int, action: dict[str, Any]) -> list[Out]:
        draft = {**entry, "exception_id": eid, "message": entry.get("message") or state,
                 "trace_id": entry.get("trace_id") or ""}
        record = self._route(draft, now)
        record.update(state=state, opened_at=entry["opened_at"], updated_at=now,
                      resolution={"by": action["by"], "at": now, "patch": action["patch"], "note": action["note"]})
        _, _, _, key, value = _original(entry, ("", 0, 0, None, b""))
        if entry.get("original"):
            record["original"] = {"topic": entry["original"][0], "partition": entry["original"][1],
                                  "offset": entry["original"][2], "key": key, "value": value}
        return [Out(self.names.exceptions(record["owner"]), eid.encode(), self.codec.encode("exception", record))]

    def _exception_outs(self, draft: dict[str, Any], now: int, original: tuple, opened: bool = True,
                        routed: dict[str, Any] | None = None) -> list[Out]:
        record = routed if routed is not None else self._route(draft, now)
        topic, part, offset, key, value = original
        record["original"] = {"topic": topic, "partition": part, "offset": offset, "key": key, "value": value}
        if opened:  # an update of an open exception republishes it without counting it again
            metrics.EXCEPTIONS_OPENED.labels(record["owner"], record["reason_code"]).inc()
        return [Out(self.names.exceptions(record["owner"]), record["exception_id"].encode(),
                    self.codec.encode("exception", record))]

    def _resolved_outs(self, gone: dict[str, Any], now: int, original: tuple, actor: str | None = None,
                       patch: dict[str, str] | None = None) -> list[Out]:
        """An exception the data no longer warrants: publish it resolved on its owner's queue, count MTTR."""
        record = self._route(gone, now)
        note = f"replayed with {actor}'s fix" if actor else gone["message"]
        record.update(state="resolved", opened_at=gone["opened_at"], updated_at=now,
                      resolution={"by": actor or "concord", "at": now, "patch": patch or {}, "note": note})
        topic, part, offset, key, value = original
        record["original"] = {"topic": topic, "partition": part, "offset": offset, "key": key, "value": value}
        labels = (record["owner"], record["reason_code"])
        metrics.EXCEPTIONS_RESOLVED.labels(*labels).inc()
        metrics.RESOLUTION_SECONDS.labels(*labels).observe(max(0.0, (now - gone["opened_at"]) / 1000))
        return [Out(self.names.exceptions(record["owner"]), record["exception_id"].encode(),
                    self.codec.encode("exception", record))]

    def escalation(self, rec: dict[str, Any], now: int) -> tuple[list[Out], list[Out]]:
        """An exception whose SLA ran out: (its billing hold if it blocks billing, its record for the backup owner).

        Apart, because the hold must be acknowledged before the record is sent: a release the tracker sends
        for it then always comes after it.
        """
        backup = rec.get("backup_owner") or rec["owner"]
        record = {**rec, "state": "escalated", "owner": backup, "backup_owner": rec["owner"], "updated_at": now,
                  "message": f"SLA of {rec['owner']} ran out; escalated to {backup}: {rec['message']}"}
        metrics.SLA_BREACHES.labels(rec["owner"], rec["reason_code"]).inc()
        metrics.EXCEPTIONS_ESCALATED.labels(rec["owner"], rec["reason_code"]).inc()
        holds = [self.billing_hold(rec, now, hold=True)] if rec.get("blocks_billing") else []
        return holds, [Out(self.names.exceptions(backup), rec["exception_id"].encode(),
                           self.codec.encode("exception", record))]

    def billing_hold(self, rec: dict[str, Any], now: int, hold: bool) -> Out:
        """A command telling billing to hold (or release) an entity while its exception is overdue."""
        ctype = "hold_billing" if hold else "release_billing_hold"
        cmd = {"command_id": command_id(ctype, rec["exception_id"]), "type": ctype, "target_system": "billing",
               "customer_id": rec.get("customer_id"), "entity_type": rec["entity_type"], "entity_id": rec["entity_id"],
               "payload": json.dumps({"exception_id": rec["exception_id"], "reason_code": rec["reason_code"],
                                      "hold": hold}, sort_keys=True),
               "caused_by": [rec["exception_id"]], "trace_id": rec["trace_id"], "issued_at": now,
               "source_occurred_at": None}
        metrics.COMMANDS.labels("billing", ctype).inc()
        return Out(topics.commands_topic("billing"), rec["entity_id"].encode(), self.codec.encode("command", cmd))

    def closing(self, record: dict[str, Any], now: int, actor: str) -> list[Out]:
        """An owner closed an exception outside the status table (a sequence gap released or discarded)."""
        labels = (record["owner"], record["reason_code"])
        metrics.RESOLUTIONS.labels(record["owner"]).inc()
        if record["state"] == "resolved":
            metrics.EXCEPTIONS_RESOLVED.labels(*labels).inc()
            metrics.RESOLUTION_SECONDS.labels(*labels).observe(max(0.0, (now - record["opened_at"]) / 1000))
        return [Out(self.names.exceptions(record["owner"]), record["exception_id"].encode(),
                    self.codec.encode("exception", record))]

    # ---- exception tracking -------------------------------------------------------------------
    def track(self, rec: Record, records: MutableMapping[bytes, Any]) -> list[Out]:
        """Keep an exception's latest state in ``records`` (exception_to_record); release a hold when it closes."""
        return self._apply(TRACK_EXCEPTIONS, rec, records, self._track)

    def _track(self, rec: Record, records: MutableMapping[bytes, Any]) -> list[Out]:
        from concord.owners.desk import newer, stale_escalation, table_record  # desk builds on this module

        _, exc = self.codec.decode_topic(rec.topic, rec.value)
        validate_exception(exc, rec.key)
        key = exc["exception_id"].encode()
        old = records.get(key)
        if not newer(old, exc):
            if stale_escalation(old, exc) and exc["blocks_billing"]:  # its hold went out after the close
                return [self.billing_hold(exc, self.clock(), hold=False)]
            return []
        records[key] = table_record(exc, old)  # old: the history the inbox shows
        if old and old["state"] == "escalated" and exc["state"] in ("resolved", "discarded") and exc["blocks_billing"]:
            return [self.billing_hold(exc, self.clock(), hold=False)]
        return []

    # ---- records about records ---------------------------------------------------------------
    def dead_letter(self, rec: Record, stage: str, exc: Exception, policy: ErrorPolicy | None = None) -> list[Out]:
        """A dead-letter record with the original bytes (or their prefix, size and sha256), and its audit decision."""
        dl = dead_letter(rec.origin, stage, type(exc).__name__, str(exc), self.clock(), self.max_record_bytes,
                         policy.stage if policy else "")
        metrics.DEADLETTERS.labels(rec.topic, stage).inc()
        metrics.EVENTS.labels(rec.topic, "dead_lettered").inc()
        return [Out(dl.topic, dl.key or b"", self.codec.encode("dead_letter", dl.record()), tuple(dl.headers()), dl),
                self.decision(rec.topic, rec.partition, rec.offset, None, "dead_lettered", f"{stage}: {dl.error}")]

    def unkept(self, rec: Record, key: bytes, size: int) -> list[Out]:
        """The dead letter of a record whose table write would be ``size`` bytes: more than one record can hold."""
        exc = TooLarge(f"applying it would make table key {key.decode(errors='replace')!r} {size} bytes, over the "
                       f"{self.max_record_bytes}-byte limit of one changelog record; nothing of it was applied")
        return self.dead_letter(rec, "process", exc, self.policy_of(rec.topic))

    def policy_of(self, topic: str) -> ErrorPolicy | None:
        """The error policy of the stage that reads ``topic`` (None for outcomes.commands, the closed loop's own)."""
        name = self.names.base(topic) or topic
        return next((p for p in POLICIES if name in p.reads), None)

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


class Escalations:
    """The SLA check over an exception table: what is due, each escalated once until it is seen back on a queue.

    The worker's timer and the in-process harness both run it; ``sent`` lives in memory only, because an escalation
    not yet tracked when a worker dies is due again in the table its successor recovers.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.sent: set[bytes] = set()

    def due(self, records: Mapping[bytes, Any], keys: Iterable[bytes], now: int) -> list[tuple[list[Out], list[Out]]]:
        """The escalations due at ``now`` among ``keys``: per exception, its billing hold and its escalated record.

        Send the hold and have it acknowledged first, so that a release the tracker sends for it comes after it.
        """
        from concord.owners.desk import wire_record  # desk builds on this module

        due = []
        for key in keys:
            rec = records.get(key)
            if rec and key not in self.sent and sla_ran_out(rec, now):
                self.sent.add(key)
                due.append(self.pipeline.escalation(wire_record(rec), now))
        return due

    def tracked(self, key: bytes | None, record: dict[str, Any] | None) -> None:
        """The tracker holds ``record`` under ``key``: once it is escalated or closed, a later escalation is a new one.

        Closed counts too: an escalation the tracker dropped because the owner closed it first never shows, and the
        next opening under the same id must still be escalated when its SLA runs out.
        """
        if key is not None and record is not None and record.get("state") not in ("open", "acknowledged"):
            self.sent.discard(key)

    def clear(self) -> None:
        """Partitions moved: what is still due is found again in the tables."""
        self.sent.clear()


def _source(rec: Record) -> tuple[str, int, int]:
    """The changes record an accepted one was forwarded from, as its headers say."""
    try:
        return (rec.headers.get(SRC_TOPIC, rec.topic.encode()).decode(),
                int(rec.headers.get(SRC_PARTITION, str(rec.partition).encode())),
                int(rec.headers.get(SRC_OFFSET, str(rec.offset).encode())))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise ValidationError(f"source headers of an accepted record do not parse: {exc}") from exc


def _original(entry: dict[str, Any] | None, default: tuple) -> tuple:
    """The (topic, partition, offset, key, value) an open exception was raised on, else ``default``."""
    if not entry or not entry.get("original"):
        return default
    topic, part, offset, value_hex = entry["original"]
    return (topic, part, offset, entry.get("entity_id", "").encode() or None, bytes.fromhex(value_hex))


