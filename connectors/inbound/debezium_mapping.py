"""Debezium column mapping: configuration (connectors/config/debezium.yaml), typed column reads, embedded schemas.

A table's mapping names, for each Concord field, the source column and its type. A value missing or of
the wrong type for a field the entity needs raises ``BadInput`` naming the table, column and field:
nothing is defaulted unless the configuration says ``default:`` for that field.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from concord.domain.yamlconf import load_model
from connectors.inbound import common as c

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "config" / "debezium.yaml"
ENV_VAR = "CONCORD_DEBEZIUM_CONFIG"
UNAVAILABLE = "__debezium_unavailable_value"  # Postgres TOAST column left out of an update

ColumnType = Literal["id", "string", "integer", "cents", "money", "timestamp_ms", "timestamp_us", "timestamp_s",
                     "date", "lines_json"]

# Concord fields per entity: True = the canonical record needs a value (no null in the schema).
ENTITY_FIELDS: dict[str, dict[str, bool]] = {
    "job": {"status": True, "deal_id": False, "scheduled_for": False, "completed_at": False, "account_ref": False,
            "lines": False},
    "invoice": {"status": True, "deal_id": False, "job_id": False, "amount_due_cents": True,
                "amount_paid_cents": True, "currency": True, "lines": False, "issued_at": False, "due_at": False},
    "payment": {"status": True, "invoice_id": False, "amount_cents": True, "currency": True, "attempt": True,
                "failure_reason": False},
}
LINK_FIELDS = {"customer_id", "billing_customer_id", "customer_name", "concord_command_id"}
_FIELD_TYPES = {  # what each Concord field can be read from
    "status": {"string"}, "currency": {"string"}, "failure_reason": {"string"}, "customer_name": {"string"},
    "concord_command_id": {"string"}, "lines": {"lines_json"}, "attempt": {"integer"},
    "amount_due_cents": {"cents", "money"}, "amount_paid_cents": {"cents", "money"}, "amount_cents": {"cents", "money"},
    "scheduled_for": {"timestamp_ms", "timestamp_us", "timestamp_s", "date"},
    "completed_at": {"timestamp_ms", "timestamp_us", "timestamp_s", "date"},
    "issued_at": {"timestamp_ms", "timestamp_us", "timestamp_s", "date"},
    "due_at": {"timestamp_ms", "timestamp_us", "timestamp_s", "date"},
}
_ID_FIELDS = {"deal_id", "job_id", "invoice_id", "account_ref", "customer_id", "billing_customer_id"}


class Column(BaseModel):
    """Where one Concord field comes from: a column and how to read it."""

    model_config = ConfigDict(extra="forbid")
    column: str
    type: ColumnType
    default: Any = None  # used only when the row lacks the column or holds null, and only if stated


class TableMap(BaseModel):
    """One captured table (or outbox payload): its entity, primary-key column and field columns."""

    model_config = ConfigDict(extra="forbid")
    entity: Literal["job", "invoice", "payment", "outbox"]
    id: str | None = "id"
    fields: dict[str, Column] = {}

    @field_validator("fields")
    @classmethod
    def _fields_fit_entity(cls, fields: dict[str, Column], info: ValidationInfo) -> dict[str, Column]:
        entity = info.data.get("entity")
        if entity is None:
            return fields  # the entity itself is wrong; pydantic reports that
        if entity == "outbox":
            if fields:
                raise ValueError("an outbox table has no field mapping (its payload is mapped per aggregate type)")
            return fields
        known = ENTITY_FIELDS[entity]
        for name, col in fields.items():
            if name not in known and name not in LINK_FIELDS:
                raise ValueError(f"{name!r} is not a field of {entity} (known: {sorted(known) + sorted(LINK_FIELDS)})")
            allowed = {"id"} if name in _ID_FIELDS else _FIELD_TYPES[name]
            if col.type not in allowed:
                raise ValueError(f"{name} cannot be read as {col.type} (use {' or '.join(sorted(allowed))})")
            if col.default is not None:
                try:  # a wrong default fails at start-up, not on every row
                    read(col.default, col.type, f"default of {name}")
                except c.BadInput as exc:
                    raise ValueError(str(exc)) from None
        return fields

    @model_validator(mode="after")
    def _needed_fields_mapped(self) -> TableMap:
        missing = [f for f, needed in ENTITY_FIELDS.get(self.entity, {}).items() if needed and f not in self.fields]
        if missing:
            raise ValueError(f"{self.entity} needs a column for {', '.join(missing)}")
        return self


class OutboxMap(BaseModel):
    """How outbox events are recognised and which table mapping reads each aggregate type's payload."""

    model_config = ConfigDict(extra="forbid")
    topic_prefix: str = "outbox.event."
    version_field: str | None = "version"
    aggregates: dict[str, str] = {}


class DebeziumConfig(BaseModel):
    """The whole Debezium mapping file."""

    model_config = ConfigDict(extra="forbid")
    tables: dict[str, TableMap]
    outbox: OutboxMap = OutboxMap()

    @field_validator("tables")
    @classmethod
    def _some_tables(cls, v: dict[str, TableMap]) -> dict[str, TableMap]:
        if not v:
            raise ValueError("map at least one table")
        return v

    @model_validator(mode="after")
    def _aggregates_name_tables(self) -> DebeziumConfig:
        for agg, table in self.outbox.aggregates.items():
            if table not in self.tables or self.tables[table].entity == "outbox":
                raise ValueError(f"outbox aggregate {agg!r} names {table!r}, which is not a mapped entity table")
        return self

    def table(self, schema: str | None, table: str, overrides: dict[str, str] | None = None) -> TableMap | None:
        """The mapping of ``schema.table`` (else ``table``); ``overrides`` maps a table to an entity's default map."""
        for key in (f"{schema}.{table}", table):
            if overrides and key in overrides:
                return self.for_entity(overrides[key])
            if key in self.tables:
                return self.tables[key]
        return None

    def for_entity(self, entity: str) -> TableMap:
        """The first table mapped to ``entity`` (what a bare table → entity override reads columns with)."""
        for tm in self.tables.values():
            if tm.entity == entity:
                return tm
        raise c.BadInput(f"no table in the Debezium configuration is mapped to {entity!r}")

    def aggregate(self, name: str) -> TableMap | None:
        """The payload mapping of an outbox aggregate type (case-insensitive), or None."""
        by_lower = {k.lower(): v for k, v in self.outbox.aggregates.items()}
        table = by_lower.get(str(name).lower())
        return self.tables[table] if table else None


def load_config(path: str | Path | None = None) -> DebeziumConfig:
    """The Debezium mapping: ``path``, else $CONCORD_DEBEZIUM_CONFIG, else connectors/config/debezium.yaml."""
    chosen = Path(path or os.environ.get(ENV_VAR) or DEFAULT_PATH)
    return load_model(chosen, DebeziumConfig)


@lru_cache(maxsize=1)
def default_config() -> DebeziumConfig:
    """The shipped mapping (Concord's own column names), loaded once."""
    return load_model(DEFAULT_PATH, DebeziumConfig)


# ---------------------------------------------------------------- typed reads

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNIT = {"timestamp_ms": 1, "timestamp_us": 1 / 1000, "timestamp_s": 1000}


def _ms_of(dt: datetime | date) -> int:
    if isinstance(dt, datetime):
        return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)
    return int(datetime(dt.year, dt.month, dt.day, tzinfo=UTC).timestamp() * 1000)


def _integral(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
        raise c.BadInput(f"{what} {value!r} is not an integer")
    try:
        d = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise c.BadInput(f"{what} {value!r} is not an integer") from None
    if d != d.to_integral_value():
        raise c.BadInput(f"{what} {value!r} is not a whole number")
    return int(d)


def read(value: Any, ctype: str, what: str) -> Any:
    """``value`` read as ``ctype``; BadInput naming ``what`` when it is not one."""
    if ctype == "id":
        if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
            raise c.BadInput(f"{what} {value!r} is not an id")
        return str(value)  # an integer key stays the same key as text
    if ctype == "string":
        if not isinstance(value, str):
            raise c.BadInput(f"{what} {value!r} is not text")
        return value
    if ctype in ("integer", "cents"):
        return _integral(value, what)
    if ctype == "money":
        if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
            raise c.BadInput(f"{what} {value!r} is not an amount")
        try:
            cents = Decimal(str(value).strip()) * 100
        except InvalidOperation:
            raise c.BadInput(f"{what} {value!r} is not an amount") from None
        if cents != cents.to_integral_value():
            raise c.BadInput(f"{what} {value!r} has fractions of a cent")
        return int(cents)
    if ctype in _UNIT or ctype == "date":
        if isinstance(value, datetime | date):  # typed by the embedded schema: its unit is known
            return _ms_of(value)
        if isinstance(value, bool):
            raise c.BadInput(f"{what} {value!r} is not a {ctype}")
        if isinstance(value, int | float):
            return int(value * 86_400_000) if ctype == "date" else int(value * _UNIT[ctype])
        if isinstance(value, str):
            try:
                return _ms_of(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
            except ValueError:
                raise c.BadInput(f"{what} {value!r} is not an ISO 8601 {'date' if ctype == 'date' else 'time'}") \
                    from None
        raise c.BadInput(f"{what} {value!r} is not a {ctype}")
    if ctype == "lines_json":
        return _lines(value, what)
    raise c.BadInput(f"{what}: unknown column type {ctype!r}")  # pragma: no cover - the config model forbids it


def _lines(value: Any, what: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise c.BadInput(f"{what} is not JSON") from None
    if not isinstance(value, list):
        raise c.BadInput(f"{what} is not a list of lines")
    out = []
    for n, li in enumerate(value, 1):
        if not isinstance(li, dict) or not li.get("sku"):
            raise c.BadInput(f"{what} line {n} has no sku")
        out.append(c.line(li["sku"], li.get("quantity", 1), li.get("unit_price_cents", 0), li.get("description", "")))
    return out


def fields_of(tm: TableMap, row: dict[str, Any], where: str) -> dict[str, Any]:
    """Every mapped field of ``row`` read by its type: value, None for an absent optional, or BadInput."""
    needed = ENTITY_FIELDS.get(tm.entity, {})
    out: dict[str, Any] = {}
    for name, col in tm.fields.items():
        raw = row.get(col.column)
        what = f"{where}.{col.column} (→ {name})"
        if raw == UNAVAILABLE:
            raise c.BadInput(f"{what} was not sent (an unchanged TOAST column): set REPLICA IDENTITY FULL on the table")
        if raw is None or raw == "":
            if col.default is not None:
                out[name] = read(col.default, col.type, what)
            elif needed.get(name):
                state = "missing" if col.column not in row else "null"
                raise c.BadInput(f"{what} is {state}, and a {tm.entity} needs it")
            else:
                out[name] = [] if name == "lines" else None
            continue
        out[name] = read(raw, col.type, what)
    return out


# ---------------------------------------------------------------- embedded Kafka Connect schemas


def _decimal(b64: str, scale: int, what: str) -> Decimal:
    try:
        unscaled = int.from_bytes(base64.b64decode(b64, validate=True), "big", signed=True)
    except (ValueError, TypeError):
        raise c.BadInput(f"{what} {b64!r} is not a base64 Decimal") from None
    return Decimal(unscaled).scaleb(-scale)


def typed(value: Any, schema: dict[str, Any], what: str) -> Any:
    """A JSON-converter value read by its Connect schema (logical types → date, datetime, Decimal)."""
    if value is None or not isinstance(schema, dict):
        return value
    name = schema.get("name") or ""
    if schema.get("type") == "struct" and name != "io.debezium.data.VariableScaleDecimal":
        if not isinstance(value, dict):
            raise c.BadInput(f"{what} is not an object although its schema is a struct")
        subs = {f.get("field"): f for f in schema.get("fields") or [] if isinstance(f, dict)}
        return {k: typed(v, subs.get(k, {}), f"{what}.{k}") for k, v in value.items()}
    try:
        if name in ("io.debezium.time.Date", "org.apache.kafka.connect.data.Date"):
            return (_EPOCH + timedelta(days=int(value))).date()
        if name in ("io.debezium.time.Timestamp", "org.apache.kafka.connect.data.Timestamp"):
            return _EPOCH + timedelta(milliseconds=int(value))
        if name == "io.debezium.time.MicroTimestamp":
            return _EPOCH + timedelta(microseconds=int(value))
        if name == "io.debezium.time.NanoTimestamp":
            return _EPOCH + timedelta(microseconds=int(value) // 1000)
        if name == "io.debezium.time.ZonedTimestamp":
            return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (TypeError, ValueError, OverflowError):
        raise c.BadInput(f"{what} {value!r} is not a {name.rsplit('.', 1)[-1]}") from None
    if name == "org.apache.kafka.connect.data.Decimal":
        if not isinstance(value, str):
            return value  # decimal.handling.mode=double|string already gives the number
        scale = c.to_int((schema.get("parameters") or {}).get("scale", 0), f"{what} schema scale")
        return _decimal(value, scale, what)
    if name == "io.debezium.data.VariableScaleDecimal":
        if not isinstance(value, dict) or "value" not in value:
            raise c.BadInput(f"{what} {value!r} is not a VariableScaleDecimal {{scale, value}}")
        return _decimal(value["value"], c.to_int(value.get("scale", 0), f"{what}.scale"), what)
    return value
