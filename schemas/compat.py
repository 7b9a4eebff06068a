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


def sample_record(schema: Any) -> Any:
    """A record that exercises every field of ``schema`` with a non-default value where it can."""
    t = schema["type"] if isinstance(schema, dict) else schema
    if isinstance(schema, list):
        branch = next((b for b in schema if b != "null"), "null")
        return sample_record(branch)
    if t == "record":
        return {f["name"]: sample_record(f["type"]) for f in schema["fields"]}
    if t == "enum":
        return schema["symbols"][-1]
    if t == "array":
        return [sample_record(schema["items"])]
    if t == "map":
        return {"k": sample_record(schema["values"])}
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
