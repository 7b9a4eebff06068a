"""The ``salesforce`` target (CRM): ``update_deal_billing_status`` through ``simple-salesforce``.

The Opportunity (id = the deal id) gets ``Billing_Status__c``, ``Invoice_Id__c``, and the guard fields
``Concord_Command_Id__c = concord:<command_id>`` and ``Concord_Command_Issued_At__c`` (ms). Salesforce has
no idempotency key, so the target reads the Opportunity first:

- its ``Concord_Command_Id__c`` is this command: already applied, nothing is written (``duplicate``);
- a newer command (larger issued-at) already wrote it: this one is superseded and skipped (``duplicate``),
  so a redelivered "invoiced" never overwrites "paid";
- otherwise one PATCH with ``If-Unmodified-Since`` = the ``LastModifiedDate`` just read: a concurrent
  writer makes Salesforce answer 412, a transient error, and the retry reads the record again.

The PATCH carries ``Sforce-Call-Options: client=concord:<command_id>``, which Change Data Capture reports
as ``changeOrigin``, so the inbound connector recognises the echo. Credentials come from the environment
only: ``SALESFORCE_INSTANCE_URL`` + ``SALESFORCE_SESSION_ID`` (an OAuth access token), or
``SALESFORCE_USERNAME`` + ``SALESFORCE_PASSWORD`` + ``SALESFORCE_SECURITY_TOKEN`` (``SALESFORCE_DOMAIN``
``login`` / ``test``). ``SALESFORCE_API_VERSION`` picks the REST version.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from email.utils import format_datetime
from typing import Any

import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceError

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
FIELDS = {"billing_status": "Billing_Status__c", "invoice_id": "Invoice_Id__c",
          "command": "Concord_Command_Id__c", "issued_at": "Concord_Command_Issued_At__c"}
_SF_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
# errorCodes that mean "try again", whatever the status (Salesforce answers API limits with 403)
_TRANSIENT_CODES = {"REQUEST_LIMIT_EXCEEDED", "UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE", "API_CURRENTLY_DISABLED"}


class _TimeoutSession(requests.Session):
    """A requests session with a default timeout (simple-salesforce's update() takes none) and CA bundle."""

    def __init__(self, timeout: float, verify: bool | str) -> None:
        super().__init__()
        self.timeout = timeout
        self.verify = verify

    def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        if self.verify is not True:  # per request, or REQUESTS_CA_BUNDLE would win over the session's bundle
            kwargs.setdefault("verify", self.verify)
        return super().request(method, url, *args, **kwargs)


class SalesforceTarget:
    """CRM commands applied to Salesforce Opportunities."""

    name = "salesforce"
    types = TYPES

    def __init__(self, instance_url: str | None = None, session_id: str | None = None, version: str | None = None,
                 timeout: float = 10.0, verify: bool | str = True, fields: dict[str, str] | None = None) -> None:
        env = os.environ
        self.fields = {**FIELDS, **(fields or {})}
        session = _TimeoutSession(timeout, verify)
        opts: dict[str, Any] = {"session": session}
        version = version or env.get("SALESFORCE_API_VERSION")
        if version:
            opts["version"] = version
        instance_url = instance_url or env.get("SALESFORCE_INSTANCE_URL")
        session_id = session_id or env.get("SALESFORCE_SESSION_ID")
        try:
            if instance_url and session_id:
                self.sf = Salesforce(instance_url=instance_url, session_id=session_id, **opts)
            elif env.get("SALESFORCE_USERNAME") and env.get("SALESFORCE_PASSWORD"):
                self.sf = Salesforce(username=env["SALESFORCE_USERNAME"], password=env["SALESFORCE_PASSWORD"],
                                     security_token=env.get("SALESFORCE_SECURITY_TOKEN", ""),
                                     domain=env.get("SALESFORCE_DOMAIN") or None, **opts)
            else:
                raise FatalError("the salesforce target needs SALESFORCE_INSTANCE_URL and SALESFORCE_SESSION_ID, "
                                 "or SALESFORCE_USERNAME, SALESFORCE_PASSWORD and SALESFORCE_SECURITY_TOKEN")
        except SalesforceError as exc:  # the username / password login was refused
            raise FatalError(f"Salesforce login failed: {exc}") from None
        except requests.RequestException as exc:
            raise FatalError(f"Salesforce login did not answer: {exc}") from None
        self.where = f"https://{self.sf.sf_instance}"

    def apply(self, cmd: Command) -> Result:
        """Read the Opportunity, then write the status unless this or a newer command already did."""
        check(cmd, self.types, self.name)
        deal_id = str(cmd.payload["deal_id"])
        if not _SF_ID.fullmatch(deal_id):
            raise PermanentError(f"deal_id {deal_id!r} is not a Salesforce Opportunity id")
        f = self.fields
        opp: Any = self.sf.Opportunity  # SFType, reached through __getattr__
        try:
            current = opp.get(deal_id, params={"fields": ",".join([f["command"], f["issued_at"], "LastModifiedDate"])})
            if current.get(f["command"]) == cmd.marker:
                return Result(DUPLICATE, deal_id)
            if _ms(current.get(f["issued_at"])) > cmd.issued_at:
                return Result(DUPLICATE, deal_id)  # superseded: a newer command already set the status
            data = {f["billing_status"]: cmd.payload["billing_status"], f["invoice_id"]: cmd.payload.get("invoice_id"),
                    f["command"]: cmd.marker, f["issued_at"]: cmd.issued_at}
            headers = {"Sforce-Call-Options": f"client={cmd.marker}"}
            since = _http_date(current.get("LastModifiedDate"))
            if since:
                headers["If-Unmodified-Since"] = since
            opp.update(deal_id, data, headers=headers)
        except SalesforceError as exc:
            raise _classify(exc, cmd.type, deal_id) from None
        except requests.RequestException as exc:
            raise TransientError(f"Salesforce did not answer {cmd.type} for {deal_id}: {exc}") from None
        return Result(APPLIED, deal_id)

    def close(self) -> None:
        """Close the HTTP session."""
        self.sf.session.close()


def _ms(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _http_date(value: Any) -> str | None:
    """Salesforce's ``2024-05-01T10:00:00.000+0000`` as an HTTP date for If-Unmodified-Since."""
    if not isinstance(value, str):
        return None
    try:
        return format_datetime(datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%f%z"), usegmt=True)
    except ValueError:
        return None


def _said(content: Any) -> tuple[str, str]:
    """(errorCode, message) from Salesforce's ``[{"message": …, "errorCode": …}]`` error body."""
    if isinstance(content, list) and content and isinstance(content[0], dict):
        errors = [e for e in content if isinstance(e, dict)]
        return (str(errors[0].get("errorCode") or ""),
                "; ".join(str(e.get("message") or e.get("errorCode") or e) for e in errors))
    if isinstance(content, bytes):
        content = content.decode("utf-8", "replace")
    return "", str(content or "").strip()[:500]


def _classify(exc: SalesforceError, what: str, deal_id: str) -> TargetError:
    status = exc.status
    code, said = _said(exc.content)
    msg = f"Salesforce answered {status} to {what} for Opportunity {deal_id}" + (f" ({code})" if code else "") + \
        f": {said}"
    if code in _TRANSIENT_CODES or status in (412, 429) or status >= 500:  # 412: changed since we read it
        return TransientError(msg)
    if status in (401, 403):
        return FatalError(msg + " (check SALESFORCE_SESSION_ID or the integration user's access)")
    return PermanentError(msg)
