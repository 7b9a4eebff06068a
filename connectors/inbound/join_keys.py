"""Join keys as configuration (connectors/config/join_keys.yaml): which field in each system names the others' ids."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from concord.domain.yamlconf import load_model
from connectors.inbound import common as c

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "config" / "join_keys.yaml"
ENV_VAR = "CONCORD_JOIN_KEYS"


class StripeKeys(BaseModel):
    """Stripe ``metadata`` keys."""

    model_config = ConfigDict(extra="forbid")
    customer_id: str
    deal_id: str
    job_id: str
    invoice_id: str
    attempt: str
    sku: str


class SalesforceKeys(BaseModel):
    """Salesforce Account fields holding the other systems' ids."""

    model_config = ConfigDict(extra="forbid")
    billing_account_id: str
    dispatch_account_id: str


class JobberKeys(BaseModel):
    """Jobber job custom fields."""

    model_config = ConfigDict(extra="forbid")
    customer_id: str
    deal_id: str
    cancelled: str = "concord_cancelled"  # Jobber has no cancelled status: a true/false custom field says so


class JoinKeys(BaseModel):
    """The whole join-key file."""

    model_config = ConfigDict(extra="forbid")
    stripe: StripeKeys
    salesforce: SalesforceKeys
    jobber: JobberKeys


def load(path: str | Path | None = None) -> JoinKeys:
    """The join keys: ``path``, else $CONCORD_JOIN_KEYS, else connectors/config/join_keys.yaml (file:line errors)."""
    return load_model(Path(path or os.environ.get(ENV_VAR) or DEFAULT_PATH), JoinKeys)


@lru_cache(maxsize=1)
def _default() -> JoinKeys:
    return load()


def of(ctx: c.Context) -> JoinKeys:
    """The join keys a mapping uses: the context's, else the configured file's."""
    return ctx.settings.get("join_keys") or _default()
