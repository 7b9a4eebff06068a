"""The command consumer: decode, apply through a Target, retry, reject, commit — at least once.

One confluent-kafka consumer (group ``concord-adapters-<backend>`` unless told otherwise) reads the
``commands.<system>`` topics it is given. For each record:

1. decode it; bytes that are not a command go to ``deadletter.commands.<system>`` with the original
   bytes, topic, partition, offset and error (and are reported on stderr and counted as ``undecodable``);
2. apply it through the target; transient failures (network, 429, 5xx) are retried with capped
   exponential backoff, the same command id as the idempotency key each time;
3. a permanent rejection (4xx, invalid payload) becomes a ``command_rejected`` exception on
   ``exceptions.<owner>`` (routing from concord/config/routing.yaml), its id derived from the command
   id so a redelivered rejection is the same exception, carrying the original record;
4. its outcome (applied, duplicate, rejected, or failed once retries run out; the target's record id;
   when) goes to ``outcomes.commands``, keyed by the customer like the status table, so the worker can
   follow the command to confirmation;
5. only then is the offset committed. A fatal error (bad credentials) or retries exhausted stop the
   consumer without committing, so the command comes back when it restarts.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Any, TextIO

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from concord.contracts.codec import Codec
from concord.contracts.topics import COMMAND_OUTCOMES, Deployment, commands_topic, deadletter_topic
from concord.domain.routing import Routing, load_routing
from concord.domain.rules import stable_id
from concord.exceptions import ConcordError, DecodeError
from concord.runtime.canary import is_canary
from concord.runtime.producer import new_producer
from connectors.outbound.base import Command, FatalError, PermanentError, Result, Target, TransientError
from connectors.outbound.metrics import ADAPTER_APPLY_SECONDS, ADAPTER_COMMANDS


class AdapterError(ConcordError):
    """The adapter stopped without committing the record in hand (it will be delivered again)."""


class GaveUp(AdapterError):
    """Every retry of a transient failure failed; the command is reported failed and not committed."""


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff for transient failures: ``initial`` doubling up to ``maximum``."""

    initial: float = 0.2
    maximum: float = 10.0
    attempts: int = 8

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based); a Retry-After hint wins, capped."""
        base = hint if hint is not None else self.initial * 2 ** (attempt - 1)
        return max(0.0, min(self.maximum, base))


@dataclass
class Origin:
    """Where a record came from (carried into a rejection's ``original``)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class Summary:
    """Outcome counts of one run."""

    counts: Tally = field(default_factory=Tally)

    def line(self) -> str:
        """One human line: every outcome with its count."""
        order = ("applied", "duplicate", "rejected", "retried", "undecodable", "canary")
        return ", ".join(f"{self.counts.get(k, 0)} {k}" for k in order)


class Adapter:
    """Consumes ``commands.<system>`` for ``systems`` and applies them through ``target``.

    A command the target rejects raises its exception on the queue of the deployment ``names``.
    """

    def __init__(self, bootstrap: str, target: Target, systems: list[str], names: Deployment,
                 group: str | None = None,
                 retry: RetryPolicy | None = None, session_timeout_ms: int = 6000, codec: Codec | None = None,
                 routing: Routing | None = None, log: TextIO | None = None, produce_timeout: float = 30.0,
                 report_outcomes: bool = True) -> None:
        self.bootstrap = bootstrap
        self.target = target
        self.topics = [commands_topic(s) for s in systems]
        self.names = names
        self.group = group or f"concord-adapters-{target.name}"
        self.retry = retry or RetryPolicy()
        self.session_timeout_ms = session_timeout_ms
        self.codec = codec or Codec()
        self.routing = routing or load_routing()
        self.log = log or sys.stderr
        self.produce_timeout = produce_timeout
        self.report_outcomes = report_outcomes
        self.summary = Summary()
        self._stop = threading.Event()
        self._producer: Producer | None = None
        self._end: dict[tuple[str, int], int] = {}
        self._pos: dict[tuple[str, int], int] = {}
        self._assigned: set[tuple[str, int]] = set()
        self._had_assignment = False

    # ---- one record -------------------------------------------------------------------------------
    def handle(self, origin: Origin) -> str:
        """Apply one record and return its outcome; AdapterError when it must not be committed."""
        try:
            name, rec = self.codec.decode(origin.value)
            if name != "command":
                raise DecodeError(f"a {name} record, not a command")
        except DecodeError as exc:
            self._dead_letter(origin, exc)
            self._say(f"undecodable record at {origin.topic}[{origin.partition}]@{origin.offset}: {exc}; "
                      f"dead-lettered to {deadletter_topic(origin.topic)}")
            return self._count("unknown", "undecodable")
        if is_canary(rec.get("customer_id")):  # the synthetic flow proves the pipeline; no system should act on it
            return self._count(rec["type"], "canary")
        started = time.monotonic()
        try:
            cmd = Command.from_record(rec)
            result = self._apply(cmd)
        except PermanentError as exc:
            self._reject(rec, origin, str(exc))
            self._report(rec, "rejected", detail=str(exc))
            return self._count(rec["type"], "rejected")
        except GaveUp as exc:
            try:  # say so before the record comes back; the give-up is the error that matters
                self._report(rec, "failed", detail=str(exc))
            except AdapterError as lost:
                self._say(f"could not report the failure of {rec['command_id']}: {lost}")
            raise
        finally:
            ADAPTER_APPLY_SECONDS.labels(self.target.name).observe(time.monotonic() - started)
        self._report(rec, result.outcome, ref=result.ref)
        return self._count(cmd.type, result.outcome)

    def _report(self, rec: dict[str, Any], outcome: str, ref: str = "", detail: str = "") -> None:
        """Publish one command's outcome on outcomes.commands, keyed by its customer (the status key)."""
        if not self.report_outcomes:
            return
        key = rec.get("customer_id") or f"unknown:{rec.get('entity_type')}:{rec.get('entity_id')}"
        out = {"command_id": rec["command_id"], "type": rec["type"], "target_system": rec["target_system"],
               "customer_id": rec.get("customer_id"), "entity_type": rec.get("entity_type") or "",
               "entity_id": rec.get("entity_id") or "", "outcome": outcome, "target_ref": ref or "",
               "detail": detail[:1000], "adapter": self.target.name, "trace_id": rec.get("trace_id") or "",
               "reported_at": int(time.time() * 1000)}
        self._publish(COMMAND_OUTCOMES.name, key.encode(), self.codec.encode("command_outcome", out), (),
                      f"the outcome of {rec['command_id']}")

    def _apply(self, cmd: Command) -> Result:
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.target.apply(cmd)
            except TransientError as exc:
                if attempt >= self.retry.attempts:
                    raise GaveUp(f"{cmd.type} {cmd.command_id}: gave up after {attempt} attempts, "
                                       f"last: {exc}; not committed, it will be delivered again") from None
                self._count(cmd.type, "retried")
                wait = self.retry.delay(attempt, exc.retry_after)
                self._say(f"{cmd.type} {cmd.command_id}: attempt {attempt} failed ({exc}); retrying in {wait:.2f}s")
                if self._stop.wait(wait):
                    raise AdapterError(f"stopped while retrying {cmd.command_id}; not committed") from None
            except FatalError as exc:
                raise AdapterError(f"{self.target.name}: {exc}; {cmd.command_id} not committed") from None

    def _reject(self, rec: dict[str, Any], origin: Origin, said: str) -> None:
        now = int(time.time() * 1000)
        draft = {
            "exception_id": stable_id("command_rejected", rec["command_id"]), "reason_code": "command_rejected",
            "trace_id": rec.get("trace_id") or "", "source_system": rec.get("target_system"),
            "entity_type": rec.get("entity_type") or "command", "entity_id": rec.get("entity_id") or rec["command_id"],
            "customer_id": rec.get("customer_id"),
            "message": f"{self.target.name} rejected {rec['type']} {rec['command_id']} for "
                       f"{rec.get('entity_type')} {rec.get('entity_id')}: {said}",
            "suggestions": [], "caused_by": rec["command_id"],
        }
        exc_rec = self.routing.route(draft, now)
        exc_rec["original"] = {"topic": origin.topic, "partition": origin.partition, "offset": origin.offset,
                               "key": origin.key, "value": origin.value or b""}
        topic = self.names.exceptions(exc_rec["owner"])
        self._publish(topic, exc_rec["exception_id"].encode(), self.codec.encode("exception", exc_rec, topic), (),
                      f"the rejection of {rec['command_id']}")
        self._say(f"rejected {rec['type']} {rec['command_id']} -> {topic} ({exc_rec['exception_id']}): {said}")

    def _dead_letter(self, origin: Origin, exc: Exception) -> None:
        """The undecodable record, with its original bytes and coordinates, on the topic's dead-letter twin."""
        dl = {"original_topic": origin.topic, "original_partition": origin.partition,
              "original_offset": origin.offset, "original_key": origin.key, "original_value": origin.value,
              "stage": "decode", "error_type": type(exc).__name__, "error": str(exc),
              "failed_at": int(time.time() * 1000)}
        headers = (("concord-stage", b"decode"), ("concord-error", str(exc).encode()[:1000]),
                   ("concord-src-topic", origin.topic.encode()),
                   ("concord-src-partition", str(origin.partition).encode()),
                   ("concord-src-offset", str(origin.offset).encode()))
        self._publish(deadletter_topic(origin.topic), origin.key or b"", self.codec.encode("dead_letter", dl),
                      headers, f"the dead letter of {origin.topic}[{origin.partition}]@{origin.offset}")

    def _publish(self, topic: str, key: bytes, value: bytes, headers: Any, what: str) -> None:
        """Produce one record and wait for the broker's acknowledgement; AdapterError (not committed) if none."""
        errors: list[Any] = []
        if self._producer is None:
            self._producer = new_producer(self.bootstrap, **{"linger.ms": 0})
        try:
            self._producer.produce(topic, key=key, value=value, headers=list(headers),
                                   on_delivery=lambda err, _msg: errors.append(err) if err else None)
        except Exception as exc:  # noqa: BLE001 - a full queue or bad config: not committed either way
            errors.append(exc)
        left = self._producer.flush(self.produce_timeout)
        if left or errors:
            raise AdapterError(f"could not publish {what} to {topic}: "
                               f"{errors[0] if errors else 'not acknowledged'}; not committed")

    def _count(self, ctype: str, outcome: str) -> str:
        ADAPTER_COMMANDS.labels(self.target.name, ctype, outcome).inc()
        self.summary.counts[outcome] += 1
        return outcome

    def _say(self, text: str) -> None:
        print(f"concord adapters: {text}", file=self.log, flush=True)

    # ---- the loop ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the record in hand and return (safe from a signal handler)."""
        self._stop.set()

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        committed = consumer.committed(parts, timeout=10)
        for tp in committed:
            low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            key = (tp.topic, tp.partition)
            self._end[key] = high
            self._pos[key] = tp.offset if tp.offset >= 0 else low
            self._assigned.add(key)
        self._had_assignment = True

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        for tp in parts:
            self._assigned.discard((tp.topic, tp.partition))

    def _drained(self, idle_for: float, idle: float) -> bool:
        # Past the high watermark seen at assignment and quiet for ``idle`` seconds: Tansu reports the
        # base offset of a partition's last batch + 1 as its high watermark, so records after the first
        # of that batch are only known once fetched.
        return self._had_assignment and idle_for >= idle and all(
            self._pos.get(k, 0) >= self._end.get(k, 0) for k in self._assigned)

    def run(self, once: bool = False, timeout: float = 60.0, progress_every: float = 10.0,
            idle: float = 1.0) -> Summary:
        """Consume until stopped (or, with ``once``, until what was there at assignment is done).

        ``timeout``: with ``once``, how long to wait for an assignment or for progress before AdapterError;
        ``idle``: with ``once``, how long the assigned partitions must stay quiet past their end offsets.
        """
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": self.group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": max(500, self.session_timeout_ms // 6), "fetch.wait.max.ms": 100,
            "max.poll.interval.ms": max(300_000, int(self.retry.maximum * self.retry.attempts * 1000) + 60_000),
            "client.id": f"concord-adapters-{self.target.name}",
        })
        consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_progress = time.monotonic()
        last_report, reported = time.monotonic(), Tally()
        try:
            while not self._stop.is_set():
                if once and self._drained(time.monotonic() - last_progress, idle):
                    break
                if once and time.monotonic() - last_progress > timeout:
                    raise AdapterError(f"no assignment or progress on {', '.join(self.topics)} within {timeout:.0f}s")
                msg = consumer.poll(0.2)
                if msg is None:
                    if not once and time.monotonic() - last_report > progress_every \
                            and self.summary.counts != reported:
                        self._say(f"progress: {self.summary.line()}")
                        last_report, reported = time.monotonic(), Tally(self.summary.counts)
                    continue
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        self._say(f"consumer error: {msg.error()}")
                        if msg.error().fatal():
                            raise AdapterError(f"consumer: {msg.error()}")
                    continue
                self.handle(Origin(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value()))
                try:
                    consumer.commit(message=msg, asynchronous=False)
                except KafkaException as exc:
                    # The group refused the commit (this member was fenced by a rebalance or a broker failover,
                    # the coordinator moved): nothing is lost, the partition's next owner reads it again from the
                    # last committed offset and the target recognises the command id. Only a fatal error stops.
                    if exc.args[0].fatal():
                        raise AdapterError(f"commit: {exc.args[0]}") from None
                    self._say(f"commit of {msg.topic()}[{msg.partition()}]@{msg.offset()} refused "
                              f"({exc.args[0].name()}): it will be delivered again and recognised")
                self._pos[(msg.topic(), msg.partition())] = msg.offset() + 1
                last_progress = time.monotonic()
        finally:
            consumer.close()
            self.target.close()
        return self.summary
