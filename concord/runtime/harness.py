"""Run the whole topology in process, without a broker: changes in, commands/exceptions/audit out.

The same Pipeline the worker runs, with plain dicts as its tables, so tests and properties can drive
thousands of events through guard, status table and rules quickly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.domain.flow_config import FlowConfig, load_flow_config
from concord.domain.routing import Routing, load_routing
from concord.runtime.pipeline import Escalations, Out, Pipeline, Record
from concord.runtime.reconciler import OwnedIndex, Reconciler


class InProcess:
    """Feed encoded records on any topic a worker reads; read what the topology produced and the tables it left.

    Records reach the stage the worker runs for their topic (changes.* and guard.controls: the guard;
    accepted.changes, actions.exceptions and outcomes.commands: the status table with the reconciler around it;
    exceptions.*: exception tracking; ``escalate`` is the SLA check's timer), and what a
    stage produces on accepted.changes or an exceptions queue is fed on, as the broker would. The internal
    topics are those of the deployment ``app_id`` (``names``).
    """

    def __init__(self, cfg: FlowConfig | None = None, routing: Routing | None = None, now: int = 0,
                 gap_wait_ms: int = 1000, budget: int = 500, check_delay_ms: int = 0,
                 app_id: str = "concord-in-process") -> None:
        from concord.domain import rules

        self.cfg = cfg or load_flow_config()
        self.clock = {"now": now}
        self.codec = Codec()
        routing = routing or load_routing()
        self.names = topics.Deployment(app_id)
        self.pipeline = Pipeline(self.codec, self.names, lambda s, e, n: rules.decide(s, e, self.cfg, n), routing.route,
                                 gap_wait_ms=gap_wait_ms, clock=lambda: self.clock["now"], parks=routing.parks,
                                 act=lambda s, a, n: rules.act(s, a, self.cfg, n))
        self.cursors: dict[bytes, Any] = {}
        self.statuses: dict[bytes, Any] = {}
        self.exception_records: dict[bytes, Any] = {}
        self.deadlines: dict[bytes, Any] = OwnedIndex()  # the reconciler's index, apart so statuses holds customers
        self.loop = Reconciler(self.pipeline, self.cfg, budget, check_delay_ms, index=self.deadlines)
        self.escalations = Escalations(self.pipeline)
        self.out: list[Out] = []
        self.offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> last offset fed
        self.accepted: list[Record] = []  # what stage two was given, to give it again (a restart)

    def feed(self, topic: str, key: bytes | None, value: bytes | None, partition: int = 0,
             headers: dict[str, bytes] | None = None) -> Record:
        """One record arrives on ``topic``; returns it as the stage saw it (with its offset)."""
        rec = Record(topic, partition, self._next_offset(topic, partition), key, value, headers or {})
        self._run(self._stage(rec))
        return rec

    def feed_event(self, event: dict[str, Any]) -> None:
        """Encode and feed one canonical event on its topic."""
        topic = topics.changes_topic(event["source_system"], event["entity_type"])
        self.feed(topic, event["entity_id"].encode(), self.codec.encode("change_event", event))

    def act(self, action: dict[str, Any]) -> None:
        """An owner's action arrives (see schemas/action.avsc)."""
        self.feed(self.names.exception_actions, action["customer_key"].encode(), self.codec.encode("action", action))

    def tick(self) -> None:
        """A timer tick on the guard's partition."""
        self._run(self.pipeline.tick(0, self.cursors))

    def escalate(self) -> None:
        """A tick of the SLA check over the exception table, as the worker's timer runs it."""
        for holds, escalated in self.escalations.due(self.exception_records, list(self.exception_records),
                                                     self.clock["now"]):
            self._run(holds + escalated)

    def report(self, outcome: dict[str, Any]) -> None:
        """An adapter's outcome of one command arrives (see schemas/command_outcome.avsc)."""
        key = (outcome["customer_id"] or f"unknown:{outcome['entity_type']}:{outcome['entity_id']}").encode()
        self.feed(topics.COMMAND_OUTCOMES.name, key, self.codec.encode("command_outcome", outcome))

    def reconcile(self) -> None:
        """A tick of the time-driven rules on the (single) partition."""
        self.feed(topics.COMMAND_OUTCOMES.name, b"", self.loop.tick_record(self.clock["now"]))

    def _next_offset(self, topic: str, partition: int) -> int:
        offset = self.offsets[(topic, partition)] = self.offsets.get((topic, partition), -1) + 1
        return offset

    def _stage(self, rec: Record) -> list[Out]:
        if rec.topic in (self.names.accepted, self.names.exception_actions, topics.COMMAND_OUTCOMES.name):
            return self.loop.step(rec, self.statuses)
        if rec.topic in self.names.exception_queues:
            outs = self.pipeline.track(rec, self.exception_records)
            self.escalations.tracked(rec.key, self.exception_records.get(rec.key or b""))
            return outs
        return self.pipeline.guard(rec, self.cursors)

    def _run(self, outs: list[Out]) -> None:
        for o in outs:
            self.out.append(o)
            if o.topic == self.names.accepted or o.topic in self.names.exception_queues:
                rec = Record(o.topic, 0, self._next_offset(o.topic, 0), o.key, o.value, dict(o.headers))
                if o.topic == self.names.accepted:
                    self.accepted.append(rec)
                self._run(self._stage(rec))

    def redeliver_accepted(self, from_offset: int = 0) -> None:
        """What a restart does to stage two: accepted.changes read again from ``from_offset``, same coordinates."""
        for rec in [r for r in self.accepted if r.offset >= from_offset]:
            self._run(self._stage(rec))

    def records(self, where: Callable[[str], bool]) -> list[dict[str, Any]]:
        """Decoded records produced on topics ``where`` accepts, in order."""
        return [self.codec.decode(o.value)[1] for o in self.out if where(o.topic)]

    def commands(self) -> list[dict[str, Any]]:
        """Every command produced."""
        return self.records(lambda t: t.startswith("commands."))

    def exceptions(self) -> list[dict[str, Any]]:
        """Every exception record produced (opened and resolved)."""
        return self.records(lambda t: t in self.names.exception_queues)

    def dead_letters(self) -> list[Out]:
        """Every dead letter produced, each with its typed ``dead_letter``."""
        return [o for o in self.out if o.dead_letter is not None]

