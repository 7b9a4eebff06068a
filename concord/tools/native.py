"""The simulator's business in the vendors' own formats, fed through the real inbound connectors.

``NativeFeed`` turns the simulator's canonical history into what the owning systems would have sent:

- CRM customers and deals: Salesforce Change Data Capture events (``AccountChangeEvent``,
  ``OpportunityChangeEvent``) as CometD messages with a ``replayId`` and a full ``ChangeEventHeader``
  (commitNumber, commitTimestamp, transactionKey, sequenceNumber, changedFields). The channel is enriched
  (Salesforce event enrichment) with the fields Concord maps, so an UPDATE carries the whole record;
  ``changedFields`` names what really changed. Deal lines ride in the ``Line_Items__c`` field.
- jobs: Debezium change events of the dispatch database's ``public.jobs`` table (op c / u with ``before``,
  source.lsn, txId, timestamps in µs).
- invoices and payments: Stripe events (``invoice.created|finalized|paid|voided``,
  ``payment_intent.succeeded|payment_failed``).

Ids are stable native ids (``001…`` accounts, ``006…`` opportunities, ``cus_…``, ``in_…``, ``pi_…``) and the
links are the ones real records carry, so the connectors' identity resolution maps them to one Concord
customer (the Salesforce account id): the Account's ``Billing_Account_Id__c`` is the Stripe customer
id, its ``Dispatch_Account_Id__c`` the ``account_ref`` of its jobs.

Faults (same rates as the canonical simulator): a delivered twice (dropped by the connector's dedupe), a
delivery repeated after a connector restart (its dedupe memory is gone, so the ordering guard drops it),
two changes of one record swapped, native bytes that do not decode, records that break the connector's
contract, and Salesforce gap events (``GAP_UPDATE``: a change without field data).

``ingest`` then runs every record through ``connectors.inbound.ingest.normalize`` and ``Publisher`` — the code
path of ``concord ingest`` — and accounts for each one: published (with where its canonical events
landed), duplicate, rejected or gap (with where its dead letter landed), skipped.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from concord.contracts.codec import Codec
from concord.contracts.topics import Deployment
from concord.exceptions import ConcordError
from concord.tools.simulator import Published, Simulator
from connectors.fetch import fakes
from connectors.fetch.fetcher import Fetcher, Notice, publish_fetched
from connectors.inbound import common as c
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import Batch, Deduper, Publisher, normalize

_ID = re.compile(r"(?P<kind>cust|deal|job|inv|pay)-(?P<n>\d+)(?:-(?P<d>\d+))?$")
CONNECTOR_OUTCOMES = ("published", "fetched", "duplicate", "rejected", "gap", "skipped")
STRIPE_2024 = "2024-06-20"
STRIPE_CURRENT = "2025-03-31.basil"


@dataclass(frozen=True)
class Stack:
    """Which vendor plays each system, and how Stripe speaks."""

    crm: str  # salesforce | hubspot
    dispatch: str  # debezium | jobber
    stripe_version: str
    thin_invoices: bool = False  # invoice events reach Concord as thin events (an event destination)

    @property
    def basil(self) -> bool:
        """Stripe 2025-03-31 or later: a PaymentIntent names no invoice; InvoicePayment links them."""
        return self.stripe_version >= "2025-03-31"

    @property
    def sources(self) -> tuple[str, ...]:
        """The connectors this stack feeds."""
        return (self.crm, self.dispatch, "stripe")


STACKS = {
    "salesforce-debezium-stripe": Stack("salesforce", "debezium", STRIPE_2024),
    "salesforce-jobber-stripe": Stack("salesforce", "jobber", STRIPE_CURRENT, thin_invoices=True),
    "hubspot-debezium-stripe": Stack("hubspot", "debezium", STRIPE_2024),
}
DEFAULT_STACK = "salesforce-debezium-stripe"


def overtaken_deal_creations(records: list[NativeRecord]) -> int:
    """HubSpot deals whose change was delivered ahead of the deal's creation (the plan swapped them)."""
    created: set[str] = set()
    overtaken: set[str] = set()
    for r in records:
        if r.source != "hubspot" or not r.entity.startswith("hs:7"):
            continue
        if b'"deal.creation"' in r.raw:
            created.add(r.entity)
        elif r.entity not in created and b'.propertyChange"' in r.raw:
            overtaken.add(r.entity)
    return len(overtaken)


def expected_exceptions(canonical: dict[str, int], stack: str | Stack, overtaken: int = 0) -> dict[str, int]:
    """The exceptions (``owner/reason`` -> count) a stack's run must open, given the canonical run's on one business.

    What the vendors cannot carry, stated exactly: no native feed numbers a record's changes contiguously, so a
    lost change raises no ``sequence_gap`` (the change is lost alike, the rest applies); on Stripe 2025-03-31 a
    PaymentIntent names no invoice and a failed one gets no InvoicePayment, so its failure is a
    ``payment_without_invoice`` (same owner) instead of a ``payment_failed``; a HubSpot property change names
    no company, so a deal change that overtakes the deal's creation (``overtaken``) is an ``unknown_customer``
    until the creation's fetch gives the deal its company.
    """
    st = STACKS[stack] if isinstance(stack, str) else stack
    out: Counter = Counter()
    for key, n in canonical.items():
        owner, _, reason = key.partition("/")
        if reason == "sequence_gap":
            continue
        if st.basil and reason == "payment_failed":
            reason = "payment_without_invoice"
        out[f"{owner}/{reason}"] += n
    if st.crm == "hubspot" and overtaken:
        out["revenue-ops/unknown_customer"] += overtaken
    return dict(out)


def _h(text: str, n: int = 14) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _gid(kind: str, n: int) -> str:
    """A Jobber EncodedId: base64 of ``gid://Jobber/<Kind>/<n>``."""
    return base64.b64encode(f"gid://Jobber/{kind}/{n}".encode()).decode()


def native_ids(entity_id: str) -> dict[str, str]:
    """The native ids behind a simulator id (``cust-0003``, ``deal-0003-1``, ...)."""
    m = _ID.search(entity_id)
    if not m:
        raise ValueError(f"not a simulator id: {entity_id!r}")
    n, d = int(m["n"]), int(m["d"] or 0)
    return {"account": f"001Sim{n:012d}", "stripe_customer": f"cus_Sim{n:06d}", "dispatch_client": f"CL-{n:05d}",
            "deal": f"006Sim{n:09d}{d:03d}", "job": f"J-{n:05d}-{d}", "invoice": f"in_1Sim{n:06d}{d:02d}",
            "payment": f"pi_3Sim{n:06d}{d:02d}", "hs_company": str(5_100_000_000 + n),
            "hs_deal": str(7_300_000_000 + n * 1000 + d), "jobber_job": _gid("Job", 40_000 + n * 100 + d),
            "jobber_client": _gid("Client", 9_000 + n)}


@dataclass
class NativeRecord:
    """One native record as a vendor would deliver it to a connector."""

    source: str  # the connector: salesforce, hubspot, stripe, debezium, jobber
    raw: bytes
    fault: str | None
    customer_id: str | None  # the Concord customer it is about (the CRM's account / company id)
    entity: str = ""  # native entity key, for reordering
    restart: bool = False  # delivered after a connector restart: the connector's dedupe memory is empty
    serves: list[tuple[str, str, int, dict[str, Any]]] = field(default_factory=list)
    # (vendor, record id, when, the record as the vendor's API returns it after this change)


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_JOBBER_STATUS = {"scheduled": "upcoming", "dispatched": "today", "completed": "requires_invoicing",
                  "cancelled": "archived"}  # Jobber has no cancelled status: a custom field says so
_HS_STAGE = {"open": "appointmentscheduled", "closed_won": "closedwon", "closed_lost": "closedlost"}


class NativeFeed:
    """A simulator's history as the stack's vendors would send it, with the canonical plan's faults."""

    def __init__(self, sim: Simulator, stack: str | Stack = DEFAULT_STACK) -> None:
        self.sim = sim
        self.stack = STACKS[stack] if isinstance(stack, str) else stack
        self.faults = sim.faults
        self._replay = 4_000_000
        self._commit = 10_000_000_000
        self._lsn = 24_000_000
        self._hs_event = 100_000
        self._prev: dict[str, Any] = {}  # native entity -> its last native state
        self.canonical: dict[str, str] = {}  # native deal / invoice / payment id -> the simulator's id

    def _ids(self, entity_id: str) -> dict[str, str]:
        ids = native_ids(entity_id)
        kind = _ID.search(entity_id)["kind"]  # type: ignore[index]
        native = {"deal": self.deal_id(entity_id), "inv": ids["invoice"], "pay": ids["payment"]}.get(kind)
        if native:
            self.canonical[native] = entity_id
        return ids

    def deal_id(self, sim_deal: str) -> str:
        """The CRM's id of a simulator deal."""
        return native_ids(sim_deal)["hs_deal" if self.stack.crm == "hubspot" else "deal"]

    def customer_of(self, sim_customer: str | None) -> str | None:
        """The Concord customer id of a simulator customer: the CRM's account (or company) id."""
        if not sim_customer:
            return None
        return native_ids(sim_customer)["hs_company" if self.stack.crm == "hubspot" else "account"]

    def to_canonical(self, native_id: str) -> str:
        """The simulator id behind a native deal, invoice or payment id (itself when not one of those)."""
        return self.canonical.get(native_id, native_id)

    # ---------------------------------------------------------------- clean records

    def _plan(self) -> list[tuple[Any, str | None]]:
        """The canonical simulator's delivery plan: (event, or None for undecodable bytes, and its fault)."""
        return [(p.event, p.fault) for p in self.sim.records()]

    def clean(self) -> list[NativeRecord]:
        """Every canonical event of the history as the owning system's native records, in time order."""
        return [r for e in sorted(self.sim.history(), key=lambda e: (e["occurred_at"], e["entity_id"], e["seq"]))
                for r in self._native(e, e["occurred_at"])]

    def _native(self, e: dict[str, Any], at: int) -> list[NativeRecord]:
        ids = self._ids(e["entity_id"])
        cid = self.customer_of(e["customer_id"])
        kind = e["entity_type"]
        if kind in ("customer", "deal"):
            return [self._hubspot(e, at, ids, cid) if self.stack.crm == "hubspot" else
                    self._salesforce(e, at, ids, cid)]
        if kind == "job":
            return [self._jobber(e, at, ids, cid) if self.stack.dispatch == "jobber" else
                    self._debezium(e, at, ids, cid)]
        return self._stripe(e, at, ids, cid)

    def _salesforce(self, e: dict[str, Any], at: int, ids: dict[str, str], cid: str | None) -> NativeRecord:
        p = e["payload"]
        if e["entity_type"] == "customer":
            entity, rid = "Account", ids["account"]
            fields = {"Name": p["name"], "Email__c": p["email"], "Website": f"https://www.{p['email'].split('@')[1]}",
                      "Billing_Account_Id__c": ids["stripe_customer"] if p["billing_account_id"] else None,
                      "Billing_Terms__c": p["billing_terms"], "Billing_Policy__c": p["billing_policy"],
                      "BillingAddress": {"Street": p["billing_address"], "City": "Springfield", "Country": "US"},
                      "Dispatch_Account_Id__c": ids["dispatch_client"]}
        else:
            entity, rid = "Opportunity", ids["deal"]
            stage = p["stage"]
            fields = {"Name": p["name"], "AccountId": cid,
                      "StageName": {"open": "Prospecting", "closed_won": "Closed Won",
                                    "closed_lost": "Closed Lost"}[stage],
                      "IsClosed": stage != "open", "IsWon": stage == "closed_won",
                      "Amount": p["amount_cents"] / 100, "CurrencyIsoCode": p["currency"],
                      "CloseDate": _iso(p["closed_at"] or at)[:10],
                      "Line_Items__c": json.dumps([{"ProductCode": ln["sku"], "Quantity": ln["quantity"],
                                                    "UnitPrice": ln["unit_price_cents"] / 100,
                                                    "Description": ln["description"]} for ln in p["lines"]])}
        prev = self._prev.get(rid)
        change = "CREATE" if prev is None else "UPDATE"
        changed = sorted(k for k in fields if prev is not None and prev.get(k) != fields[k])
        self._prev[rid] = fields
        self._replay += 1
        self._commit += 7
        header = {"entityName": entity, "recordIds": [rid], "changeType": change,
                  "changeOrigin": "com/salesforce/api/rest/60.0;client=simulator", "transactionKey":
                  f"{_h(e['event_id'], 8)}-{_h(rid, 4)}-{_h(str(at), 4)}-0000-{_h(e['event_id'] + 'tx', 12)}",
                  "sequenceNumber": 1, "commitTimestamp": at, "commitNumber": self._commit,
                  "commitUser": "005Sim000000000001", "changedFields": changed, "nulledFields": [],
                  "diffFields": []}
        msg = {"channel": f"/data/{entity}ChangeEvent",
               "data": {"schema": "Sim" + _h(entity, 20), "event": {"replayId": self._replay},
                        "payload": {"ChangeEventHeader": header, **fields, "LastModifiedDate": _iso(at)}}}
        rest = {k: ({p.lower() if p != "PostalCode" else "postalCode": v for p, v in val.items()}
                    if isinstance(val, dict) else val) for k, val in fields.items()}
        stamp = _iso(at).replace("Z", "+0000")
        rest.update(LastModifiedDate=stamp, SystemModstamp=stamp)
        return NativeRecord("salesforce", _dumps(msg), None, cid, f"sf:{rid}", serves=[("salesforce", rid, at, rest)])

    def _hs_events(self, at: int, *events: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for ev in events:
            self._hs_event += 1
            sub = {"company.creation": 1, "company.propertyChange": 2, "deal.creation": 3,
                   "object.propertyChange": 4}[ev["subscriptionType"]]
            out.append({"eventId": self._hs_event, "subscriptionId": 2_400_000 + sub,
                        "portalId": 62_515, "appId": 1_160_452, "occurredAt": at, "attemptNumber": 0,
                        "changeSource": "CRM_UI", **ev})
        return out

    def _hubspot(self, e: dict[str, Any], at: int, ids: dict[str, str], cid: str | None) -> NativeRecord:
        """HubSpot webhooks: creations and value-less property changes carry no data (fetched from the API)."""
        p = e["payload"]
        if e["entity_type"] == "customer":
            oid = ids["hs_company"]
            props = {"name": p["name"], "domain": p["email"].split("@")[1], "billing_email": p["email"],
                     "billing_account_id": ids["stripe_customer"] if p["billing_account_id"] else None,
                     "billing_terms": p["billing_terms"], "billing_policy": p["billing_policy"],
                     "address": f"{p['billing_address']}, Springfield, US"}
            prev = self._prev.get(oid)
            record = {"properties": props, "updatedAt": _iso(at)}
            if prev is None:
                body = self._hs_events(at, {"subscriptionType": "company.creation", "objectId": int(oid)})
            else:  # a property change whose value the subscription does not send: read the company
                body = self._hs_events(at, *({"subscriptionType": "company.propertyChange", "objectId": int(oid),
                                              "propertyName": k} for k in sorted(props) if props[k] != prev[k]))
        else:
            oid = ids["hs_deal"]
            stage = p["stage"]
            props = {"dealname": p["name"], "dealstage": _HS_STAGE[stage], "amount": f"{p['amount_cents'] / 100:.2f}",
                     "closedate": _iso(p["closed_at"]) if p["closed_at"] else None,
                     "deal_currency_code": p["currency"],
                     "concord_line_items": json.dumps([{"hs_sku": ln["sku"], "quantity": ln["quantity"],
                                                        "price": f"{ln['unit_price_cents'] / 100:.2f}",
                                                        "name": ln["description"]} for ln in p["lines"]])}
            prev = self._prev.get(oid)
            record = {"properties": props, "companies": [cid] if cid else [], "updatedAt": _iso(at)}
            if prev is None:
                body = self._hs_events(at, {"subscriptionType": "deal.creation", "objectId": int(oid)})
            else:  # new apps subscribe with object.*: 0-3 is the deal type; these changes carry their values
                body = self._hs_events(at, *({"subscriptionType": "object.propertyChange", "objectTypeId": "0-3",
                                              "objectId": int(oid), "propertyName": k, "propertyValue":
                                              str(c.to_ms(props[k])) if k == "closedate" else props[k]}
                                             for k in ("closedate", "dealstage") if props[k] != prev[k]))
        self._prev[oid] = props
        return NativeRecord("hubspot", _dumps(body), None, cid, f"hs:{oid}", serves=[("hubspot", oid, at, record)])

    def _jobber(self, e: dict[str, Any], at: int, ids: dict[str, str], cid: str | None) -> NativeRecord:
        """An id-only Jobber webhook; the job itself is what Jobber's GraphQL API answers."""
        p = e["payload"]
        jid = ids["jobber_job"]
        job: dict[str, Any] = {"id": jid, "jobStatus": _JOBBER_STATUS[p["status"]],
               "startAt": _iso(p["scheduled_for"]) if p["scheduled_for"] else None,
               "completedAt": _iso(p["completed_at"]) if p["completed_at"] else None,
               "client": {"id": ids["jobber_client"], "name": None, "emails": []},
               "lineItems": {"nodes": [{"name": ln["sku"], "description": ln["description"],
                                        "quantity": ln["quantity"], "unitPrice": ln["unit_price_cents"] / 100}
                                       for ln in p["lines"]]},
               "customFields": [{"label": "concord_customer_id", "valueText": cid},
                                {"label": "concord_deal_id",
                                 "valueText": self.deal_id(p["deal_id"]) if p.get("deal_id") else None},
                                {"label": "concord_cancelled", "valueTrueFalse": p["status"] == "cancelled"}]}
        topic = "JOB_CREATE" if jid not in self._prev else "JOB_UPDATE"
        self._prev[jid] = job
        hook = {"data": {"webHookEvent": {"topic": topic, "appId": "b7d1c2e0-sim", "accountId": _gid("Account", 77),
                                          "itemId": jid, "occuredAt": _iso(at)}}}
        return NativeRecord("jobber", _dumps(hook), None, cid, f"jobber:{jid}", serves=[("jobber", jid, at, job)])

    def _debezium(self, e: dict[str, Any], at: int, ids: dict[str, str], cid: str | None) -> NativeRecord:
        p = e["payload"]
        deal = self.deal_id(p["deal_id"]) if p.get("deal_id") else None
        row = {"id": ids["job"], "deal_id": deal, "status": p["status"],
               "scheduled_for": p["scheduled_for"] * 1000 if p["scheduled_for"] else None,
               "completed_at": p["completed_at"] * 1000 if p["completed_at"] else None,
               "account_ref": ids["dispatch_client"],
               "lines": json.dumps([{k: ln[k] for k in ("sku", "quantity", "unit_price_cents", "description")}
                                    for ln in p["lines"]])}
        if self.stack.crm == "hubspot":  # no CRM field names the dispatch client: the row names the company
            row["customer_id"] = cid
        before = self._prev.get(ids["job"])
        self._prev[ids["job"]] = row
        self._lsn += 1_184
        value = {"before": before, "after": row, "op": "c" if before is None else "u", "ts_ms": at + 120,
                 "source": {"version": "2.7.3.Final", "connector": "postgresql", "name": "dispatch", "ts_ms": at,
                            "snapshot": "false", "db": "dispatch", "schema": "public", "table": "jobs",
                            "txId": 880_000 + self._lsn // 1_184, "lsn": self._lsn,
                            "sequence": json.dumps([str(self._lsn - 1_184), str(self._lsn)])}}
        return NativeRecord("debezium", _dumps(value), None, cid, f"dbz:{ids['job']}")

    def _stripe(self, e: dict[str, Any], at: int, ids: dict[str, str], cid: str | None) -> list[NativeRecord]:
        p = e["payload"]
        basil = self.stack.basil
        cust = native_ids(e["customer_id"])["stripe_customer"]
        if e["entity_type"] == "invoice":
            etype = {"draft": "invoice.created", "open": "invoice.finalized", "paid": "invoice.paid",
                     "void": "invoice.voided"}[p["status"]]
            meta = {k: v for k, v in (("concord_deal_id", self.deal_id(p["deal_id"]) if p["deal_id"] else None),
                                      ("concord_job_id", self._job_id(p["job_id"]) if p["job_id"] else None))
                    if v}
            lines = []
            for i, ln in enumerate(p["lines"]):
                item: dict[str, Any] = {"id": f"il_{_h(ids['invoice'] + str(i), 16)}", "object": "line_item",
                                        "amount": ln["quantity"] * ln["unit_price_cents"], "quantity": ln["quantity"],
                                        "description": ln["description"]}
                if basil:  # 2025-03-31: the price moved under pricing.price_details; the SKU rides in metadata
                    item["metadata"] = {"sku": ln["sku"]}
                    item["pricing"] = {"type": "price_details", "unit_amount_decimal": str(ln["unit_price_cents"]),
                                       "price_details": {"price": f"price_{_h(ln['sku'], 12)}",
                                                         "product": f"prod_{_h(ln['sku'], 12)}"}}
                else:
                    item["price"] = {"id": f"price_{_h(ln['sku'], 12)}", "lookup_key": ln["sku"],
                                     "unit_amount": ln["unit_price_cents"]}
                lines.append(item)
            obj: dict[str, Any] = {
                "id": ids["invoice"], "object": "invoice", "customer": cust, "status": p["status"],
                "amount_due": p["amount_due_cents"], "amount_paid": p["amount_paid_cents"],
                "currency": p["currency"].lower(), "collection_method": "send_invoice",
                "due_date": p["due_at"] // 1000 if p["due_at"] else None,
                "status_transitions": {"finalized_at": p["issued_at"] // 1000 if p["issued_at"] else None},
                "metadata": meta, "lines": {"object": "list", "has_more": False, "data": lines}}
            entity = ids["invoice"]
        else:
            etype = "payment_intent.succeeded" if p["status"] == "succeeded" else "payment_intent.payment_failed"
            obj = {"id": ids["payment"], "object": "payment_intent", "amount": p["amount_cents"],
                   "amount_received": p["amount_cents"] if p["status"] == "succeeded" else 0,
                   "currency": p["currency"].lower(), "customer": cust,
                   "status": "succeeded" if p["status"] == "succeeded" else "requires_payment_method",
                   "last_payment_error": {"code": "card_declined", "decline_code": "generic_decline",
                                          "type": "card_error", "message": "Your card was declined."}
                   if p["failure_reason"] else None, "metadata": {"attempt": str(p["attempt"])}}
            if not basil:
                obj["invoice"] = native_ids(p["invoice_id"])["invoice"] if p["invoice_id"] else None
            entity = ids["payment"]
        out = [self._stripe_event(e, at, etype, obj, entity, cid,
                                  thin=self.stack.thin_invoices and e["entity_type"] == "invoice")]
        if basil and etype == "payment_intent.succeeded" and p["invoice_id"]:
            inpay = {"id": f"inpay_1Sim{_h(ids['payment'], 12)}", "object": "invoice_payment",
                     "amount_paid": p["amount_cents"], "amount_requested": p["amount_cents"],
                     "currency": p["currency"].lower(), "invoice": native_ids(p["invoice_id"])["invoice"],
                     "is_default": True, "livemode": False, "status": "paid",
                     "payment": {"type": "payment_intent", "payment_intent": ids["payment"]},
                     "status_transitions": {"paid_at": at // 1000, "canceled_at": None}}
            # Stripe does not promise delivery order; here the link comes first, so the payment is never without it
            out.insert(0, self._stripe_event(e, at, "invoice_payment.paid", inpay, entity, cid, suffix="ip"))
        return out

    def _job_id(self, sim_job: str) -> str:
        return native_ids(sim_job)["jobber_job" if self.stack.dispatch == "jobber" else "job"]

    def _stripe_event(self, e: dict[str, Any], at: int, etype: str, obj: dict[str, Any], entity: str,
                      cid: str | None, thin: bool = False, suffix: str = "") -> NativeRecord:
        evt = f"evt_1Sim{_h(e['event_id'] + suffix, 18)}"
        serves = [("stripe", obj["id"], at, obj)]
        if thin:  # an event destination's thin event: the object is fetched from the API
            doc: dict[str, Any] = {"id": evt, "object": "v2.core.event", "type": f"v1.{etype}", "created": _iso(at),
                                   "livemode": False, "context": None, "reason": None,
                                   "related_object": {"id": obj["id"], "type": obj["object"],
                                                      "url": f"/v1/invoices/{obj['id']}"}}
            return NativeRecord("stripe", _dumps(doc), None, cid, f"stripe:{entity}", serves=serves)
        event = {"id": evt, "object": "event", "api_version": self.stack.stripe_version,
                 "created": at // 1000, "type": etype, "livemode": False, "pending_webhooks": 1,
                 "request": {"id": f"req_{_h(e['event_id'] + 'r' + suffix, 14)}", "idempotency_key": None},
                 "data": {"object": obj}}
        return NativeRecord("stripe", _dumps(event), None, cid, f"stripe:{entity}", serves=serves)

    # ---------------------------------------------------------------- faults

    def records(self) -> list[NativeRecord]:
        """The canonical plan's deliveries in the stack's formats, plus faults only native feeds have.

        The canonical simulator's plan decides which events are duplicated, swapped, broken or lost (a sequence
        gap: the vendor never delivers that change), so both demos run the same business under the same faults.
        On top: repeats after a connector restart, and Salesforce gap events.
        """
        rng = random.Random(self.sim.seed + 2)
        rendered: dict[str, list[NativeRecord]] = {}
        for e in sorted(self.sim.history(), key=lambda e: (e["occurred_at"], e["entity_id"], e["seq"])):
            rendered[e["event_id"]] = self._native(e, e["occurred_at"])
        plan: list[NativeRecord] = []
        last: list[NativeRecord] = []
        for event, fault in self._plan():
            if event is None:  # undecodable bytes in the canonical plan: a native record's bytes, broken
                if last:
                    r = last[0]
                    bad = r.raw[: len(r.raw) // 2] if rng.random() < 0.5 else b"\xff\xfe" + r.raw[:40]
                    plan.append(NativeRecord(r.source, bad, "undecodable", None, r.entity))
                continue
            if fault == "schema_invalid":
                base = rendered.get(event["event_id"].removesuffix(":bad"))
                if base:
                    plan.append(NativeRecord(base[0].source, self._invalid(base[0], rng), "schema_invalid",
                                             base[0].customer_id, base[0].entity))
                continue
            recs = rendered[event["event_id"]]
            if fault == "duplicate":
                restart = rng.random() < 0.5
                plan += [NativeRecord(r.source, r.raw, "redelivered" if restart else "duplicate", r.customer_id,
                                      r.entity, restart, r.serves) for r in recs]
                continue
            for r in recs:
                plan.append(NativeRecord(r.source, r.raw, fault if fault in ("out_of_order", "behind_gap") else None,
                                         r.customer_id, r.entity, False, r.serves))
                if r.source == "salesforce" and rng.random() < self.faults["sequence_gap"] * 3:
                    plan.append(self._gap(r))
            last = recs
        return plan

    def _invalid(self, r: NativeRecord, rng: random.Random) -> bytes:
        """A well-formed native record that breaks what the connector needs (missing id, wrong type, ...)."""
        doc = json.loads(r.raw)
        if r.source == "salesforce":
            hdr = doc["data"]["payload"]["ChangeEventHeader"]
            if rng.random() < 0.5:
                del hdr["recordIds"]
            else:
                hdr["commitTimestamp"] = "yesterday"
        elif r.source == "stripe" and doc.get("object") == "v2.core.event":
            if rng.random() < 0.5:
                del doc["id"]
            else:
                doc["related_object"]["type"] = "quote"
        elif r.source == "stripe":
            choice = rng.randrange(3)
            if choice == 0:
                del doc["id"]
            elif choice == 1:
                doc["created"] = "last tuesday"
            else:
                doc["type"] = "invoice.exploded"
        elif r.source == "hubspot":
            if rng.random() < 0.5:
                del doc[0]["objectId"]
            else:
                doc[0]["occurredAt"] = "soon"
        elif r.source == "jobber":
            hook = doc["data"]["webHookEvent"]
            if rng.random() < 0.5:
                del hook["itemId"]
            else:
                hook["topic"] = "JOB_EXPLODED"
        else:
            doc["after"]["status"] = "teleported"
        return _dumps(doc)

    def _gap(self, r: NativeRecord) -> NativeRecord:
        doc = json.loads(r.raw)
        payload = doc["data"]["payload"]
        hdr = dict(payload["ChangeEventHeader"], changeType="GAP_UPDATE", changedFields=[],
                   transactionKey=_h(r.raw.decode(), 32))
        self._replay += 1
        gap = {"channel": doc["channel"], "data": {"schema": doc["data"]["schema"], "event": {"replayId": self._replay},
                                                    "payload": {"ChangeEventHeader": hdr}}}
        return NativeRecord("salesforce", _dumps(gap), "gap_event", r.customer_id, r.entity, serves=r.serves)


# ---------------------------------------------------------------- through the connectors


class _Pending(Deduper):
    """The connector's dedupe memory plus the keys of records normalized but not yet acknowledged."""

    def __init__(self, base: Deduper) -> None:
        super().__init__()
        self.base = base
        self.pending: set[str] = set()

    def seen(self, key: str) -> bool:
        return key in self.pending or self.base.seen(key)


@dataclass
class Ingested:
    """What the connectors (and the fetcher) made of every native record."""

    records: int = 0
    by_source: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # published, fetched, duplicate, rejected, gap, skipped
    by_fault: dict[str, Counter] = field(default_factory=dict)
    published: list[Published] = field(default_factory=list)  # canonical events, where they landed
    deadletters: dict[tuple[str, int, int], str] = field(default_factory=dict)  # where -> stage
    missing: list[str] = field(default_factory=list)  # records with no outcome at all
    errors: list[str] = field(default_factory=list)  # a few connector messages, for the report
    fetches: Counter = field(default_factory=Counter)  # notices read back, snapshots published, failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"records": self.records, "by_source": dict(self.by_source), "outcomes": dict(self.outcomes),
                "canonical_events": len(self.published), "dead_letters": len(self.deadletters),
                "fetches": dict(self.fetches),
                "by_fault": {k: dict(v) for k, v in sorted(self.by_fault.items())}, "missing": self.missing[:20]}


class VendorFakes:
    """Loopback fakes of the vendor APIs a stack's notices are fetched from, holding each record as of now.

    The feed hands every native record's ``serves`` here as it is delivered: the API then answers with the
    record as the vendor holds it after that change (the newest change delivered so far, whatever order the
    deliveries came in), as a live API answers a fetch made moments after its notification.
    """

    def __init__(self, stack: Stack, folder: Path) -> None:
        self.stack, self.folder = stack, folder
        self.scripts: dict[str, fakes.Script] = {}
        self.readers: dict[str, Any] = {}
        self._at: dict[tuple[str, str], int] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> VendorFakes:
        from connectors.fetch import readers as rd

        token = secrets.token_urlsafe(18)  # this run's loopback credential, shared by a fake and its reader
        try:
            if self.stack.crm == "salesforce":  # Salesforce gap events are answered from the REST API (TLS only)
                server_tls, ca = fakes.loopback_tls(self.folder / "tls")
                base = self._serve("salesforce", lambda sc: fakes.salesforce_app(sc, token, "59.0"), server_tls)
                self.readers["salesforce"] = rd.SalesforceReader(base, token, "59.0", verify=ca)
            else:
                base = self._serve("hubspot", lambda sc: fakes.hubspot_app(sc, token))
                self.readers["hubspot"] = rd.HubSpotReader(token, base)
            if self.stack.dispatch == "jobber":
                base = self._serve("jobber", lambda sc: fakes.jobber_app(sc, token))
                self.readers["jobber"] = rd.JobberReader(token, f"{base}/api/graphql")
            if self.stack.thin_invoices:
                base = self._serve("stripe", lambda sc: fakes.stripe_app(sc, token))
                self.readers["stripe"] = rd.StripeReader(token, base)
        except BaseException:
            self._stack.close()
            raise
        return self

    def _serve(self, vendor: str, app: Callable[[fakes.Script], Any], tls: Any = None) -> str:
        script = self.scripts[vendor] = fakes.Script()
        return self._stack.enter_context(fakes.serve(app(script), tls))

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def deliver(self, record: NativeRecord) -> None:
        """The vendor made this change: its API answers with the record as it now is."""
        for vendor, rid, at, doc in record.serves:
            if vendor in self.scripts and at >= self._at.get((vendor, rid), -1):
                self._at[(vendor, rid)] = at
                self.scripts[vendor].records[rid] = doc

    @property
    def calls(self) -> int:
        """API requests the fakes served."""
        return sum(len(s.calls) for s in self.scripts.values())


class _Notices:
    """Reads gap notices back from ``deadletter.ingest.<source>``: the durable fetch requests, as concord fetch does."""

    def __init__(self, bootstrap: str, sources: tuple[str, ...]) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from concord.contracts.topics import deadletter_topic
        from concord.tools.report import end_offsets

        names = [deadletter_topic(f"ingest.{s}") for s in sources]
        ends = end_offsets(bootstrap, names)
        self.codec = Codec()
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"concord-demo-fetch-{_h(str(ends))}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 20})
        self.consumer.assign([TopicPartition(t, p, o) for (t, p), o in ends.items()])
        self.read: dict[tuple[str, int, int], Notice] = {}

    def take(self, wanted: list[tuple[str, int, int]], timeout: float = 30.0) -> list[Notice]:
        """The notices at ``wanted``, in that order (read from the broker, never from memory)."""
        deadline = time.monotonic() + timeout
        while not set(wanted) <= set(self.read):
            if time.monotonic() > deadline:
                raise ConcordError(f"gap notices {sorted(set(wanted) - set(self.read))[:3]} were not read back")
            for m in self.consumer.consume(500, 0.05):
                if m.error():
                    continue
                where = (str(m.topic()), m.partition() or 0, m.offset() or 0)
                if dict(m.headers() or []).get("concord-stage") != b"gap":
                    continue
                _, dl = self.codec.decode(m.value())
                self.read[where] = Notice(where[0].removeprefix("deadletter.ingest."), dl["original_value"], m.key(),
                                          *where)
        return [self.read.pop(w) for w in wanted]

    def close(self) -> None:
        self.consumer.close()


def ingest(bootstrap: str, records: list[NativeRecord], names: Deployment, chunk: int = 400,
           progress: Callable[[int, int], None] | None = None, vendors: VendorFakes | None = None) -> Ingested:
    """Run ``records`` through ``normalize`` and ``Publisher`` (``concord ingest``'s path), chunk by chunk.

    Dedupe keys are remembered once their chunk is acknowledged, as ``concord ingest`` does; a record marked
    ``restart`` meets a connector with no dedupe memory (no ``--dedupe-file``), as after a restart. With
    ``vendors``, a chunk ends at each record that became a gap notice: the notice is read back from the broker
    and answered by the fetcher (``connectors.fetch.fetcher``) from the vendor's API before the next record is
    delivered — the business's next change comes hours later, a fetch moments after its notification. A fetch
    that fails raises its exception on the queue of the deployment ``names``.
    """
    ctx = c.Context(identity=IdentityMap(None))
    memory = Deduper()
    pub = Publisher(bootstrap)
    result = Ingested(records=len(records))
    fetcher = Fetcher(vendors.readers, ctx) if vendors is not None else None
    notices = _Notices(bootstrap, tuple(vendors.readers)) if vendors is not None else None
    done = 0
    try:
        part: list[NativeRecord] = []
        per_record: list[Batch] = []
        view = _Pending(memory)
        for i, r in enumerate(records, 1):
            if vendors is not None:
                vendors.deliver(r)
            b = normalize(r.source, r.raw, ctx, None if r.restart else view, name=f"native record {i}")
            view.pending.update(b.dedupe_keys)
            part.append(r)
            per_record.append(b)
            if len(part) >= chunk or i == len(records) or (fetcher is not None and b.gaps):
                _flush(pub, part, per_record, result, memory, fetcher, notices, names)
                done += len(part)
                part, per_record, view = [], [], _Pending(memory)
                if progress:
                    progress(done, len(records))
    finally:
        pub.close()
        if notices is not None:
            notices.close()
    return result


def _flush(pub: Publisher, part: list[NativeRecord], per_record: list[Batch], result: Ingested, memory: Deduper,
           fetcher: Fetcher | None, notices: _Notices | None, names: Deployment) -> None:
    """Publish a chunk, answer its gap notices through the fetcher, and count every record's outcome."""
    gaps: list[tuple[tuple[str, int, int], int]] = []  # where a gap notice landed, and its record
    for source in sorted({r.source for r in part}):
        merged = Batch(source)
        owners: list[tuple[int, str]] = []  # (record index in part, "event" | stage) per record published
        for k, (r, b) in enumerate(zip(part, per_record, strict=True)):
            if r.source == source:
                merged.events += b.events
                owners += [(k, "event")] * len(b.events)
        for k, (r, b) in enumerate(zip(part, per_record, strict=True)):
            if r.source == source:
                merged.deadletters += b.deadletters
                owners += [(k, d.record["stage"]) for d in b.deadletters]
        landed = pub.publish(merged)
        for (k, what), where in zip(owners, landed, strict=True):
            if what == "event":
                result.published.append(Published(*where, part[k].fault, part[k].customer_id))
            else:
                result.deadletters[where] = what
                if what == "gap" and fetcher is not None and part[k].source in fetcher.readers:
                    gaps.append((where, k))
    failed: set[int] = set()
    fetched: set[int] = set()
    if gaps and fetcher is not None and notices is not None:
        for notice, (_, k) in zip(notices.take([w for w, _ in gaps]), gaps, strict=True):
            result.fetches["notices"] += 1
            out = fetcher.handle(notice)  # FetchStalled (a fake that stayed down) ends the demo: nothing is guessed
            for where, what in zip(publish_fetched(pub, out, names), ["event"] * len(out.batch.events)
                                   + ["fetch"] * len(out.batch.deadletters), strict=True):
                if what == "event":
                    result.published.append(Published(*where, part[k].fault, part[k].customer_id))
                else:
                    result.deadletters[where] = what
            result.fetches["snapshots"] += len(out.batch.events)
            if out.exceptions:
                result.fetches["failed"] += 1
                failed.add(k)
                if len(result.errors) < 5:
                    result.errors.append(out.batch.deadletters[0].message)
            else:
                fetched.add(k)
    for k, (r, b) in enumerate(zip(part, per_record, strict=True)):
        memory.remember(b.dedupe_keys)
        outcome = ("published" if b.events else "rejected" if b.rejected else
                   "fetched" if b.gaps and k in fetched and k not in failed else "gap" if b.gaps
                   else "duplicate" if b.duplicates else "skipped" if b.skipped else None)
        result.by_source[r.source] += 1
        if outcome is None:
            result.missing.append(f"{r.source} record with no outcome: {r.raw[:80]!r}")
            continue
        result.outcomes[outcome] += 1
        result.by_fault.setdefault(r.fault or "clean", Counter())[outcome] += 1
        if b.rejected and len(result.errors) < 5:
            result.errors += [d.message for d in b.deadletters][:1]
