"""The Target interface: one backend per owning system, the errors it raises, and payload checks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

APPLIED = "applied"
DUPLICATE = "duplicate"

# Fields each command type's payload must carry (concord/domain/rules.py builds them).
REQUIRED: dict[str, tuple[str, ...]] = {
    "create_invoice": ("customer_id", "lines", "amount_cents"),
    "create_job": ("deal_id", "customer_id"),
    "update_deal_billing_status": ("deal_id", "billing_status"),
    "void_invoice": ("invoice_id",),
    "update_customer": ("customer_id",),
    "hold_billing": ("exception_id", "reason_code"),  # an overdue exception blocks billing of the entity
    "release_billing_hold": ("exception_id",),
}


class TargetError(Exception):
    """Root of the errors a target raises while applying a command."""


class TransientError(TargetError):
    """The target could not answer now (network error, 429, 5xx): retry the same command later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(TargetError):
    """The target refused the command (4xx other than 429, invalid payload): retrying will not help."""


class FatalError(TargetError):
    """The adapter itself is misconfigured (bad credentials, no such account): stop without committing."""


@dataclass(frozen=True)
class Command:
    """A decoded command with its payload parsed."""

    command_id: str
    type: str
    target_system: str
    entity_type: str
    entity_id: str
    customer_id: str | None
    payload: dict[str, Any]
    trace_id: str
    issued_at: int
    caused_by: list[str] = field(default_factory=list)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Command:
        """Parse a ``command`` Avro record; PermanentError when its payload is not a JSON object."""
        try:
            payload = json.loads(rec["payload"])
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"payload is not JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise PermanentError(f"payload is a JSON {type(payload).__name__}, not an object")
        return cls(rec["command_id"], rec["type"], rec["target_system"], rec.get("entity_type") or "",
                   rec.get("entity_id") or "", rec.get("customer_id"), payload, rec.get("trace_id") or "",
                   int(rec["issued_at"]), list(rec.get("caused_by") or ()))

    @property
    def marker(self) -> str:
        """How a change made for this command is marked so its echo is recognised (connectors/README.md)."""
        return f"concord:{self.command_id}"


@dataclass(frozen=True)
class Result:
    """What applying a command did: ``applied`` or ``duplicate`` (already applied), and the object touched."""

    outcome: str
    ref: str = ""


class Target(Protocol):
    """A backend that applies commands to one owning system, exactly once per ``command_id``."""

    name: str
    types: frozenset[str]

    def apply(self, cmd: Command) -> Result:
        """Apply ``cmd``; raise TransientError, PermanentError or FatalError when it cannot."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def check(cmd: Command, types: frozenset[str], target: str) -> None:
    """PermanentError unless ``target`` handles ``cmd.type`` and the payload has every required field."""
    if cmd.type not in types:
        raise PermanentError(f"the {target} target does not handle {cmd.type!r} (it handles {sorted(types)})")
    missing = [f for f in REQUIRED.get(cmd.type, ()) if cmd.payload.get(f) in (None, "")]
    if missing:
        raise PermanentError(f"{cmd.type} payload is missing {', '.join(missing)}")
    if cmd.type == "create_invoice":
        lines = cmd.payload["lines"]
        if not isinstance(lines, list) or not lines:
            raise PermanentError("create_invoice payload has no lines")
        for i, ln in enumerate(lines):
            if not isinstance(ln, dict) or not isinstance(ln.get("quantity"), int) or ln["quantity"] <= 0 \
                    or not isinstance(ln.get("unit_price_cents"), int) or ln["unit_price_cents"] < 0:
                raise PermanentError(f"create_invoice line {i} needs a positive integer quantity and "
                                     f"non-negative integer unit_price_cents, got {ln!r}")
