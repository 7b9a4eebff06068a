"""What every inbound connector shares: result types, time and money parsing, payload builders, checks.

A connector module maps one native record (already parsed from JSON, CSV, ...) to an ``Outcome``:
canonical change events (``Mapped``), "needs re-read" notices (``Reread``: the source said something
changed but sent no field data, e.g. a Salesforce gap event) and a count of records skipped on purpose
(e.g. Debezium tombstones). Bad native input raises ``BadInput``; the ingest command turns it into a
dead letter. Mapping functions are pure: no broker, no clock unless the ``Context`` gives one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from fastavro.validation import ValidationError, validate

import schemas
from concord.contracts.topics import SOURCE_OF, changes_topic
from concord.contracts.validate import validate_change
from connectors.inbound import boundary
from connectors.inbound.exceptions import BadInput

if TYPE_CHECKING:
    from connectors.inbound.identity import IdentityMap

__all__ = ["BadInput"]  # raised by every connector; defined beside the boundary that raises it first

_CHANGE_EVENT = schemas.load("change_event")
ENTITY_TYPES = ("customer", "deal", "job", "invoice", "payment")

# How an adapter marks a change it made for a Concord command, so its echo can be recognised:
# the command id is passed as ``concord:<command_id>`` (Salesforce client id, HubSpot sourceId, a
# ``concord_command_id`` field) or, where the API takes an idempotency key, as the bare command id,
# which Concord's command ids start with ``cmd_`` / ``cmd-``.
_MARKED = re.compile(r"concord[:/](?P<id>[A-Za-z0-9._\-]+)")
_BARE = re.compile(r"^(?:cmd[_-][A-Za-z0-9._\-]+)$")


@dataclass
class Mapped:
    """One canonical change event and what goes with it on the way to the broker."""

    event: dict[str, Any]
    dedupe_key: str
    candidates: list[dict[str, Any]] = field(default_factory=list)  # when customer_id is unresolved

    @property
    def topic(self) -> str:
        return changes_topic(self.event["source_system"], self.event["entity_type"])


@dataclass
class Reread:
    """The source reported a change without its data: someone (or something) must re-read the record."""

    source: str
    entity_type: str
    entity_ids: list[str]
    change_type: str
    reason: str
    dedupe_key: str
    raw: bytes = b""
    seq: int | None = None  # the notification's place in the entity's order, for the snapshot a fetch makes
    since_ms: int | None = None  # a resync (no record ids): every record of the type changed since this time


@dataclass
class Outcome:
    """Everything one native record mapped to."""

    events: list[Mapped] = field(default_factory=list)
    rereads: list[Reread] = field(default_factory=list)
    skipped: int = 0
    rejected: list[BadInput] = field(default_factory=list)  # per-item failures inside a batch body

    def extend(self, other: Outcome) -> None:
        self.events += other.events
        self.rereads += other.rereads
        self.skipped += other.skipped
        self.rejected += other.rejected


def now_ms() -> int:
    """Wall-clock epoch milliseconds."""
    return int(time.time() * 1000)


@dataclass
class Context:
    """What mapping may consult: the identity cross-reference, a clock, connector settings."""

    identity: IdentityMap | None = None
    clock: Callable[[], int] = now_ms
    settings: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- small parsers


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds (``2026-01-02T03:04:05.678Z``)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def to_ms(value: Any, what: str = "timestamp") -> int | None:
    """Epoch milliseconds from an ISO-8601 string, a date, or epoch seconds / ms / µs (told apart by size)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadInput(f"{what} is a boolean")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInput(f"{what} {value} is not a timestamp")
        v = float(boundary.long(value, what)) if isinstance(value, int) else value
        if abs(v) >= 1e14:  # microseconds (Debezium MicroTimestamp)
            ms = int(v // 1000)
        elif abs(v) >= 1e11:  # milliseconds
            ms = int(v)
        else:
            ms = int(v * 1000)  # seconds (Stripe)
        return boundary.long(ms, what)
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        return int(dt.timestamp() * 1000)
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp() * 1000)
    if isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            if len(s) > boundary.Limits.from_env().digits:
                raise BadInput(f"{what} {s[:24]}... has too many digits to be a timestamp")
            return to_ms(float(s) if "." in s else int(s), what)
        try:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            raise BadInput(f"{what} {value[:64]!r} is not a timestamp") from None
        return to_ms(dt, what)
    raise BadInput(f"{what} is a {type(value).__name__}, not a timestamp")


def _decimal(value: Any, what: str, kind: str = "a number") -> Decimal:
    """A number of any JSON or CSV form as a Decimal, converted at bounded cost; BadInput naming ``what``."""
    if isinstance(value, bool):
        raise BadInput(f"{what} is a boolean, not {kind}")
    if isinstance(value, int):
        return Decimal(boundary.long(value, what))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadInput(f"{what} {value} is not {kind}")
        return Decimal(repr(value))
    if isinstance(value, str | Decimal):
        return boundary.decimal(str(value), what, kind)
    raise BadInput(f"{what} is a {type(value).__name__}, not {kind}")


def to_cents(value: Any, what: str = "amount") -> int:
    """Minor units from a decimal amount in major units (``"12.50"`` → 1250)."""
    if value is None or value == "":
        return 0
    try:
        cents = int((_decimal(value, what) * 100).quantize(Decimal(1)))
    except ArithmeticError:  # InvalidOperation, Overflow: more digits than the context holds
        raise BadInput(f"{what} {str(value)[:40]!r} is out of range") from None
    return boundary.long(cents, what)


def to_int(value: Any, what: str) -> int:
    """An integer (a fraction is truncated), or BadInput naming the field."""
    if isinstance(value, int) and not isinstance(value, bool):
        return boundary.long(value, what)
    try:
        return boundary.long(int(_decimal(value, what, "an integer")), what)
    except ArithmeticError:
        raise BadInput(f"{what} {str(value)[:40]!r} is not an integer") from None


_NO_ATTRIBUTE = re.compile(r"'(\w+)' object has no attribute '(\w+)'")


def unexpected(exc: Exception) -> BadInput:
    """The BadInput for an error a mapper did not raise on purpose (a field of a shape it did not expect)."""
    if isinstance(exc, KeyError):
        msg = f"missing required field {_clip(repr(exc.args[0]) if exc.args else '')}"
    elif isinstance(exc, AttributeError) and (m := _NO_ATTRIBUTE.search(str(exc))):
        msg = f"a field that must be a JSON object is a {m.group(1)} (looked up {m.group(2)!r})"
    elif isinstance(exc, TypeError | IndexError):
        msg = f"a field has the wrong type or shape: {_clip(str(exc))}"
    elif isinstance(exc, RecursionError):
        msg = "nested too deeply to map"
    else:
        msg = f"cannot map this record: {type(exc).__name__}: {_clip(str(exc))}"
    err = BadInput(msg + _where(exc))
    err.unexpected = type(exc).__name__
    return err


def _where(exc: BaseException) -> str:
    """Which connector function met the field (its name says which part of the record: ``_lines``, ``_customer``)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/connectors/inbound/" in f.filename
              and not f.filename.endswith(("/common.py", "/ingest.py"))]
    if not frames:
        return ""
    module = frames[-1].filename.rsplit("/", 1)[-1].removesuffix(".py")
    return f" (in {module}.{frames[-1].name})"


def _clip(value: Any, n: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[:n] + "..."


def guard(fn: Callable[..., Outcome], *args: Any) -> Outcome:
    """``fn(*args)``, any error other than BadInput turned into one: one item of a batch fails alone."""
    try:
        return fn(*args)
    except BadInput:
        raise
    except Exception as exc:
        raise unexpected(exc) from exc


def require(record: dict[str, Any], *path: str, what: str | None = None) -> Any:
    """``record[path[0]][path[1]]...``; BadInput naming the path when it is missing or null."""
    node: Any = record
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            raise BadInput(f"missing required field {what or '.'.join(path)}")
        node = node[key]
    return node


def command_id_from(*texts: Any, bare_ok: bool = False) -> str | None:
    """The Concord command id a source field carries (``concord:<id>``; a bare ``cmd_…`` if ``bare_ok``)."""
    for text in texts:
        if not isinstance(text, str) or not text:
            continue
        m = _MARKED.search(text)
        if m:
            return m.group("id")
        if bare_ok and _BARE.match(text.strip()):
            return text.strip()
    return None


def trace_id_for(event_id: str) -> str:
    """A trace id derived from the event id, so re-ingesting the same native event keeps its trace."""
    return hashlib.sha256(event_id.encode()).hexdigest()[:32]


def domain_of(value: str | None) -> str | None:
    """The domain of an e-mail address or a website (``https://www.acme.com/x`` → ``acme.com``)."""
    if not value:
        return None
    v = value.strip().lower()
    if "@" in v:
        v = v.rsplit("@", 1)[1]
    v = re.sub(r"^[a-z]+://", "", v).split("/")[0].split(":")[0]
    return v[4:] if v.startswith("www.") else (v or None)


# ---------------------------------------------------------------- payload records (every field present)


def line(sku: str, quantity: Any = 1, unit_price_cents: Any = 0, description: str = "") -> dict[str, Any]:
    """A Line record; quantity must be positive."""
    q = to_int(quantity if quantity is not None else 1, f"quantity of {sku}")
    if q <= 0:
        raise BadInput(f"line {sku!r} has quantity {q}; it must be > 0")
    return {"sku": str(sku), "description": description or "", "quantity": q,
            "unit_price_cents": to_int(unit_price_cents or 0, f"unit price of {sku}")}


def customer(name: str | None, email: str | None = None, billing_account_id: str | None = None,
             billing_terms: str | None = None, billing_policy: str | None = None,
             billing_address: str | None = None, external_ids: dict[str, str] | None = None) -> dict[str, Any]:
    """A Customer record."""
    return {"name": name or "", "email": email, "billing_account_id": billing_account_id,
            "billing_terms": billing_terms, "billing_policy": billing_policy, "billing_address": billing_address,
            "external_ids": {k: str(v) for k, v in (external_ids or {}).items() if v}}


DEAL_STAGES = {"open", "closed_won", "closed_lost"}
JOB_STATUSES = {"scheduled", "dispatched", "completed", "cancelled"}
INVOICE_STATUSES = {"draft", "open", "paid", "void", "uncollectible"}
PAYMENT_STATUSES = {"succeeded", "failed", "refunded"}
_SYNONYMS = {
    "won": "closed_won", "closedwon": "closed_won", "closed won": "closed_won",
    "lost": "closed_lost", "closedlost": "closed_lost", "closed lost": "closed_lost",
    "canceled": "cancelled", "complete": "completed", "done": "completed", "voided": "void",
    "success": "succeeded", "paid_out": "succeeded", "refund": "refunded", "failure": "failed",
}


def state(value: Any, allowed: set[str], what: str) -> str:
    """A status normalised to Concord's vocabulary (case, spaces, US/UK spelling); BadInput otherwise."""
    if value is None:
        raise BadInput(f"missing required field {what}")
    v = str(value).strip().lower().replace("-", "_")
    v = _SYNONYMS.get(v, _SYNONYMS.get(v.replace("_", " "), v)).replace(" ", "_")
    if v not in allowed:
        raise BadInput(f"{what} {value!r} is not one of {sorted(allowed)}")
    return v


def deal(stage: str, name: str = "", amount_cents: int = 0, currency: str = "USD",
         lines: list[dict[str, Any]] | None = None, closed_at: int | None = None,
         billing_status: str | None = None) -> dict[str, Any]:
    """A Deal record."""
    return {"name": name or "", "stage": state(stage, DEAL_STAGES, "deal stage"),
            "amount_cents": to_int(amount_cents, "deal amount"),
            "currency": (currency or "USD").upper(), "lines": lines or [], "closed_at": closed_at,
            "billing_status": billing_status}


def job(status: str, deal_id: str | None = None, scheduled_for: int | None = None, completed_at: int | None = None,
        account_ref: str | None = None, lines: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Job record."""
    return {"deal_id": deal_id, "status": state(status, JOB_STATUSES, "job status"), "scheduled_for": scheduled_for,
            "completed_at": completed_at, "account_ref": account_ref, "lines": lines or []}


def invoice(status: str, deal_id: str | None = None, job_id: str | None = None, amount_due_cents: int = 0,
            amount_paid_cents: int = 0, currency: str = "USD", lines: list[dict[str, Any]] | None = None,
            issued_at: int | None = None, due_at: int | None = None,
            billed_to: dict[str, str | None] | None = None) -> dict[str, Any]:
    """An Invoice record; ``billed_to``: the customer's name, email and address as billing holds them."""
    to = billed_to or {}
    return {"status": state(status, INVOICE_STATUSES, "invoice status"), "deal_id": deal_id, "job_id": job_id,
            "amount_due_cents": to_int(amount_due_cents, "invoice amount due"),
            "amount_paid_cents": to_int(amount_paid_cents, "invoice amount paid"),
            "currency": (currency or "USD").upper(), "lines": lines or [], "issued_at": issued_at, "due_at": due_at,
            "customer_name": to.get("name") or None, "customer_email": to.get("email") or None,
            "customer_address": to.get("address") or None}


def payment(status: str, invoice_id: str | None = None, amount_cents: int = 0, currency: str = "USD",
            attempt: int = 1, failure_reason: str | None = None) -> dict[str, Any]:
    """A Payment record."""
    return {"status": state(status, PAYMENT_STATUSES, "payment status"), "invoice_id": invoice_id,
            "amount_cents": to_int(amount_cents, "payment amount"), "currency": (currency or "USD").upper(),
            "attempt": to_int(attempt, "payment attempt"),
            "failure_reason": failure_reason}


# ---------------------------------------------------------------- the canonical event


def change_event(*, event_id: str, vendor: str, entity_type: str, entity_id: str, seq: int, op: str,
                 occurred_at: int | None, payload: dict[str, Any] | None, raw: bytes, content_type: str,
                 ctx: Context, customer_id: str | None = None, changed_fields: list[str] | None = None,
                 caused_by_command_id: str | None = None, seq_contiguous: bool = False,
                 trace_id: str | None = None) -> dict[str, Any]:
    """A canonical change event dict (schemas/change_event.avsc), every field set."""
    if entity_type not in SOURCE_OF:
        raise BadInput(f"entity type {entity_type!r} is not one of {sorted(SOURCE_OF)}")
    if not entity_id:
        raise BadInput(f"{entity_type} event has no entity id")
    ingested = ctx.clock()
    return {
        "event_id": event_id, "source_system": SOURCE_OF[entity_type], "source_vendor": vendor,
        "entity_type": entity_type, "entity_id": str(entity_id), "customer_id": customer_id,
        "seq": to_int(seq, "seq"), "seq_contiguous": seq_contiguous, "op": op,
        "occurred_at": occurred_at if occurred_at is not None else ingested, "ingested_at": ingested,
        "trace_id": trace_id or trace_id_for(event_id), "changed_fields": list(dict.fromkeys(changed_fields or [])),
        "payload": payload, "caused_by_command_id": caused_by_command_id,
        "source_payload": raw, "source_content_type": content_type,
    }


_CODEC: list[Any] = []


def _codec() -> Any:
    """The publishers' codec, built once."""
    if not _CODEC:
        from concord.contracts.codec import Codec

        _CODEC.append(Codec())
    return _CODEC[0]


def check(event: dict[str, Any]) -> None:
    """Raise BadInput unless the event encodes with schemas/change_event.avsc and keeps the workers' contract.

    Encoding here, while mapping, is what makes a dry run and a publish agree: an event that would fail
    at the producer is refused before anything is sent.
    """
    try:
        _codec().encode("change_event", event)  # the very encoding the publisher uses (payload typed by entity)
    except Exception as exc:  # fastavro raises TypeError, ValueError, OverflowError, UnicodeEncodeError, ...
        raise BadInput(f"mapped event does not fit schemas/change_event.avsc: {_schema_error(event, exc)}",
                       _printable_id(event.get("entity_id"))) from None
    try:
        validate_change(event, changes_topic(event["source_system"], event["entity_type"]))
    except Exception as exc:
        raise BadInput(f"mapped event breaks the contract: {exc}", _printable_id(event.get("entity_id"))) from exc


def _schema_error(event: dict[str, Any], exc: Exception) -> str:
    """Which field fails the schema and how, from fastavro's validator (it names the field path)."""
    try:
        validate(event, _CHANGE_EVENT, raise_errors=True)
    except ValidationError as verr:
        return "; ".join(str(e) for e in verr.errors)[:500]
    except Exception as vexc:  # the validator itself refused the value (e.g. a lone surrogate)
        return f"{type(vexc).__name__}: {str(vexc)[:300]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _printable_id(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def resolve_customer(ctx: Context, system: str, native_id: str | None, hints: dict[str, Any] | None = None,
                     direct: str | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """(customer_id, candidates): a direct id, else the identity map's link, else ranked candidates, never a guess."""
    if direct:
        return str(direct), []
    if ctx.identity is None:
        return None, []
    if native_id:
        found = ctx.identity.resolve(system, native_id)
        if found:
            return found, []
    return None, ctx.identity.candidates(**(hints or {}))


def json_dumps(obj: Any) -> str:
    """JSON for printing events: bytes as base64 strings."""
    def default(o: Any) -> Any:
        if isinstance(o, bytes | bytearray):
            return base64.b64encode(bytes(o)).decode()
        raise TypeError(f"{type(o).__name__} is not JSON serializable")
    return json.dumps(obj, default=default, sort_keys=True)
