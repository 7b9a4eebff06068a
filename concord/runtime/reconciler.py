"""The closed loop at run time: adapters' outcomes, confirmations, and the timer of the time-driven rules.

Beside the pipeline's decide stage (the same partitions, the same ``customer_to_status`` table):
- ``outcomes.commands`` records (keyed by customer) are recorded in the customer's command lifecycle;
- after every event a customer is scheduled for a check ``delay`` later, and after each check for its next
  deadline (concord/domain/timed_rules.py ``next_due``); the schedule is a deadline index kept in the table
  itself (per partition, ``SHARDS`` rings of minute slots by a hash of the customer key, and a directory of
  each ring's slots with their earliest entry), so recovery restores it and a tick reads only the slots that
  hold something due;
- a tick (a ``control`` record with action ``reconcile`` on ``outcomes.commands``, one per partition) checks
  at most ``budget`` due customers, earliest first; the rest stay due and the next tick resumes with them.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, MutableMapping
from typing import Any

from concord.contracts import topics
from concord.domain import confirm, timed_rules
from concord.domain.flow_config import FlowConfig
from concord.exceptions import DecodeError
from concord.runtime import metrics
from concord.runtime.pipeline import Out, Pipeline, Record

log = logging.getLogger("concord.reconciler")

BUCKET_MS = 60_000
RING = 4096  # slots of BUCKET_MS: a ring never has more buckets than this
# A bucket holds the customers of its shard due in its minute, and one table value is one changelog record: in
# one unsharded ring, about 30,000 customers changed within a minute on one partition (some 30 bytes an entry,
# 900 KB a record; 120,000 on four partitions, a bulk load at a worker's full rate) made a bucket too large.
SHARDS = 16
TICK = "reconcile"


def slot_of(at: int) -> int:
    """The ring slot of a deadline."""
    return (at // BUCKET_MS) % RING


def shard_of(ckey: str) -> int:
    """The ring a customer's deadlines are kept in (the same in every process)."""
    return zlib.crc32(ckey.encode()) % SHARDS


def directory_key(partition: int, shard: int | None) -> bytes:
    """The table key listing one ring's non-empty buckets with their earliest deadline.

    ``None``: the one ring of an index written before it was sharded; its entries are read and taken out
    as before, and it empties as its customers are checked or move.
    """
    return (f"\x00deadlines:{partition}" + ("" if shard is None else f":d{shard}")).encode()


def bucket_key(partition: int, bucket: int, shard: int | None) -> bytes:
    """The table key of one deadline bucket: customer key -> when it is due (``shard`` None: the unsharded ring)."""
    return (f"\x00deadlines:{partition}:{bucket}" + ("" if shard is None else f":{shard}")).encode()


def overdue_key(partition: int, shard: int | None) -> bytes:
    """The table key of one shard's overdue cents by customer, for the finance gauge (None: unsharded)."""
    return (f"\x00deadlines:{partition}:overdue" + ("" if shard is None else f":{shard}")).encode()


def is_index_key(key: bytes) -> bool:
    """Whether a table key belongs to the deadline index rather than a customer."""
    return key.startswith(b"\x00deadlines:")


def _writable(idx: MutableMapping[bytes, Any], key: bytes) -> dict[str, Any]:
    """Index entry ``key`` to change and write back: the copy already written since ``idx`` began, or a new copy.

    A bucket holds every customer due in its minute, and copying it for each event cost as much as the rest of
    the decision at 2,000 customers; a worker's batch view (``owns``) copies it once per batch instead, and what
    the table holds is never changed in place, so a batch or record given up leaves it as it was.
    """
    value = idx.get(key)
    owns = getattr(idx, "owns", None)
    if value is not None and owns is not None and owns(key):
        return value
    return dict(value or {})


def _take_out(idx: MutableMapping[bytes, Any], partition: int, slot: int, shard: int | None, ckey: str,
              directory: dict[str, Any]) -> bool:
    """Take ``ckey`` out of its bucket (and the bucket out of ``directory`` once empty); False if it was not there."""
    key = bucket_key(partition, slot, shard)
    held = idx.get(key)
    if not held or ckey not in held:
        return False
    bucket = _writable(idx, key)
    del bucket[ckey]
    idx[key] = bucket
    if not bucket:
        directory.pop(str(slot), None)
    return True


class OwnedIndex(dict):
    """A deadline index that is its own only copy (the in-process harness): entries are changed in place."""

    def owns(self, key: bytes) -> bool:
        return key in self


class Reconciler:
    """Outcome records, ticks and the deadline index, around ``pipeline.decide``."""

    def __init__(self, pipeline: Pipeline, cfg: FlowConfig, budget: int = 500, delay_ms: int = 30_000,
                 index: MutableMapping[bytes, Any] | None = None, fits: Callable[[Any], bool] | None = None) -> None:
        self.pipeline = pipeline
        self.index = index  # None: the index lives in the status table itself (the worker, for its changelog)
        # whether a status still fits the table (one changelog record, in the worker); see tick
        self.fits: Callable[[Any], bool] = fits or (lambda status: True)
        self.cfg = cfg
        self.budget = budget
        self.delay_ms = delay_ms

    def tick_record(self, now: int) -> bytes:
        """The value of one tick (sent by the timer to every assigned partition of outcomes.commands)."""
        return self.pipeline.codec.encode("control", {"action": TICK, "guard_key": None, "actor": None, "at": now})

    # ---- the decide stage, with the loop around it ----------------------------------------------
    def step(self, rec: Record, statuses: MutableMapping[bytes, Any]) -> list[Out]:
        """One record of the decide stage: an outcome or tick here, anything else through the pipeline."""
        if rec.topic == topics.COMMAND_OUTCOMES.name:
            return self._loop_record(rec, statuses)
        key = rec.key
        before = statuses.get(key) if key else None
        outs = self.pipeline.decide(rec, statuses)
        after = statuses.get(key) if key else None
        if not isinstance(after, dict) or after is before:
            return outs
        outs += self._confirmed(rec, before, after)
        now = self.pipeline.clock()
        # an open time-driven exception may be answered by this very change: look at once, not after the delay
        self._schedule(rec.partition, key, after, now if timed_rules.open_timed(after) else now + self.delay_ms,
                       statuses)
        return outs

    def _loop_record(self, rec: Record, statuses: MutableMapping[bytes, Any]) -> list[Out]:
        try:
            name, value = self.pipeline.codec.decode(rec.value)
        except DecodeError as exc:
            return self.pipeline.dead_letter(rec, "decode", exc)
        if name == "control" and value["action"] == TICK:
            return self.tick(rec, statuses)
        if name != "command_outcome":
            return self.pipeline.dead_letter(rec, "validate", DecodeError(f"a {name} record on {rec.topic}"))
        metrics.COMMAND_OUTCOMES.labels(value["target_system"], value["type"], value["outcome"]).inc()
        key = rec.key or b""
        status = statuses.get(key)
        if not isinstance(status, dict) or value["command_id"] not in status.get("commands", {}):
            return []  # a type not followed to confirmation, or a customer this table never issued it for
        st = dict(status, commands=dict(status["commands"]))
        confirm.record_outcome(st, value)
        statuses[key] = st
        # what the adapter said is part of an open command_unconfirmed's message: look again soon
        self._schedule(rec.partition, key, st, self.pipeline.clock(), statuses)
        return []

    def _confirmed(self, rec: Record, before: Any, after: dict[str, Any]) -> list[Out]:
        """An audit decision naming the commands the event just confirmed (the end of their chain)."""
        was = (before or {}).get("commands", {}) if isinstance(before, dict) else {}
        done = [cid for cid, e in sorted(after.get("commands", {}).items())
                if e["state"] == confirm.CONFIRMED and (was.get(cid) or {}).get("state") != confirm.CONFIRMED]
        if not done:
            return []
        now = self.pipeline.clock()
        for cid in done:
            entry = after["commands"][cid]
            metrics.COMMANDS_CONFIRMED.labels(entry["target"], entry["type"]).inc()
            metrics.CONFIRMATION_SECONDS.labels(entry["type"]).observe(max(0.0, (now - entry["issued_at"]) / 1000))
        first = after["commands"][done[0]]
        event = {"trace_id": first["trace_id"], "customer_id": after.get("customer_id"),
                 "entity_type": first["entity_type"], "entity_id": first["entity_id"]}
        how = "; ".join(f"{cid}: {after['commands'][cid]['confirmed_by']}" for cid in done)
        return [self.pipeline.decision(rec.topic, rec.partition, rec.offset, event, "confirmed", how,
                                       command_ids=done)]

    # ---- the deadline index -----------------------------------------------------------------------
    def _schedule(self, partition: int, key: bytes, status: dict[str, Any], at: int | None,
                  statuses: MutableMapping[bytes, Any], store: bool = True) -> None:
        """Put customer ``key`` in the index at ``at`` (None: take it out), moving it from where it was."""
        old = status.get("next_check")
        if old == at:
            return
        ckey = key.decode()
        idx = statuses if self.index is None else self.index
        shard = shard_of(ckey)
        directory = _writable(idx, directory_key(partition, shard))
        if old is not None:
            slot = slot_of(old)
            if not _take_out(idx, partition, slot, shard, ckey, directory):
                legacy = directory_key(partition, None)
                if str(slot) in (idx.get(legacy) or {}):  # scheduled before the index was sharded
                    unsharded = _writable(idx, legacy)
                    _take_out(idx, partition, slot, None, ckey, unsharded)
                    idx[legacy] = unsharded
        if at is not None:
            slot = slot_of(at)
            bucket = _writable(idx, bucket_key(partition, slot, shard))
            bucket[ckey] = at
            idx[bucket_key(partition, slot, shard)] = bucket
            # the slot's earliest entry: it may only be too early (removals do not raise it), never too late
            directory[str(slot)] = min(at, directory.get(str(slot), at))
        idx[directory_key(partition, shard)] = directory
        status["next_check"] = at
        if store:
            statuses[key] = status

    def due(self, partition: int, statuses: MutableMapping[bytes, Any], now: int) -> list[tuple[int, str]]:
        """Up to ``budget`` customers of ``partition`` due at ``now``, earliest first."""
        idx = statuses if self.index is None else self.index
        slots = sorted((earliest, int(slot), -1 if shard is None else shard)
                       for shard in (None, *range(SHARDS))
                       for slot, earliest in (idx.get(directory_key(partition, shard)) or {}).items()
                       if earliest <= now)
        out: list[tuple[int, str]] = []
        for _, slot, shard in slots:
            if len(out) >= self.budget:
                break
            bucket = idx.get(bucket_key(partition, slot, None if shard < 0 else shard)) or {}
            out += sorted((at, ck) for ck, at in bucket.items() if at <= now)
        return sorted(out)[: self.budget]

    def tick(self, rec: Record, statuses: MutableMapping[bytes, Any]) -> list[Out]:
        """Run the time-driven rules for the customers due on this partition (bounded by ``budget``)."""
        now = self.pipeline.clock()
        outs: list[Out] = []
        opened: list[str] = []
        checked = 0
        for at, ckey in self.due(rec.partition, statuses, now):
            key = ckey.encode()
            status = statuses.get(key)
            if not isinstance(status, dict):  # no such customer (any more): only its index entry goes
                self._schedule(rec.partition, key, {"next_check": at}, None, statuses, store=False)
                continue
            outcome = timed_rules.check(status, self.cfg, now)
            checked += 1
            if not self.fits(outcome.status):
                # The check would make the status too large to keep: it is not applied, and the customer is not
                # looked at again by the timer (its own records are dead letters until the limit is raised), or
                # it would be the first due on every tick and make each one a dead letter.
                log.error("%s: time-driven check not applied: the status would be over the record limit; "
                          "the timer no longer checks this customer", ckey)
                metrics.STATUSES_TOO_LARGE.inc()
                self._schedule(rec.partition, key, dict(status), None, statuses)
                continue
            event = {"event_id": f"check:{ckey}:{now}", "trace_id": f"check:{ckey}",
                     "source_system": None, "entity_type": "customer", "entity_id": ckey,
                     "customer_id": status.get("customer_id"), "occurred_at": now, "caused_by_command_id": None}
            if outcome.exceptions or outcome.resolved or outcome.updated:
                emitted = self.pipeline._emit(outcome, event, (rec.topic, rec.partition, rec.offset), rec.value)  # noqa: SLF001
                outs += [o for o in emitted if o.topic != topics.AUDIT.name]  # one decision per tick, below
                opened += [d["exception_id"] for d in outcome.exceptions]
            statuses[key] = outcome.status
            self._schedule(rec.partition, key, outcome.status, outcome.facts.get("next_due"), statuses)
            self._overdue(rec.partition, ckey, outcome.status, statuses)
        metrics.RECONCILE_CHECKS.inc(checked)
        if not checked:
            return outs
        return outs + [self.pipeline.decision(rec.topic, rec.partition, rec.offset, None, "reconciled",
                                              f"time-driven rules checked {checked} customer(s)",
                                              exception_ids=opened)]

    def _overdue(self, partition: int, ckey: str, status: dict[str, Any],
                 statuses: MutableMapping[bytes, Any]) -> None:
        """Keep the partition's overdue cents per customer beside the index, for the finance gauge."""
        idx = statuses if self.index is None else self.index
        key = overdue_key(partition, shard_of(ckey))
        cents = sum((status.get("overdue") or {}).values())
        legacy = overdue_key(partition, None)
        if ckey in (idx.get(legacy) or {}):  # kept before the index was sharded: it moves to its shard
            unsharded = _writable(idx, legacy)
            del unsharded[ckey]
            idx[legacy] = unsharded
        elif (idx.get(key) or {}).get(ckey, 0) == cents:
            return
        updated = _writable(idx, key)
        updated.pop(ckey, None)
        if cents:
            updated[ckey] = cents
        idx[key] = updated

    def overdue_cents(self, partitions: list[int], statuses: Any) -> int:
        """Cents past due, unpaid, over the customers of ``partitions``."""
        idx = statuses if self.index is None else self.index
        return sum(sum((idx.get(overdue_key(p, shard)) or {}).values())
                   for p in partitions for shard in (None, *range(SHARDS)))


def measure_money(records: Any) -> None:
    """Set the revenue-at-risk and unbilled-work gauges from the exception records held here."""
    at_risk: dict[tuple[str, str, str], int] = {}
    unbilled: dict[str, int] = {}
    for rec in records:
        if not rec or rec.get("state") not in ("open", "acknowledged", "escalated"):
            continue
        cents = rec.get("amount_at_risk_cents") or 0
        currency = rec.get("currency") or "unknown"
        labels = (rec["owner"], rec["reason_code"], currency)
        at_risk[labels] = at_risk.get(labels, 0) + cents
        # every currency money is at risk in has an unbilled figure, zero until work goes unbilled
        unbilled[currency] = unbilled.get(currency, 0) + (cents if rec["reason_code"] == "unbilled_work" else 0)
    for labels in list(_SEEN_AT_RISK - set(at_risk)):
        metrics.REVENUE_AT_RISK.labels(*labels).set(0)
    for labels, cents in at_risk.items():
        metrics.REVENUE_AT_RISK.labels(*labels).set(cents)
    _SEEN_AT_RISK.update(at_risk)
    for currency in list(_SEEN_UNBILLED - set(unbilled)):
        metrics.UNBILLED_WORK.labels(currency).set(0)
    for currency, cents in unbilled.items():
        metrics.UNBILLED_WORK.labels(currency).set(cents)
    _SEEN_UNBILLED.update(unbilled)


_SEEN_AT_RISK: set[tuple[str, str, str]] = set()
_SEEN_UNBILLED: set[str] = set()


def reconciler_for(settings: Any, pipeline: Pipeline) -> Reconciler:
    """The reconciler a worker runs: the repository's flow configuration, the settings' budget and delay."""
    from concord.domain.flow_config import load_flow_config
    from concord.runtime.faust_shims import changelog_value

    return Reconciler(pipeline, load_flow_config(), settings.reconcile_budget, int(settings.reconcile_delay_s * 1000),
                      fits=lambda status: len(changelog_value(status)) <= pipeline.max_record_bytes)


async def tick_partitions(app: Any, reconciler: Reconciler, outcomes: Any, exception_records: Any,
                          statuses: Any) -> None:
    """Send a tick to every assigned partition of outcomes.commands; set the money gauges from what is held here."""
    now = reconciler.pipeline.clock()
    assigned = sorted({tp.partition for tp in app.consumer.assignment()
                       if tp.topic == topics.COMMAND_OUTCOMES.name})
    value = reconciler.tick_record(now)
    for p in assigned:
        await outcomes.send(key=b"", value=value, partition=p)
    measure_money(list(exception_records.values()))
    metrics.OVERDUE_INVOICES.set(reconciler.overdue_cents(assigned, statuses))
