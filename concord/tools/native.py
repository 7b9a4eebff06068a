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

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from concord.tools.simulator import Published, Simulator
from connectors.inbound import common as c
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import Batch, Deduper, Publisher, normalize

_ID = re.compile(r"(?P<kind>cust|deal|job|inv|pay)-(?P<n>\d+)(?:-(?P<d>\d+))?$")
CONNECTOR_OUTCOMES = ("published", "duplicate", "rejected", "gap", "skipped")


def _h(text: str, n: int = 14) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def native_ids(entity_id: str) -> dict[str, str]:
    """The native ids behind a simulator id (``cust-0003``, ``deal-0003-1``, ...)."""
    m = _ID.search(entity_id)
    if not m:
        raise ValueError(f"not a simulator id: {entity_id!r}")
    n, d = int(m["n"]), int(m["d"] or 0)
    return {"account": f"001Sim{n:012d}", "stripe_customer": f"cus_Sim{n:06d}", "dispatch_client": f"CL-{n:05d}",
            "deal": f"006Sim{n:09d}{d:03d}", "job": f"J-{n:05d}-{d}", "invoice": f"in_1Sim{n:06d}{d:02d}",
            "payment": f"pi_3Sim{n:06d}{d:02d}"}


@dataclass
class NativeRecord:
    """One native record as a vendor would deliver it to a connector."""

    source: str  # the connector: salesforce, stripe, debezium
    raw: bytes
    fault: str | None
    customer_id: str | None  # the Concord customer it is about (the Salesforce account id)
    entity: str = ""  # native entity key, for reordering
    restart: bool = False  # delivered after a connector restart: the connector's dedupe memory is empty


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class NativeFeed:
    """A simulator's history as Salesforce CDC, Debezium and Stripe records, with faults."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.faults = sim.faults
        self._replay = 4_000_000
        self._commit = 10_000_000_000
        self._lsn = 24_000_000
        self._prev: dict[str, Any] = {}  # native entity -> its last native state

    # ---------------------------------------------------------------- clean records

    def clean(self) -> list[NativeRecord]:
        """Every canonical event of the history as the owning system's native record, in time order."""
        history = self.sim.history()
        first_seen: dict[str, int] = {}
        for e in history:
            if e["customer_id"]:
                first_seen[e["customer_id"]] = min(first_seen.get(e["customer_id"], e["occurred_at"]),
                                                   e["occurred_at"])
        timed = []
        for e in history:
            at = e["occurred_at"]
            if e["entity_type"] == "customer" and e["op"] == "create":  # the account exists before its deals
                at = min(at, first_seen[e["customer_id"]] - 60_000)
            timed.append((at, e))
        timed.sort(key=lambda t: (t[0], t[1]["entity_id"], t[1]["seq"]))
        return [self._native(e, at) for at, e in timed]

    def _native(self, e: dict[str, Any], at: int) -> NativeRecord:
        ids = native_ids(e["entity_id"])
        cid = native_ids(e["customer_id"])["account"] if e["customer_id"] else None
        kind = e["entity_type"]
        if kind in ("customer", "deal"):
            return self._salesforce(e, at, ids, cid)
        if kind == "job":
            return self._debezium(e, at, ids, cid)
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
        return NativeRecord("salesforce", _dumps(msg), None, cid, f"sf:{rid}")

    def _debezium(self, e: dict[str, Any], at: int, ids: dict[str, str], cid: str | None) -> NativeRecord:
        p = e["payload"]
        deal = native_ids(p["deal_id"])["deal"] if p.get("deal_id") else None
        row = {"id": ids["job"], "deal_id": deal, "status": p["status"],
               "scheduled_for": p["scheduled_for"] * 1000 if p["scheduled_for"] else None,
               "completed_at": p["completed_at"] * 1000 if p["completed_at"] else None,
               "account_ref": ids["dispatch_client"],
               "lines": json.dumps([{k: ln[k] for k in ("sku", "quantity", "unit_price_cents", "description")}
                                    for ln in p["lines"]])}
        before = self._prev.get(ids["job"])
        self._prev[ids["job"]] = row
        self._lsn += 1_184
        value = {"before": before, "after": row, "op": "c" if before is None else "u", "ts_ms": at + 120,
                 "source": {"version": "2.7.3.Final", "connector": "postgresql", "name": "dispatch", "ts_ms": at,
                            "snapshot": "false", "db": "dispatch", "schema": "public", "table": "jobs",
                            "txId": 880_000 + self._lsn // 1_184, "lsn": self._lsn,
                            "sequence": json.dumps([str(self._lsn - 1_184), str(self._lsn)])}}
        return NativeRecord("debezium", _dumps(value), None, cid, f"dbz:{ids['job']}")

    def _stripe(self, e: dict[str, Any], at: int, ids: dict[str, str], cid: str | None) -> NativeRecord:
        p = e["payload"]
        cust = native_ids(e["customer_id"])["stripe_customer"]
        if e["entity_type"] == "invoice":
            etype = {"draft": "invoice.created", "open": "invoice.finalized", "paid": "invoice.paid",
                     "void": "invoice.voided"}[p["status"]]
            meta = {k: v for k, v in (("concord_deal_id", native_ids(p["deal_id"])["deal"] if p["deal_id"] else None),
                                      ("concord_job_id", native_ids(p["job_id"])["job"] if p["job_id"] else None))
                    if v}
            obj: dict[str, Any] = {
                "id": ids["invoice"], "object": "invoice", "customer": cust, "status": p["status"],
                "amount_due": p["amount_due_cents"], "amount_paid": p["amount_paid_cents"],
                "currency": p["currency"].lower(), "collection_method": "send_invoice",
                "due_date": p["due_at"] // 1000 if p["due_at"] else None,
                "status_transitions": {"finalized_at": p["issued_at"] // 1000 if p["issued_at"] else None},
                "metadata": meta,
                "lines": {"object": "list", "has_more": False, "data": [
                    {"id": f"il_{_h(ids['invoice'] + str(i), 16)}", "object": "line_item",
                     "amount": ln["quantity"] * ln["unit_price_cents"], "quantity": ln["quantity"],
                     "description": ln["description"],
                     "price": {"id": f"price_{_h(ln['sku'], 12)}", "lookup_key": ln["sku"],
                               "unit_amount": ln["unit_price_cents"]}} for i, ln in enumerate(p["lines"])]}}
            entity = ids["invoice"]
        else:
            etype = "payment_intent.succeeded" if p["status"] == "succeeded" else "payment_intent.payment_failed"
            obj = {"id": ids["payment"], "object": "payment_intent", "amount": p["amount_cents"],
                   "amount_received": p["amount_cents"] if p["status"] == "succeeded" else 0,
                   "currency": p["currency"].lower(), "customer": cust,
                   "invoice": native_ids(p["invoice_id"])["invoice"] if p["invoice_id"] else None,
                   "status": "succeeded" if p["status"] == "succeeded" else "requires_payment_method",
                   "last_payment_error": {"code": p["failure_reason"], "message": "Your card was declined."}
                   if p["failure_reason"] else None, "metadata": {"attempt": str(p["attempt"])}}
            entity = ids["payment"]
        event = {"id": f"evt_1Sim{_h(e['event_id'], 18)}", "object": "event", "api_version": "2024-06-20",
                 "created": at // 1000, "type": etype, "livemode": False, "pending_webhooks": 1,
                 "request": {"id": f"req_{_h(e['event_id'] + 'r', 14)}", "idempotency_key": None},
                 "data": {"object": obj}}
        return NativeRecord("stripe", _dumps(event), None, cid, f"stripe:{entity}")

    # ---------------------------------------------------------------- faults

    def records(self) -> list[NativeRecord]:
        """The clean records as they reach the connectors: repeated, reordered, broken, with gap events."""
        rng = random.Random(self.sim.seed + 2)
        plan: list[NativeRecord] = []
        last_at: dict[str, int] = {}
        later: list[tuple[int, NativeRecord]] = []
        for r in self.clean():
            plan.append(r)
            j = last_at.get(r.entity)
            last_at[r.entity] = len(plan) - 1
            if j is not None and plan[j].fault is None and rng.random() < self.faults["out_of_order"]:
                plan[j], plan[-1] = plan[-1], plan[j]  # the newer change overtakes the older one
                plan[j].fault = "out_of_order"
            if rng.random() < self.faults["duplicate"]:
                restart = rng.random() < 0.5
                later.append((rng.randrange(0, 30), NativeRecord(r.source, r.raw, "redelivered" if restart else
                                                                 "duplicate", r.customer_id, r.entity, restart)))
            due = [d for n, d in later if n <= 0]
            later = [(n - 1, d) for n, d in later if n > 0]
            plan += due
            if rng.random() < self.faults["undecodable"]:
                bad = r.raw[: len(r.raw) // 2] if rng.random() < 0.5 else b"\xff\xfe" + r.raw[:40]
                plan.append(NativeRecord(r.source, bad, "undecodable", None, r.entity))
            if rng.random() < self.faults["schema_invalid"]:
                plan.append(NativeRecord(r.source, self._invalid(r, rng), "schema_invalid", r.customer_id, r.entity))
            if r.source == "salesforce" and rng.random() < self.faults["sequence_gap"] * 3:
                plan.append(self._gap(r))
        plan += [d for _, d in later]
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
        elif r.source == "stripe":
            choice = rng.randrange(3)
            if choice == 0:
                del doc["id"]
            elif choice == 1:
                doc["created"] = "last tuesday"
            else:
                doc["type"] = "invoice.exploded"
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
        return NativeRecord("salesforce", _dumps(gap), "gap_event", r.customer_id, r.entity)


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
    """What the connectors made of every native record."""

    records: int = 0
    by_source: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # published, duplicate, rejected, gap, skipped
    by_fault: dict[str, Counter] = field(default_factory=dict)
    published: list[Published] = field(default_factory=list)  # canonical events, where they landed
    deadletters: dict[tuple[str, int, int], str] = field(default_factory=dict)  # where -> stage
    missing: list[str] = field(default_factory=list)  # records with no outcome at all
    errors: list[str] = field(default_factory=list)  # a few connector messages, for the report

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"records": self.records, "by_source": dict(self.by_source), "outcomes": dict(self.outcomes),
                "canonical_events": len(self.published), "dead_letters": len(self.deadletters),
                "by_fault": {k: dict(v) for k, v in sorted(self.by_fault.items())}, "missing": self.missing[:20]}


def ingest(bootstrap: str, records: list[NativeRecord], chunk: int = 400,
           progress: Callable[[int, int], None] | None = None) -> Ingested:
    """Run ``records`` through ``normalize`` and ``Publisher`` (``concord ingest``'s path), chunk by chunk.

    Dedupe keys are remembered once their chunk is acknowledged, as ``concord ingest`` does; a record marked
    ``restart`` meets a connector with no dedupe memory (no ``--dedupe-file``), as after a restart.
    """
    ctx = c.Context(identity=IdentityMap(None))
    memory = Deduper()
    pub = Publisher(bootstrap)
    result = Ingested(records=len(records))
    try:
        for start in range(0, len(records), chunk):
            part = records[start:start + chunk]
            view = _Pending(memory)
            per_record: list[Batch] = []
            for i, r in enumerate(part, start + 1):
                b = normalize(r.source, r.raw, ctx, None if r.restart else view, name=f"native record {i}")
                view.pending.update(b.dedupe_keys)
                per_record.append(b)
            for source in sorted({r.source for r in part}):
                merged = Batch(source)
                owners: list[tuple[int, str]] = []  # (record index in part, "event" | stage) per record published
                for k, (r, b) in enumerate(zip(part, per_record, strict=True)):
                    if r.source != source:
                        continue
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
            for r, b in zip(part, per_record, strict=True):
                memory.remember(b.dedupe_keys)
                outcome = ("published" if b.events else "rejected" if b.rejected else "gap" if b.gaps
                           else "duplicate" if b.duplicates else "skipped" if b.skipped else None)
                result.by_source[r.source] += 1
                if outcome is None:
                    result.missing.append(f"{r.source} record with no outcome: {r.raw[:80]!r}")
                    continue
                result.outcomes[outcome] += 1
                result.by_fault.setdefault(r.fault or "clean", Counter())[outcome] += 1
                if b.rejected and len(result.errors) < 5:
                    result.errors += [d.message for d in b.deadletters][:1]
            if progress:
                progress(min(start + chunk, len(records)), len(records))
    finally:
        pub.close()
    return result
