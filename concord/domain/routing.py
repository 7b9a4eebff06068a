"""Exception routing as configuration: reason code -> owner, backup owner, SLA, severity, billing hold."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from concord.contracts.topics import OWNERS
from concord.domain.yamlconf import load_model

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "config" / "routing.yaml"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SEVERITIES = ("low", "medium", "high", "critical")


def parse_duration(text: str) -> int:
    """Seconds in a duration such as 90s, 30m, 4h or 2d."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a duration like 90s, 30m, 4h or 2d")
    return int(m.group(1)) * _UNITS[m.group(2)]


class Route(BaseModel):
    """Where one reason code goes."""

    model_config = ConfigDict(extra="forbid")

    owner: str
    backup: str | None = None
    sla: str
    severity: str = "medium"
    blocks_billing: bool = False
    park_later_events: bool = False  # the entity's later events wait behind the exception, then replay in order

    @field_validator("owner", "backup")
    @classmethod
    def _known_owner(cls, v: str | None) -> str | None:
        if v is not None and v not in OWNERS:
            raise ValueError(f"owner {v!r} is not one of {list(OWNERS)}")
        return v

    @field_validator("sla")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v

    @field_validator("severity")
    @classmethod
    def _severity(cls, v: str) -> str:
        if v not in SEVERITIES:
            raise ValueError(f"severity {v!r} is not one of {list(SEVERITIES)}")
        return v

    @property
    def sla_seconds(self) -> float:
        """The SLA in seconds ($CONCORD_SLA_SCALE shrinks every SLA, for demos and tests)."""
        return parse_duration(self.sla) * float(os.environ.get("CONCORD_SLA_SCALE") or 1.0)


class Routing(BaseModel):
    """The whole routing file."""

    model_config = ConfigDict(extra="forbid")

    default: Route
    reasons: dict[str, Route]
    gap_owner_by_system: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _gap_owners(self) -> Routing:
        for system, owner in self.gap_owner_by_system.items():
            if owner not in OWNERS:
                raise ValueError(f"gap_owner_by_system.{system}: owner {owner!r} is not one of {list(OWNERS)}")
        return self

    def route_of(self, draft: dict[str, Any]) -> Route:
        """The route of an exception draft (sequence gaps go to the owner of the source's data)."""
        route = self.reasons.get(draft["reason_code"], self.default)
        if draft["reason_code"] == "sequence_gap" and draft.get("source_system") in self.gap_owner_by_system:
            route = route.model_copy(update={"owner": self.gap_owner_by_system[draft["source_system"]]})
        return route

    def parks(self, reason_code: str) -> bool:
        """Whether later events of an entity wait behind an open exception with this reason."""
        return self.reasons.get(reason_code, self.default).park_later_events

    def route(self, draft: dict[str, Any], now: int) -> dict[str, Any]:
        """A full exception record (schemas/exception.avsc) from a rule's draft."""
        r = self.route_of(draft)
        return {
            "exception_id": draft["exception_id"], "reason_code": draft["reason_code"], "state": "open",
            "owner": r.owner, "backup_owner": r.backup, "severity": r.severity, "blocks_billing": r.blocks_billing,
            "opened_at": draft.get("opened_at") or now, "sla_deadline": (draft.get("opened_at") or now)
            + int(r.sla_seconds * 1000), "updated_at": now, "trace_id": draft["trace_id"],
            "source_system": draft.get("source_system"), "entity_type": draft["entity_type"],
            "entity_id": draft["entity_id"], "customer_id": draft.get("customer_id"), "message": draft["message"],
            "suggestions": [{"field": s["field"], "value": str(s["value"]), "label": s.get("label", ""),
                             "score": float(s.get("score", 0.0))} for s in draft.get("suggestions", ())],
            "original": None, "resolution": None, "attempts": draft.get("attempts", 1),
            "amount_at_risk_cents": draft.get("amount_at_risk_cents"), "currency": draft.get("currency"),
        }


def sla_ran_out(record: dict[str, Any], now: int) -> bool:
    """Whether an exception is due for escalation: still with its owner (open or acknowledged) past its deadline."""
    return record["state"] in ("open", "acknowledged") and record["sla_deadline"] <= now


@lru_cache(maxsize=4)
def _load(path: str) -> Routing:
    return load_model(Path(path), Routing)


def load_routing(path: str | Path | None = None) -> Routing:
    """The routing file: ``path``, else $CONCORD_ROUTING, else the repository's concord/config/routing.yaml."""
    return _load(str(path or os.environ.get("CONCORD_ROUTING") or DEFAULT_PATH))
