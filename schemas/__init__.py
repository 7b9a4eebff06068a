"""Concord's Avro schemas: every .avsc beside this file, with references to named types inlined."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint as _fingerprint
from fastavro.schema import to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).resolve().parent

# Files that define named types other files use come first.
SCHEMA_FILES: tuple[str, ...] = (
    "line", "customer", "deal", "job", "invoice", "payment",
    "change_event", "command", "exception", "dead_letter", "decision", "control", "action", "config_change",
)
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def read_raw(name: str) -> dict[str, Any]:
    """The JSON of ``schemas/<name>.avsc`` as written."""
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())


def expand_all(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Self-contained schema documents: each named-type reference is replaced by its definition once."""
    defined: dict[str, dict[str, Any]] = {}
    for doc in raw.values():
        if doc.get("type") == "record":
            defined[f"{doc.get('namespace', '')}.{doc['name']}".lstrip(".")] = doc

    def inline(node: Any, seen: set[str]) -> Any:
        if isinstance(node, str):
            if node in _PRIMITIVES or node in seen or node not in defined:
                return node
            seen.add(node)
            return inline(defined[node], seen)
        if isinstance(node, list):
            return [inline(n, seen) for n in node]
        if isinstance(node, dict):
            if node.get("type") == "record":
                seen.add(f"{node.get('namespace', '')}.{node['name']}".lstrip("."))
            return {k: (inline(v, seen) if k in ("type", "items", "values", "fields") else v)
                    for k, v in node.items()}
        return node

    return {name: inline(doc, set()) for name, doc in raw.items()}


@cache
def document(name: str) -> dict[str, Any]:
    """The self-contained JSON document of schema ``name`` (what a Schema Registry is given)."""
    return expand_all({n: read_raw(n) for n in SCHEMA_FILES})[name]


@cache
def load(name: str) -> Any:
    """The parsed schema ``name``; timestamps read and write as epoch milliseconds (plain longs).

    ``logicalType`` is not part of Avro's parsing canonical form, so bytes and fingerprints are the
    same as with the documented schema; Concord's code just never converts to datetime on the hot path.
    """
    return fastavro.parse_schema(_without_logical_types(document(name)))


def _without_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_without_logical_types(n) for n in node]
    return node


def fingerprint(parsed: Any) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint used by Avro single-object encoding."""
    return bytes.fromhex(_fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


# Earlier versions of changed schemas, kept so that records they wrote still decode: <name>-<fingerprint>.avsc.
HISTORY_DIR = SCHEMA_DIR / "history"


def parse(doc: dict[str, Any]) -> Any:
    """A self-contained schema document parsed as ``load`` parses the current ones (timestamps as longs)."""
    return fastavro.parse_schema(_without_logical_types(doc))


def history(directory: Path = HISTORY_DIR) -> list[tuple[str, dict[str, Any]]]:
    """``(schema name, self-contained document)`` of every earlier version kept in ``directory``."""
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(directory.glob("*.avsc")):
        name, _, fp = path.stem.rpartition("-")
        doc = json.loads(path.read_text())
        if name not in SCHEMA_FILES or fingerprint(parse(doc)).hex() != fp:
            raise ValueError(f"{path}: not a version of a schema in SCHEMA_FILES named by its fingerprint")
        out.append((name, doc))
    return out
