"""The canary: a synthetic customer-to-cash flow run through the live pipeline, end to end, on a timer.

Every interval it publishes a closed-won deal for a synthetic customer (``canary:<app id>``) to the CRM
changes topics and watches commands.billing for the create_invoice it must cause. Each run counts as
``concord_canary_runs_total{outcome="succeeded"}`` or, when no command came within the timeout, ``failed``
(which fires ConcordCanaryFailing). Adapters recognise the canary's customer and apply nothing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

from concord.contracts import events as ev
from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.runtime import metrics
from concord.runtime.producer import new_producer

CANARY_PREFIX = "canary:"
log = logging.getLogger("concord.canary")


def is_canary(customer_id: str | None) -> bool:
    """Whether a customer id is the canary's (adapters skip its commands)."""
    return bool(customer_id) and str(customer_id).startswith(CANARY_PREFIX)


class Canary:
    """A background thread that runs one synthetic flow every ``interval_s`` seconds."""

    def __init__(self, bootstrap: str, app_id: str, sku: str, interval_s: float, timeout_s: float = 30.0) -> None:
        self.bootstrap, self.interval_s, self.timeout_s, self.sku = bootstrap, interval_s, timeout_s, sku
        self.customer_id = f"{CANARY_PREFIX}{app_id}"
        self.codec = Codec()
        self.pending: dict[str, float] = {}  # deal id -> when its event was published
        self.last: tuple[int, str] | None = None  # (ms, outcome) of the latest finished run, for the checklist
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="concord-canary", daemon=True)

    def start(self) -> None:
        """Start running flows."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step."""
        self._stop.set()

    def _run(self) -> None:
        try:
            producer = new_producer(self.bootstrap, **{"linger.ms": 0})
            consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"concord-canary-{uuid.uuid4().hex}",
                                 "enable.auto.commit": False, "fetch.wait.max.ms": 100})
            name = topics.commands_topic("billing")
            ends = {p: consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1]
                    for p in range(topics.spec(name).partitions)}
            consumer.assign([TopicPartition(name, p, o) for p, o in ends.items()])
        except Exception as exc:  # noqa: BLE001 - the canary must never take the worker down
            log.error("canary cannot start: %s", exc)
            return
        now = int(time.time() * 1000)
        customer = ev.customer("Concord canary", email="canary@concord.invalid", account="acct_canary",
                               policy="on_close")
        self._publish(producer, ev.change_event("customer", self.customer_id, now, customer, self.customer_id,
                                                at=now, op="snapshot", event_id=f"{self.customer_id}:{now}"))
        next_run = time.monotonic()
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_run:
                    next_run += self.interval_s
                    self._flow(producer)
                for msg in consumer.consume(100, 0.2):
                    if msg.error():
                        continue
                    try:
                        _, cmd = self.codec.decode(msg.value())
                    except Exception:  # noqa: BLE001, S112 - not ours to judge; the adapters dead-letter it
                        continue
                    sent = self.pending.pop(cmd["entity_id"], None)
                    if sent is not None and cmd["type"] == "create_invoice":
                        metrics.CANARY_RUNS.labels("succeeded").inc()
                        self.last = (int(time.time() * 1000), "succeeded")
                for deal_id, sent in list(self.pending.items()):
                    if time.monotonic() - sent > self.timeout_s:
                        del self.pending[deal_id]
                        metrics.CANARY_RUNS.labels("failed").inc()
                        self.last = (int(time.time() * 1000), "failed")
                        log.warning("canary: no create_invoice for %s within %.0fs", deal_id, self.timeout_s)
        finally:
            consumer.close()
            producer.flush(5)

    def _flow(self, producer: Producer) -> None:
        now = int(time.time() * 1000)
        deal_id = f"{self.customer_id}:deal:{now}"
        deal = ev.deal("closed_won", [ev.line(self.sku, 1, 100)], name="canary", closed_at=now)
        self.pending[deal_id] = time.monotonic()
        self._publish(producer, ev.change_event("deal", deal_id, 1, deal, self.customer_id, at=now,
                                                event_id=f"{deal_id}:1"))

    def _publish(self, producer: Producer, event: dict) -> None:
        topic = topics.changes_topic(event["source_system"], event["entity_type"])
        try:
            producer.produce(topic, key=event["entity_id"].encode(), value=self.codec.encode("change_event", event))
            producer.poll(0)
        except Exception as exc:  # noqa: BLE001 - counted as a failed run when no command comes
            log.error("canary cannot publish: %s", exc)
