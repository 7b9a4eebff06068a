"""Wire serialization: Avro bodies framed as Avro single-object encoding, or Confluent's wire format.

Without a Schema Registry every value is framed as Avro single-object encoding
(``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint + the Avro body), so any reader
that has the schemas in ``schemas/`` can decode it with no service running. With
``CONCORD_SCHEMA_REGISTRY_URL`` set, values are written in Confluent's wire format
(``00`` + 4-byte schema id + body) under the TopicNameStrategy subject ``<topic>-value``.
The decoder reads both, whatever the writer used.
"""

from __future__ import annotations

import io
import struct
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

import schemas
from concord.exceptions import DecodeError

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0


class Codec:
    """Encodes records of a named Concord schema and decodes any framed Avro value back."""

    def __init__(self, registry_url: str | None = None) -> None:
        self._by_fp: dict[bytes, tuple[str, Any]] = {}
        self._fp_of: dict[str, bytes] = {}
        for name in schemas.SCHEMA_FILES:
            parsed = schemas.load(name)
            fp = schemas.fingerprint(parsed)
            self._by_fp[fp] = (name, parsed)
            self._fp_of[name] = fp
        self._registry = None
        self._ids: dict[tuple[str, str], int] = {}
        self._by_id: dict[int, tuple[str, Any]] = {}
        if registry_url:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            self._registry = SchemaRegistryClient({"url": registry_url})

    @property
    def framing(self) -> str:
        """``confluent`` when a registry is configured, else ``single-object``."""
        return "confluent" if self._registry else "single-object"

    def encode(self, schema_name: str, record: dict[str, Any], topic: str | None = None) -> bytes:
        """Serialize ``record`` with schema ``schema_name``; ``topic`` names the registry subject."""
        parsed = schemas.load(schema_name)
        buf = io.BytesIO()
        if self._registry is not None:
            buf.write(struct.pack(">bI", CONFLUENT_MAGIC, self._schema_id(schema_name, topic or schema_name)))
        else:
            buf.write(SINGLE_OBJECT_MAGIC)
            buf.write(self._fp_of[schema_name])
        schemaless_writer(buf, parsed, record)
        return buf.getvalue()

    def decode(self, data: bytes | None) -> tuple[str, dict[str, Any]]:
        """Return ``(schema_name, record)``; raise DecodeError saying what is wrong with the bytes."""
        if not data:
            raise DecodeError("empty value: a change event cannot be a tombstone")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise DecodeError(f"truncated single-object header ({len(data)} bytes)")
            found = self._by_fp.get(data[2:10])
            if found is None:
                raise DecodeError(f"unknown writer schema fingerprint {data[2:10].hex()}")
            name, writer = found
            body = io.BytesIO(data[10:])
        elif data[0] == CONFLUENT_MAGIC and len(data) >= 5:
            name, writer = self._schema_by_id(struct.unpack(">I", data[1:5])[0])
            body = io.BytesIO(data[5:])
        else:
            raise DecodeError(f"not Avro-framed: starts with {data[:4].hex() or 'nothing'}")
        reader = schemas.load(name)
        try:
            record = schemaless_reader(body, writer, reader if writer is not reader else None)
        except Exception as exc:  # fastavro raises many types for corrupt bodies
            raise DecodeError(f"corrupt {name} body: {type(exc).__name__}: {exc}") from exc
        if body.tell() != len(body.getbuffer()):
            raise DecodeError(f"{len(body.getbuffer()) - body.tell()} trailing bytes after a {name} record")
        return name, record

    def _schema_id(self, schema_name: str, topic: str) -> int:
        key = (schema_name, topic)
        if key not in self._ids:
            import json

            from confluent_kafka.schema_registry import Schema

            assert self._registry is not None
            doc = json.dumps(schemas.document(schema_name))
            sid = self._registry.register_schema(f"{topic}-value", Schema(doc, "AVRO"))
            self._ids[key] = sid
            self._by_id[sid] = (schema_name, schemas.load(schema_name))
        return self._ids[key]

    def _schema_by_id(self, schema_id: int) -> tuple[str, Any]:
        if schema_id in self._by_id:
            return self._by_id[schema_id]
        if self._registry is None:
            raise DecodeError(f"Confluent-framed value (schema id {schema_id}) but no schema registry is configured")
        import json

        import fastavro

        try:
            doc = json.loads(self._registry.get_schema(schema_id).schema_str)
        except Exception as exc:
            raise DecodeError(f"schema id {schema_id} not found in the registry: {exc}") from exc
        full = f"{doc.get('namespace', '')}.{doc.get('name', '')}".lstrip(".")
        name = next((n for n in schemas.SCHEMA_FILES if _full_name(n) == full), None)
        if name is None:
            raise DecodeError(f"schema id {schema_id} is {full!r}, which Concord does not read")
        self._by_id[schema_id] = (name, fastavro.parse_schema(doc))
        return self._by_id[schema_id]


def _full_name(schema_name: str) -> str:
    doc = schemas.document(schema_name)
    return f"{doc.get('namespace', '')}.{doc['name']}".lstrip(".")
