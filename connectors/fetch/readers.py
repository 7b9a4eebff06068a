"""Vendor API readers: one record by type and id, failures sorted into transient and permanent.

Stripe through the official ``stripe`` library (``STRIPE_API_KEY``; ``STRIPE_API_BASE`` points it at another
host), Salesforce through ``simple-salesforce`` (``SALESFORCE_INSTANCE_URL`` + ``SALESFORCE_SESSION_ID``),
HubSpot through ``hubspot-api-client`` (``HUBSPOT_ACCESS_TOKEN``; ``HUBSPOT_API_BASE``), Jobber's GraphQL API
over HTTP (``JOBBER_ACCESS_TOKEN``; ``JOBBER_API_URL``). A 429 (with its ``Retry-After``), Salesforce's
``REQUEST_LIMIT_EXCEEDED``, a 5xx, a timeout or a refused connection is transient; a 401/403, a 404 or a
record the API says does not exist is permanent.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

import stripe

JOBBER_API_URL = "https://api.getjobber.com/api/graphql"
JOBBER_VERSION = "2025-01-20"  # the X-JOBBER-GRAPHQL-VERSION the query below was written against
TIMEOUT_S = 10.0


class ReadError(Exception):
    """A record could not be read."""


class TransientReadError(ReadError):
    """The API could not answer now (429, 5xx, timeout): try again, after ``retry_after`` seconds if given."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentReadError(ReadError):
    """The API refused for good (401, 403, 404, deleted record): retrying will not help."""


def _retry_after(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class StripeReader:
    """Reads invoices, PaymentIntents and customers with the ``stripe`` library."""

    vendor = "stripe"
    _RESOURCES = {"invoice": "invoices", "payment": "payment_intents", "customer": "customers"}

    def __init__(self, api_key: str | None = None, api_base: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
        key = api_key or os.environ.get("STRIPE_API_KEY")
        if not key:
            raise PermanentReadError("STRIPE_API_KEY is not set")
        base = api_base or os.environ.get("STRIPE_API_BASE")
        self.client = stripe.StripeClient(key, base_addresses={"api": base.rstrip("/")} if base else None,
                                          http_client=stripe.RequestsClient(timeout=timeout_s),
                                          max_network_retries=0)  # the fetcher owns retries and their backoff

    def read(self, entity_type: str, entity_id: str, _hint: str = "") -> dict[str, Any]:
        """The object as the API returns it (a plain dict)."""
        if entity_type not in self._RESOURCES:
            raise PermanentReadError(f"Stripe has no {entity_type} to read")
        service = getattr(self.client, self._RESOURCES[entity_type])
        try:
            obj = service.retrieve(entity_id)
        except stripe.RateLimitError as exc:
            raise TransientReadError(f"Stripe 429: {exc.user_message or exc}",
                                     _retry_after((exc.headers or {}).get("Retry-After"))) from None
        except stripe.APIConnectionError as exc:
            raise TransientReadError(f"Stripe unreachable: {exc.user_message or exc}") from None
        except stripe.StripeError as exc:
            status = exc.http_status
            if status is None or status >= 500:
                raise TransientReadError(f"Stripe {status}: {exc.user_message or exc}",
                                         _retry_after((exc.headers or {}).get("Retry-After"))) from None
            raise PermanentReadError(f"Stripe {status}: {exc.user_message or exc}") from None
        return obj.to_dict()


_JOB_FIELDS = ("id jobStatus startAt completedAt client { id name emails { address } } "
               "lineItems { nodes { name description quantity unitPrice } } "
               "customFields { ... on CustomFieldText { label valueText } "
               "... on CustomFieldTrueFalse { label valueTrueFalse } }")
JOB_QUERY = f"query Job($id: EncodedId!) {{ job(id: $id) {{ {_JOB_FIELDS} }} }}"
VISIT_QUERY = f"query VisitJob($id: EncodedId!) {{ visit(id: $id) {{ job {{ {_JOB_FIELDS} }} }} }}"


class JobberReader:
    """Reads a job (or a visit's job) through Jobber's GraphQL API."""

    vendor = "jobber"

    def __init__(self, token: str | None = None, url: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
        self.token = token or os.environ.get("JOBBER_ACCESS_TOKEN")
        if not self.token:
            raise PermanentReadError("JOBBER_ACCESS_TOKEN is not set")
        self.url = url or os.environ.get("JOBBER_API_URL") or JOBBER_API_URL
        self.timeout_s = timeout_s

    def read(self, entity_type: str, entity_id: str, change_type: str = "") -> dict[str, Any]:
        """The job record (GraphQL ``job``; for a VISIT_COMPLETE notice, the visit's ``job``)."""
        if entity_type != "job":
            raise PermanentReadError(f"Jobber has no {entity_type} to read")
        visit = change_type.upper() == "VISIT_COMPLETE"
        body = json.dumps({"query": VISIT_QUERY if visit else JOB_QUERY, "variables": {"id": entity_id}}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
            "X-JOBBER-GRAPHQL-VERSION": JOBBER_VERSION})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                doc = json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if exc.code == 429 or exc.code >= 500:
                raise TransientReadError(f"Jobber {exc.code}", _retry_after(exc.headers.get("Retry-After"))) from None
            raise PermanentReadError(f"Jobber {exc.code}: {exc.read()[:200].decode(errors='replace')}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise TransientReadError(f"Jobber unreachable: {getattr(exc, 'reason', exc)}") from None
        except ValueError:
            raise TransientReadError("Jobber answered with something that is not JSON") from None
        for err in doc.get("errors") or []:
            if (err.get("extensions") or {}).get("code") == "THROTTLED":
                raise TransientReadError("Jobber THROTTLED", _throttle_wait(doc))
        node = (doc.get("data") or {}).get("visit" if visit else "job")
        job = (node or {}).get("job") if visit else node
        if not job:
            why = "; ".join(str(e.get("message")) for e in doc.get("errors") or []) or "no such record"
            raise PermanentReadError(f"Jobber {'visit' if visit else 'job'} {entity_id}: {why}")
        return job


def _throttle_wait(doc: dict[str, Any]) -> float | None:
    """Seconds until Jobber's query-cost bucket holds the cost again (extensions.cost.throttleStatus)."""
    cost = (doc.get("extensions") or {}).get("cost") or {}
    status = cost.get("throttleStatus") or {}
    try:
        missing = float(cost.get("requestedQueryCost", 0)) - float(status.get("currentlyAvailable", 0))
        rate = float(status.get("restoreRate") or 0)
    except (TypeError, ValueError):
        return None
    return max(0.0, missing / rate) if rate > 0 else None


DEAL_PROPERTIES = ["dealname", "dealstage", "amount", "closedate", "deal_currency_code", "billing_status",
                   "concord_line_items"]
COMPANY_PROPERTIES = ["name", "domain", "billing_email", "billing_account_id", "billing_terms", "billing_policy",
                      "address"]


class HubSpotReader:
    """Reads deals (with their associated companies) and companies through ``hubspot-api-client``."""

    vendor = "hubspot"

    def __init__(self, token: str | None = None, host: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
        import urllib3
        from hubspot import HubSpot

        token = token or os.environ.get("HUBSPOT_ACCESS_TOKEN")
        if not token:
            raise PermanentReadError("HUBSPOT_ACCESS_TOKEN is not set")
        host = (host or os.environ.get("HUBSPOT_API_BASE") or "https://api.hubapi.com").rstrip("/")
        self.client = HubSpot(access_token=token, host=host, retry=urllib3.Retry(total=0, redirect=0))
        self.timeout_s = timeout_s

    def read(self, entity_type: str, entity_id: str, _change_type: str = "") -> dict[str, Any]:
        """``{"id", "properties", "associations": {"companies": [ids]}}`` of one deal or company."""
        import urllib3

        if entity_type == "deal":
            api, props, assoc = self.client.crm.deals.basic_api, DEAL_PROPERTIES, ["companies"]
        elif entity_type == "customer":
            api, props, assoc = self.client.crm.companies.basic_api, COMPANY_PROPERTIES, None
        else:
            raise PermanentReadError(f"HubSpot has no {entity_type} to read")
        try:
            kwargs: dict[str, Any] = {"properties": props, "_request_timeout": self.timeout_s}
            if assoc:
                kwargs["associations"] = assoc
            obj = api.get_by_id(entity_id, **kwargs).to_dict()
        except urllib3.exceptions.HTTPError as exc:
            raise TransientReadError(f"HubSpot unreachable: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - each object API raises its own ApiException class
            status = getattr(exc, "status", None)
            if status is None:
                raise
            raise _hubspot_error(exc, status) from None
        companies = (((obj.get("associations") or {}).get("companies") or {}).get("results")) or []
        updated = obj.get("updated_at")
        return {"id": str(obj.get("id")), "properties": obj.get("properties") or {},
                "updatedAt": updated.isoformat() if hasattr(updated, "isoformat") else updated,
                "associations": {"companies": [str(x.get("id")) for x in companies if x.get("id")]}}


def _hubspot_error(exc: Exception, status: int) -> ReadError:
    body = getattr(exc, "body", None)
    try:
        doc = json.loads(body) if body else {}
    except (TypeError, ValueError):
        doc = {}
    said = f"HubSpot {status}: {doc.get('message') or getattr(exc, 'reason', '')}"
    if status == 429:
        # the per-second policies refill within a second; HubSpot sends no Retry-After for them
        hint = _retry_after((getattr(exc, "headers", None) or {}).get("Retry-After"))
        # SECONDLY refills within a second; TEN_SECONDLY_ROLLING (the private-app burst limit) within ten
        window = {"SECONDLY": 1.0, "TEN_SECONDLY_ROLLING": 10.0}.get(str(doc.get("policyName") or "").upper())
        return TransientReadError(said, hint if hint is not None else window)
    if status == 0 or status >= 500:
        return TransientReadError(said)
    return PermanentReadError(said)


class SalesforceReader:
    """Reads Accounts and Opportunities through ``simple-salesforce`` (a session, or username and password)."""

    vendor = "salesforce"
    _OBJECTS = {"customer": "Account", "deal": "Opportunity"}
    _TRANSIENT = {"REQUEST_LIMIT_EXCEEDED", "SERVER_UNAVAILABLE", "API_CURRENTLY_DISABLED", "UNABLE_TO_LOCK_ROW"}

    def __init__(self, instance_url: str | None = None, session_id: str | None = None, version: str | None = None,
                 timeout_s: float = TIMEOUT_S, verify: bool | str = True) -> None:
        from simple_salesforce import Salesforce

        from connectors.outbound.salesforce_target import _TimeoutSession

        env = os.environ
        instance_url = instance_url or env.get("SALESFORCE_INSTANCE_URL")
        session_id = session_id or env.get("SALESFORCE_SESSION_ID")
        if not (instance_url and session_id):
            raise PermanentReadError("set SALESFORCE_INSTANCE_URL and SALESFORCE_SESSION_ID")
        opts: dict[str, Any] = {"session": _TimeoutSession(timeout_s, verify)}
        if version or env.get("SALESFORCE_API_VERSION"):
            opts["version"] = version or env["SALESFORCE_API_VERSION"]
        self.sf = Salesforce(instance_url=instance_url, session_id=session_id, **opts)

    def read(self, entity_type: str, entity_id: str, _change_type: str = "") -> dict[str, Any]:
        """The record's fields as the REST API returns them."""
        name = self._OBJECTS.get(entity_type)
        if name is None:
            raise PermanentReadError(f"Salesforce has no {entity_type} to read")
        return self._call(lambda: dict(getattr(self.sf, name).get(entity_id)))

    def changed_since(self, entity_type: str, since_ms: int, fields: list[str]) -> list[dict[str, Any]]:
        """Every record of the type modified at or after ``since_ms`` (SOQL on SystemModstamp, all pages)."""
        from connectors.inbound.common import iso_ms

        name = self._OBJECTS.get(entity_type)
        if name is None:
            raise PermanentReadError(f"Salesforce has no {entity_type} to resync")
        soql = (f"SELECT Id, {', '.join(fields)} FROM {name} WHERE SystemModstamp >= {iso_ms(since_ms)} "
                "ORDER BY SystemModstamp, Id")
        return self._call(lambda: [dict(r) for r in self.sf.query_all(soql)["records"]])

    def _call(self, fn: Any) -> Any:
        import requests
        from simple_salesforce.exceptions import SalesforceError

        try:
            return fn()
        except SalesforceError as exc:
            content = exc.content if isinstance(exc.content, list) else [exc.content]
            codes = {str((e or {}).get("errorCode")) for e in content if isinstance(e, dict)}
            messages = "; ".join(str(e.get("message")) for e in content if isinstance(e, dict))
            said = f"Salesforce {exc.status}: {messages}"
            if exc.status >= 500 or codes & self._TRANSIENT:
                raise TransientReadError(said) from None
            raise PermanentReadError(said) from None
        except requests.RequestException as exc:
            raise TransientReadError(f"Salesforce unreachable: {exc}") from None
