"""Fetch throughput against the loopback Stripe fake with a simulated latency: python -m connectors.fetch.bench."""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

from connectors.fetch.fakes import Script, as_json, serve, stripe_app
from connectors.fetch.fetcher import Fetcher, Notice
from connectors.fetch.readers import StripeReader
from connectors.inbound import common as c
from connectors.inbound.identity import IdentityMap

KEY = "sk_test_bench"
_INVOICE = {"object": "invoice", "customer": "cus_bench", "status": "paid", "amount_due": 30000, "amount_paid": 30000,
            "currency": "usd", "status_transitions": {"finalized_at": 1743400000}, "metadata": {},
            "lines": {"object": "list", "data": [
                {"id": "il_1", "object": "line_item", "amount": 30000, "quantity": 2, "description": "Boiler service",
                 "pricing": {"type": "price_details", "price_details": {"price": "price_boiler"},
                             "unit_amount_decimal": "15000"}}]}}


def _notice(n: int) -> Notice:
    doc = {"id": f"evt_bench_{n}", "object": "v2.core.event", "type": "v1.invoice.paid",
           "created": "2025-04-01T09:33:20.000Z",
           "related_object": {"id": f"in_bench_{n}", "type": "invoice", "url": f"/v1/invoices/in_bench_{n}"}}
    return Notice("stripe", as_json(doc), f"in_bench_{n}".encode())


def measure(count: int, latency_s: float, concurrency: int, rate_limit: int = 0) -> tuple[float, int]:
    """(fetches per second, 429s served) for ``count`` thin-event notices, ``concurrency`` requests in flight."""
    script = Script(records={f"in_bench_{n}": {**_INVOICE, "id": f"in_bench_{n}"} for n in range(count)},
                    latency_s=latency_s, rate_limit_per_s=rate_limit)
    with serve(stripe_app(script, KEY)) as base:
        fetcher = Fetcher({"stripe": StripeReader(KEY, base)}, c.Context(identity=IdentityMap()))
        notices = [_notice(n) for n in range(count)]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(fetcher.handle, notices))
        elapsed = time.perf_counter() - start
    if not all(len(r.batch.events) == 1 for r in results):
        raise SystemExit("a notice did not become a snapshot")
    return count / elapsed, script.limited


def main(argv: list[str] | None = None) -> int:
    """Print fetches/s at each concurrency."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--latency-ms", type=float, default=100.0)
    p.add_argument("--concurrency", default="1,8,25,50")
    p.add_argument("--rate-limit", type=int, default=100,
                   help="requests/s the fake allows before answering 429 (Stripe's documented live-mode limit: 100)")
    args = p.parse_args(argv)
    for n in (int(x) for x in args.concurrency.split(",")):
        rate, limited = measure(args.count, args.latency_ms / 1000, n, args.rate_limit)
        print(json.dumps({"concurrency": n, "latency_ms": args.latency_ms, "rate_limit_per_s": args.rate_limit,
                          "fetches_per_s": round(rate, 1), "answered_429": limited}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
