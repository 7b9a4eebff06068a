"""Wire serialization: Avro bodies framed as Avro single-object encoding, or Confluent's wire format.

Without a Schema Registry every value is framed as Avro single-object encoding
(``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint + the Avro body), so any reader
that has the schemas in ``schemas/`` can decode it with no service running. With
``CONCORD_SCHEMA_REGISTRY_URL`` set, values are written in Confluent's wire format
(``00`` + 4-byte schema id + body) under the TopicNameStrategy subject ``<topic>-value``.
The decoder reads both, whatever the writer used, and single-object values written by an earlier version of a
schema kept in ``schemas/history/`` (resolved to the current version, as Avro schema resolution does).

A change event's payload is written as the union branch its ``entity_type`` names and read back with the
branch's name, so a payload is never typed by Avro's union resolution guessing from its fields.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

import schemas
from concord.contracts.topics import SOURCE_OF, spec
from concord.exceptions import ConfigError, DecodeError, EncodeError, PayloadTypeError, SchemaMismatch

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0


class Codec:
    """Encodes records of a named Concord schema and decodes any framed Avro value back."""

    def __init__(self, registry_url: str | None = None, history_dir: Path = schemas.HISTORY_DIR) -> None:
        self._by_fp: dict[bytes, tuple[str, Any]] = {}
        self._fp_of: dict[str, bytes] = {}
        for name in schemas.SCHEMA_FILES:
            parsed = schemas.load(name)
            fp = schemas.fingerprint(parsed)
            self._by_fp[fp] = (name, parsed)
            self._fp_of[name] = fp
        for name, doc in schemas.history(history_dir):  # records an earlier version wrote read with today's schema
            parsed = schemas.parse(doc)
            self._by_fp.setdefault(schemas.fingerprint(parsed), (name, parsed))
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
        if schema_name == "change_event":
            record = _typed_payload(record)
        buf = io.BytesIO()
        if self._registry is not None:
            buf.write(struct.pack(">bI", CONFLUENT_MAGIC, self._schema_id(schema_name, topic or schema_name)))
        else:
            buf.write(SINGLE_OBJECT_MAGIC)
            buf.write(self._fp_of[schema_name])
        try:
            schemaless_writer(buf, parsed, record)
        except Exception as exc:  # fastavro raises ValueError, TypeError, KeyError... for a record that does not fit
            raise EncodeError(f"record does not fit schemas/{schema_name}.avsc: {type(exc).__name__}: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes | None, schema: str | None = None) -> tuple[str, dict[str, Any]]:
        """Return ``(schema_name, record)``; raise DecodeError saying what is wrong with the bytes.

        With ``schema`` given, a record written with any other schema raises SchemaMismatch.
        """
        if not data:
            raise DecodeError("empty value (a tombstone): every record on a topic Concord reads has a body")
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
        if schema is not None and name != schema:
            raise SchemaMismatch(f"a valid {name} record where schemas/{schema}.avsc is declared")
        reader = schemas.load(name)
        typed = name == "change_event"
        try:
            record: Any = schemaless_reader(body, writer, reader if writer is not reader else None,
                                            return_record_name=typed)
        except Exception as exc:  # fastavro raises many types for corrupt bodies
            raise DecodeError(f"corrupt {name} body: {type(exc).__name__}: {exc}") from exc
        if body.tell() != len(body.getbuffer()):
            raise DecodeError(f"{len(body.getbuffer()) - body.tell()} trailing bytes after a {name} record")
        if typed:
            _untyped_payload(record)
        return name, record

    def decode_topic(self, topic: str, data: bytes | None) -> tuple[str, dict[str, Any]]:
        """Decode a value of ``topic``; SchemaMismatch unless it carries the schema the topic declares."""
        try:
            declared = spec(topic).value_schema
        except KeyError as exc:  # a topic read but never declared is the deployment's fault, not the record's
            raise ConfigError(str(exc.args[0])) from None
        return self.decode(data, declared)

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
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            doc = json.loads(self._registry.get_schema(schema_id).schema_str)
        except SchemaRegistryError as exc:
            if exc.http_status_code != 404:  # the registry failing is not the record's fault: let it propagate
                raise
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


# The payload record of each entity type: the schema named after it (entity deal -> schemas/deal.avsc).
PAYLOAD_RECORDS: dict[str, str] = {entity: _full_name(entity) for entity in SOURCE_OF}


def _typed_payload(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its payload as the (record name, record) pair fastavro writes as exactly that branch."""
    payload = event.get("payload")
    if payload is None:
        return event
    entity = event.get("entity_type")
    name = PAYLOAD_RECORDS.get(entity)  # type: ignore[arg-type]
    if name is None:
        raise EncodeError(f"entity_type {entity!r} names no payload record (one of {sorted(PAYLOAD_RECORDS)})")
    if isinstance(payload, tuple):
        if payload[0] != name:
            raise EncodeError(f"a {payload[0]} payload on a {entity} event (expects {name})")
        return event
    return {**event, "payload": (name, payload)}


def _untyped_payload(event: dict[str, Any]) -> None:
    """Replace the decoded (record name, record) payload by the record; PayloadTypeError if it is another entity's."""
    payload = event["payload"]
    if payload is None:
        return
    branch, event["payload"] = payload
    expected = PAYLOAD_RECORDS.get(event["entity_type"])
    if expected is not None and branch != expected:
        raise PayloadTypeError(f"payload is a {branch} record but entity_type is {event['entity_type']!r} "
                               f"(expects {expected})")
