"""The ``hubspot`` target (CRM): ``update_deal_billing_status`` through ``hubspot-api-client``.

The deal (id = the deal id, HubSpot's numeric object id) gets the properties ``billing_status``,
``invoice_id`` and the guard properties ``concord_command_id = concord:<command_id>`` and
``concord_command_issued_at`` (ms). HubSpot has no idempotency key for updates, so the target reads the
deal first (``GET /crm/v3/objects/deals/{id}``): this command already there, or a newer one (larger
issued-at), means nothing is written (``duplicate``); otherwise one ``PATCH`` sets all four. Setting the
same values twice has one effect, so the rare race of two writers after the same read is harmless.

The access token (a private app's) comes from ``HUBSPOT_ACCESS_TOKEN`` only; ``HUBSPOT_API_BASE``
overrides ``https://api.hubapi.com``. The library's own retries are off: the consumer retries.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import urllib3
from hubspot import HubSpot
from hubspot.crm.deals import SimplePublicObjectInput
from hubspot.crm.deals.exceptions import ApiException

from connectors.outbound.base import (
    APPLIED,
    DUPLICATE,
    Command,
    FatalError,
    PermanentError,
    Result,
    TargetError,
    TransientError,
    check,
)

TYPES = frozenset({"update_deal_billing_status"})
PROPERTIES = {"billing_status": "billing_status", "invoice_id": "invoice_id", "command": "concord_command_id",
              "issued_at": "concord_command_issued_at"}
_DEAL_ID = re.compile(r"[0-9]{1,20}")


class HubSpotTarget:
    """CRM commands applied to HubSpot deals."""

    name = "hubspot"
    types = TYPES

    def __init__(self, access_token: str | None = None, host: str | None = None, timeout: float = 10.0,
                 properties: dict[str, str] | None = None) -> None:
        token = access_token or os.environ.get("HUBSPOT_ACCESS_TOKEN")
        if not token:
            raise FatalError("the hubspot target needs HUBSPOT_ACCESS_TOKEN in the environment")
        host = (host or os.environ.get("HUBSPOT_API_BASE") or "https://api.hubapi.com").rstrip("/")
        if not host.startswith(("http://", "https://")):
            raise FatalError(f"the HubSpot API base must be an http(s) URL, got {host!r}")
        self.where = host
        self.timeout = timeout
        self.props = {**PROPERTIES, **(properties or {})}
        self.client = HubSpot(access_token=token, host=host, retry=urllib3.Retry(total=0, redirect=0))
        self.deals = self.client.crm.deals.basic_api

    def apply(self, cmd: Command) -> Result:
        """Read the deal, then set its billing properties unless this or a newer command already did."""
        check(cmd, self.types, self.name)
        deal_id = str(cmd.payload["deal_id"])
        if not _DEAL_ID.fullmatch(deal_id):
            raise PermanentError(f"deal_id {deal_id!r} is not a HubSpot deal id (digits)")
        p = self.props
        try:
            deal = self.deals.get_by_id(deal_id, properties=[p["command"], p["issued_at"]],
                                        _request_timeout=self.timeout)
            have = deal.properties or {}
            if have.get(p["command"]) == cmd.marker or _ms(have.get(p["issued_at"])) > cmd.issued_at:
                return Result(DUPLICATE, deal_id)
            props = {p["billing_status"]: str(cmd.payload["billing_status"]),
                     p["invoice_id"]: str(cmd.payload.get("invoice_id") or ""),
                     p["command"]: cmd.marker, p["issued_at"]: str(cmd.issued_at)}
            self.deals.update(deal_id, SimplePublicObjectInput(properties=props), _request_timeout=self.timeout)
        except ApiException as exc:
            raise _classify(exc, cmd.type, deal_id) from None
        except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out
            raise TransientError(f"HubSpot did not answer {cmd.type} for deal {deal_id}: {exc}") from None
        return Result(APPLIED, deal_id)

    def close(self) -> None:
        """Nothing held open beyond the library's pool."""


def _ms(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _classify(exc: ApiException, what: str, deal_id: str) -> TargetError:
    status = exc.status or 0
    body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(exc.body or exc.reason or "")
    try:
        doc = json.loads(body)
        said = str(doc.get("message") or body) + (f" ({doc['category']})" if doc.get("category") else "")
    except (ValueError, AttributeError):
        said = body.strip()[:500]
    msg = f"HubSpot answered {status or 'nothing'} to {what} for deal {deal_id}: {said}"
    if status == 0 or status == 429 or status >= 500:
        retry_after = (exc.headers or {}).get("Retry-After")
        try:
            return TransientError(msg, float(retry_after) if retry_after else None)
        except ValueError:
            return TransientError(msg)
    if status in (401, 403):
        return FatalError(msg + " (check HUBSPOT_ACCESS_TOKEN and its scopes)")
    return PermanentError(msg)
