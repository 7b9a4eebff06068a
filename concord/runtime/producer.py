"""The one way Concord writes to Kafka: a librdkafka producer with one set of settings for every process.

Worker, owners' API, ingest, webhooks, adapters, canary, simulator and bench all build their producer here,
so acknowledgement, partitioning and size limits cannot drift between them.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka import Producer as RdProducer

# The broker's default message.max.bytes (1 MB) less room for the record batch overhead: a record this size
# or smaller is accepted by Apache Kafka and the embedded broker alike. Dead letters are built to fit it.
MAX_RECORD_BYTES = 1_000_000

SETTINGS: dict[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    # murmur2_random puts a key on the partition faust's and Kafka's Java clients pick for it
    "partitioner": "murmur2_random",
    "message.max.bytes": MAX_RECORD_BYTES + 48_576,
    "linger.ms": 5,
    "log_level": 3,
}


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """The librdkafka settings of a Concord producer for ``bootstrap``, with per-use ``overrides``."""
    return {**SETTINGS, "bootstrap.servers": bootstrap, **overrides}


def new_producer(bootstrap: str, **overrides: Any) -> RdProducer:
    """A Concord producer (see ``producer_config``)."""
    return RdProducer(producer_config(bootstrap, **overrides))


class _Delivery:
    """The acknowledgements of one batch of records: resolves ``future`` on the event loop when all are in."""

    __slots__ = ("loop", "future", "remaining", "lock", "error", "offsets")

    def __init__(self, loop: asyncio.AbstractEventLoop, remaining: int) -> None:
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.remaining = remaining
        self.lock = threading.Lock()
        self.error: Any = None
        self.offsets: dict[tuple[str, int], int] = {}  # changelog partition -> last offset written

    def __call__(self, err: Any, msg: Any) -> None:  # librdkafka's delivery report, on the poll thread
        with self.lock:
            if err is not None and self.error is None:
                self.error = err
            elif err is None and msg.topic().endswith("-changelog"):
                self.offsets[(msg.topic(), msg.partition())] = msg.offset()
            self.remaining -= 1
            if self.remaining != 0:
                return
        self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future.done():
            return
        if self.error is not None:
            self.future.set_exception(KafkaException(self.error))
        else:
            self.future.set_result(self.offsets)


Outgoing = tuple[str, bytes, bytes, Any, "int | None"]  # topic, key, value, headers, partition


class Outputs:
    """Every record a worker produces goes through one producer it owns, awaited per batch.

    Cheaper per record than faust's Topic/ProducerBuffer path (the C client batches and sends on its own
    thread); a batch's records are awaited together, so outputs are acknowledged before offsets are committed.
    """

    def __init__(self, bootstrap: str, linger_ms: int, max_record_bytes: int = MAX_RECORD_BYTES) -> None:
        self.config = producer_config(bootstrap, **{
            "linger.ms": linger_ms, "queue.buffering.max.messages": 1_000_000,
            "message.max.bytes": max(MAX_RECORD_BYTES, max_record_bytes) + 48_576})
        self._producer: RdProducer | None = None
        self._stopping = threading.Event()

    def _poll(self, producer: RdProducer) -> None:
        while not self._stopping.is_set():
            producer.poll(0.05)

    @property
    def producer(self) -> RdProducer:
        """The producer, started with its poll thread on first use."""
        if self._producer is None:
            self._producer = RdProducer(self.config)
            threading.Thread(target=self._poll, args=(self._producer,), name="concord-producer", daemon=True).start()
        return self._producer

    def produce(self, records: list[Outgoing]) -> asyncio.Future:
        """Produce records; the future resolves when all are acknowledged, and fails if any is not."""
        loop = asyncio.get_running_loop()
        if not records:
            done = loop.create_future()
            done.set_result({})
            return done
        producer = self.producer
        delivery = _Delivery(loop, len(records))
        produce = producer.produce
        for topic, key, value, headers, partition in records:
            while True:
                try:
                    if partition is None:
                        produce(topic, value, key, headers=headers, on_delivery=delivery)
                    else:
                        produce(topic, value, key, partition, headers=headers, on_delivery=delivery)
                    break
                except BufferError:  # the local queue is full (1M records): wait for the poll thread to drain it
                    producer.poll(0.01)
        return delivery.future

    async def send(self, records: list[Outgoing]) -> dict[tuple[str, int], int]:
        """Produce records and return when the broker acknowledged all of them."""
        return await self.produce(records)

    def stop(self) -> None:
        """Deliver what is queued (for up to 10 s) and stop the poll thread."""
        self._stopping.set()
        if self._producer is not None:
            self._producer.flush(10)
