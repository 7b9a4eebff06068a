"""Backward-compatibility check: data written with an old schema must read with the new one."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import fastavro
from fastavro import schemaless_reader, schemaless_writer

import schemas


def committed_versions(name: str, repo: Path | None = None) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """Every committed version of ``schemas/<name>.avsc``, each with the schema files of its commit."""
    repo = repo or schemas.SCHEMA_DIR.parent
    try:
        log = subprocess.run(
            ["git", "log", "--format=%H", "--", f"schemas/{name}.avsc"],
            cwd=repo, capture_output=True, text=True, check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return []
    out = []
    for commit in log:
        raw = {}
        for n in schemas.SCHEMA_FILES:
            shown = subprocess.run(["git", "show", f"{commit}:schemas/{n}.avsc"], cwd=repo,
                                   capture_output=True, text=True)
            if shown.returncode == 0:
                raw[n] = json.loads(shown.stdout)
        if name in raw:
            out.append((commit, raw))
    return out


def sample_record(schema: Any, named: dict[str, Any] | None = None) -> Any:
    """A record that exercises every field of ``schema`` with a non-default value where it can."""
    named = {} if named is None else named
    if isinstance(schema, str) and schema in named:  # a named type defined earlier in the schema
        return sample_record(named[schema], named)
    t = schema["type"] if isinstance(schema, dict) else schema
    if isinstance(schema, list):
        branch = next((b for b in schema if b != "null"), "null")
        return sample_record(branch, named)
    if isinstance(schema, dict) and t in ("record", "enum", "fixed"):
        named[schema["name"]] = schema
    if t == "record":
        return {f["name"]: sample_record(f["type"], named) for f in schema["fields"]}
    if t == "enum":
        return schema["symbols"][-1]
    if t == "array":
        return [sample_record(schema["items"], named)]
    if t == "map":
        return {"k": sample_record(schema["values"], named)}
    return {"null": None, "boolean": True, "int": 7, "long": 1_700_000_000_000, "float": 1.5,
            "double": 2.5, "bytes": b"\x00\x01", "string": "x"}[t]


def check(old_doc: dict[str, Any], new_doc: dict[str, Any]) -> None:
    """Raise if a record written with ``old_doc`` cannot be read with reader schema ``new_doc``."""
    writer = fastavro.parse_schema(old_doc)
    reader = fastavro.parse_schema(new_doc)
    buf = io.BytesIO()
    schemaless_writer(buf, writer, sample_record(writer))
    buf.seek(0)
    schemaless_reader(buf, writer, reader)


def record_branches(schema: Any) -> dict[str, list[str]]:
    """Each top-level field of a parsed record schema whose union holds several records, with their names."""
    out = {}
    for f in schema.get("fields", ()):
        names = [b["name"] for b in f["type"] if isinstance(b, dict) and b.get("type") == "record"] \
            if isinstance(f["type"], list) else []
        if len(names) > 1:
            out[f["name"]] = names
    return out


def check_branches(old_doc: dict[str, Any], new_doc: dict[str, Any]) -> None:
    """Raise unless every record branch of ``old_doc``'s unions reads back as the same branch with ``new_doc``.

    Change events name their payload's type by its union branch, so a branch that reads back as another
    record (renamed, removed) would be a payload of another entity.
    """
    writer = fastavro.parse_schema(old_doc)
    reader = fastavro.parse_schema(new_doc)
    for field_name, names in record_branches(writer).items():
        named = _named_types(writer)
        for name in names:
            record = sample_record(writer, dict(named))
            record[field_name] = (name, sample_record(named[name], dict(named)))
            buf = io.BytesIO()
            schemaless_writer(buf, writer, record)
            buf.seek(0)
            read: Any = schemaless_reader(buf, writer, reader, return_record_name=True)
            got = read[field_name]
            if not isinstance(got, tuple) or got[0] != name:
                read_as = got[0] if isinstance(got, tuple) else type(got).__name__
                raise ValueError(f"{field_name}: a {name} written with the old schema reads as {read_as}")


def _named_types(node: Any, found: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every named type a parsed schema defines, by its full name."""
    found = {} if found is None else found
    if isinstance(node, list):
        for n in node:
            _named_types(n, found)
    elif isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed"):
            found.setdefault(node["name"], node)
        for key in ("type", "items", "values"):
            if isinstance(node.get(key), dict | list):
                _named_types(node[key], found)
        for f in node.get("fields", ()):
            _named_types(f["type"], found)
    return found


def keep_as(name: str, doc: dict[str, Any]) -> Path:
    """Where an earlier version ``doc`` of schema ``name`` is kept so that what it wrote still decodes."""
    return schemas.HISTORY_DIR / f"{name}-{schemas.fingerprint(schemas.parse(doc)).hex()}.avsc"
