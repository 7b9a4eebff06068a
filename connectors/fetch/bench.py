"""Fetch throughput against the loopback vendor fakes with a simulated latency: python -m connectors.fetch.bench.

Each vendor's fake answers 429 above that vendor's documented limit: Stripe 100 requests/s (live mode),
HubSpot 100 requests per 10 s (private app, Free/Starter burst limit), Jobber 2500 requests per 5 minutes (its
DDoS middleware; the query-cost bucket of 10000 points restoring 500/s is not reached by a 12-point job query at
these rates). Salesforce has no per-second limit (daily request allocations), so its fake has none.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from connectors.fetch import fakes
from connectors.fetch.fakes import Script, as_json, serve
from connectors.fetch.fetcher import Fetcher, Notice
from connectors.fetch.readers import HubSpotReader, JobberReader, SalesforceReader, StripeReader
from connectors.inbound import common as c
from connectors.inbound.identity import IdentityMap

KEY = "sk_test_bench"
_INVOICE = {"object": "invoice", "customer": "cus_bench", "status": "paid", "amount_due": 30000, "amount_paid": 30000,
            "currency": "usd", "status_transitions": {"finalized_at": 1743400000}, "metadata": {},
            "lines": {"object": "list", "data": [
                {"id": "il_1", "object": "line_item", "amount": 30000, "quantity": 2, "description": "Boiler service",
                 "pricing": {"type": "price_details", "price_details": {"price": "price_boiler"},
                             "unit_amount_decimal": "15000"}}]}}
# (requests allowed, per seconds) as each vendor documents it
LIMITS = {"stripe": (100, 1.0), "hubspot": (100, 10.0), "jobber": (2500, 300.0), "salesforce": (0, 1.0)}


def _stripe(n: int) -> tuple[str, dict[str, Any], bytes]:
    doc = {"id": f"evt_bench_{n}", "object": "v2.core.event", "type": "v1.invoice.paid",
           "created": "2025-04-01T09:33:20.000Z",
           "related_object": {"id": f"in_bench_{n}", "type": "invoice", "url": f"/v1/invoices/in_bench_{n}"}}
    return f"in_bench_{n}", {**_INVOICE, "id": f"in_bench_{n}"}, as_json(doc)


def _hubspot(n: int) -> tuple[str, dict[str, Any], bytes]:
    oid = str(7_000_000 + n)
    body = [{"eventId": n, "subscriptionId": 1, "portalId": 62515, "occurredAt": 1714490400000,
             "subscriptionType": "deal.creation", "objectId": int(oid), "attemptNumber": 0}]
    return oid, {"properties": {"dealname": "Boiler", "dealstage": "closedwon", "amount": "300.00",
                                "deal_currency_code": "USD"}, "companies": ["9912400"]}, as_json(body)


def _jobber(n: int) -> tuple[str, dict[str, Any], bytes]:
    jid = f"Z2lkOi8vSm9iYmVyL0pvYi8{n:06d}"
    hook = {"data": {"webHookEvent": {"topic": "JOB_UPDATE", "appId": "a", "accountId": "b", "itemId": jid,
                                      "occuredAt": "2025-04-01T09:33:20.000Z"}}}
    return jid, {"id": jid, "jobStatus": "requires_invoicing", "client": {"id": "cl_1"},
                 "lineItems": {"nodes": [{"name": "SVC-MAINT", "quantity": 1, "unitPrice": 99.0}]}}, as_json(hook)


def _salesforce(n: int) -> tuple[str, dict[str, Any], bytes]:
    rid = f"001BENCH{n:010d}"
    gap = {"ChangeEventHeader": {"entityName": "Account", "recordIds": [rid], "changeType": "GAP_UPDATE",
                                 "transactionKey": f"t{n}", "sequenceNumber": 1, "commitTimestamp": 1714490400000,
                                 "commitNumber": 1000 + n, "changedFields": []}}
    return rid, {"Name": f"Acme {n}", "Billing_Account_Id__c": "cus_bench"}, as_json(gap)


def measure(count: int, latency_s: float, concurrency: int, rate_limit: int = 0, vendor: str = "stripe",
            window_s: float = 1.0) -> tuple[float, int]:
    """(fetches per second, 429s served) for ``count`` notices of ``vendor``, ``concurrency`` requests in flight."""
    make = {"stripe": _stripe, "hubspot": _hubspot, "jobber": _jobber, "salesforce": _salesforce}[vendor]
    made = [make(n) for n in range(count)]
    script = Script(records={rid: rec for rid, rec, _ in made}, latency_s=latency_s, rate_limit_per_s=rate_limit,
                    rate_window_s=window_s)
    tls, ca = fakes.loopback_tls(Path(tempfile.mkdtemp())) if vendor == "salesforce" else (None, "")
    app = {"stripe": lambda: fakes.stripe_app(script, KEY), "hubspot": lambda: fakes.hubspot_app(script, KEY),
           "jobber": lambda: fakes.jobber_app(script, KEY),
           "salesforce": lambda: fakes.salesforce_app(script, KEY, "59.0")}[vendor]()
    with serve(app, tls) as base:
        reader: Any = {"stripe": lambda: StripeReader(KEY, base), "hubspot": lambda: HubSpotReader(KEY, base),
                  "jobber": lambda: JobberReader(KEY, f"{base}/api/graphql"),
                  "salesforce": lambda: SalesforceReader(base, KEY, "59.0", verify=ca)}[vendor]()
        fetcher = Fetcher({vendor: reader}, c.Context(identity=IdentityMap()))
        notices = [Notice(vendor, raw, rid.encode()) for rid, _, raw in made]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(fetcher.handle, notices))
        elapsed = time.perf_counter() - start
    if not all(len(r.batch.events) == 1 for r in results):
        raise SystemExit(f"a {vendor} notice did not become a snapshot")
    return count / elapsed, script.limited


def main(argv: list[str] | None = None) -> int:
    """Print fetches/s at each concurrency, per vendor."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--latency-ms", type=float, default=100.0)
    p.add_argument("--concurrency", default="1,8,25,50")
    p.add_argument("--vendors", default="stripe,hubspot,jobber,salesforce")
    p.add_argument("--rate-limit", type=int, default=None,
                   help="requests per window the fake allows before answering 429 (default: the vendor's own)")
    args = p.parse_args(argv)
    for vendor in args.vendors.split(","):
        limit, window = LIMITS[vendor]
        limit = args.rate_limit if args.rate_limit is not None else limit
        for n in (int(x) for x in args.concurrency.split(",")):
            rate, limited = measure(args.count, args.latency_ms / 1000, n, limit, vendor, window)
            print(json.dumps({"vendor": vendor, "concurrency": n, "latency_ms": args.latency_ms,
                              "rate_limit": f"{limit}/{window:g}s" if limit else "none",
                              "fetches_per_s": round(rate, 1), "answered_429": limited}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
