"""A dead letter and where its record came from: one typed value each, built so it always fits the broker.

Every dead letter, from the workers' stages and from ``concord ingest`` alike, is built by ``dead_letter``.
A record too large to keep whole keeps its first bytes, with its full size and sha256 in the error text
and the headers, so that producing the dead letter can never be what fails.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from concord.contracts.topics import deadletter_topic

# Kafka's default largest message is about 1 MB (broker message.max.bytes 1048588, librdkafka 1000000).
DEFAULT_MAX_RECORD_BYTES = 900_000
# Room a dead letter keeps for everything but the original value: its capped texts, topics and headers.
OVERHEAD_BYTES = 16_384
ERROR_BYTES = 4_000  # the error text in the record; the header carries its first HEADER_ERROR_BYTES
HEADER_ERROR_BYTES = 1_000
KEY_BYTES = 4_096  # a longer key is kept as a prefix (it is written twice: record key and original_key)
NAME_BYTES = 200  # stage and error type

SRC_TOPIC, SRC_PARTITION, SRC_OFFSET = "concord-src-topic", "concord-src-partition", "concord-src-offset"
ORIGINAL_SIZE, ORIGINAL_SHA256 = "concord-original-size", "concord-original-sha256"
KEY_SIZE, KEY_SHA256 = "concord-original-key-size", "concord-original-key-sha256"


@dataclass(frozen=True)
class Origin:
    """Where a record came from: topic, partition, offset, key and value bytes (-1 where there is no offset)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class DeadLetter:
    """A record Concord could not use: where it came from, what it keeps of it, the step that failed and why."""

    origin: Origin
    stage: str  # decode, validate, process (workers); normalize, gap (ingest)
    error_type: str
    error: str
    failed_at: int
    key: bytes | None  # the original key, or its first KEY_BYTES
    value: bytes | None  # the original value, or its first bytes when the whole would not fit
    extra_headers: tuple[tuple[str, bytes], ...] = ()
    processor: str = ""  # the worker stage whose policy dead-lettered it; empty for ingest

    @property
    def topic(self) -> str:
        """The dead-letter topic paired with the record's topic."""
        return deadletter_topic(self.origin.topic)

    @property
    def truncated(self) -> bool:
        """Whether the dead letter keeps less than the whole original key or value."""
        return self.value != self.origin.value or self.key != self.origin.key

    def record(self) -> dict[str, Any]:
        """The dead letter as a record of schemas/dead_letter.avsc."""
        o = self.origin
        return {"original_topic": o.topic, "original_partition": o.partition, "original_offset": o.offset,
                "original_key": self.key, "original_value": self.value, "stage": self.stage,
                "error_type": self.error_type, "error": self.error, "failed_at": self.failed_at}

    def headers(self) -> list[tuple[str, bytes]]:
        """The same facts as Kafka headers, for readers that do not decode the value."""
        o = self.origin
        out = [("concord-stage", self.stage.encode()), ("concord-error-type", self.error_type.encode()),
               ("concord-error", _cut(self.error, HEADER_ERROR_BYTES).encode()), (SRC_TOPIC, o.topic.encode()),
               (SRC_PARTITION, str(o.partition).encode()), (SRC_OFFSET, str(o.offset).encode())]
        if self.processor:
            out.append(("concord-processor", self.processor.encode()))
        return out + list(self.extra_headers)


def dead_letter(origin: Origin, stage: str, error_type: str, error: str, failed_at: int,
                limit: int = DEFAULT_MAX_RECORD_BYTES, processor: str = "") -> DeadLetter:
    """The dead letter of ``origin``: whole when it fits in ``limit`` bytes, else a prefix with size and sha256."""
    key, notes, extra = origin.key, [], []
    if key is not None and len(key) > KEY_BYTES:
        digest = hashlib.sha256(key).hexdigest()
        notes.append(f"original_key holds its first {KEY_BYTES} of {len(key)} bytes; sha256 {digest}")
        extra += [(KEY_SIZE, str(len(key)).encode()), (KEY_SHA256, digest.encode())]
        key = key[:KEY_BYTES]
    value = origin.value
    room = max(0, limit - OVERHEAD_BYTES - 2 * len(key or b""))
    if value is not None and len(value) > room:
        digest = hashlib.sha256(value).hexdigest()
        notes.append(f"original_value holds its first {room} of {len(value)} bytes; sha256 {digest}")
        extra += [(ORIGINAL_SIZE, str(len(value)).encode()), (ORIGINAL_SHA256, digest.encode())]
        value = value[:room]
    # the notes go last and are never cut: they say what the dead letter lacks
    tail = "".join(f"; {n}" for n in notes)
    text = _cut(error, max(0, ERROR_BYTES - len(tail.encode()))) + tail
    return DeadLetter(origin, _cut(stage, NAME_BYTES), _cut(error_type, NAME_BYTES), text, failed_at, key, value,
                      tuple(extra), _cut(processor, NAME_BYTES))


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` utf-8 bytes, never inside a character."""
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore")
