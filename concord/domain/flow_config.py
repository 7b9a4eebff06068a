"""Flow policies, the catalog mapping and tolerances, loaded from concord/config/flows.yaml."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from concord.domain.yamlconf import load_model

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "config" / "flows.yaml"
BillingPolicy = Literal["on_close", "on_completion"]


class CatalogItem(BaseModel):
    """A CRM SKU's billing mapping."""

    model_config = ConfigDict(extra="forbid")

    price_id: str = Field(min_length=1)
    name: str = ""
    billable: bool = True


class Tolerance(BaseModel):
    """How far an invoice may differ from its lines before it is amount_mismatch."""

    model_config = ConfigDict(extra="forbid")

    cents: int = Field(100, ge=0)
    ratio: float = Field(0.01, ge=0, le=1)

    def exceeded(self, expected: int, actual: int) -> bool:
        """True when ``actual`` differs from ``expected`` by more than both the absolute and relative bound."""
        diff = abs(actual - expected)
        return diff > self.cents and diff > self.ratio * max(abs(expected), 1)


class BillingAccount(BaseModel):
    """An entry of the billing directory used for suggestions."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    email: str = ""


class FlowConfig(BaseModel):
    """Everything the flow rules take from configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_billing_policy: BillingPolicy = "on_close"
    cancelled_after_invoice: Literal["void_invoice", "exception"] = "void_invoice"
    amount_tolerance: Tolerance = Tolerance()
    on_time_invoice_hours: float = Field(48, gt=0)
    # Command type -> seconds the owning system has to show the change in its own feed; types not listed are
    # not followed to confirmation (no feed of that system reflects them).
    confirm_within_s: dict[str, float] = Field(default_factory=dict)
    won_unbilled_hours: float = Field(72, gt=0)
    # Seconds billing has to carry the CRM's customer master data (sent as update_customer) on what it issues.
    customer_sync_within_s: float = Field(3600, gt=0)
    overdue_invoice_exception: bool = False
    catalog: dict[str, CatalogItem]
    billing_directory: list[BillingAccount] = Field(default_factory=list)


@lru_cache(maxsize=4)
def _load(path: str) -> FlowConfig:
    return load_model(Path(path), FlowConfig)


def load_flow_config(path: str | Path | None = None) -> FlowConfig:
    """The flow configuration: ``path``, else $CONCORD_FLOWS, else concord/config/flows.yaml."""
    return _load(str(path or os.environ.get("CONCORD_FLOWS") or DEFAULT_PATH))
