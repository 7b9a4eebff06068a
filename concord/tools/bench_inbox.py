"""How long the inbox takes to render one team's page over 1,000 open exceptions (no broker needed)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from concord.domain.routing import load_routing
from concord.owners import inbox
from concord.owners.desk import table_record
from concord.owners.picture import amount_at_risk, currency_of

REASONS = ("missing_billing_account", "missing_billing_terms", "unknown_customer", "command_rejected")


def open_exceptions(n: int, team: str = "revenue-ops", now: int | None = None) -> tuple[list[dict], dict[str, Any]]:
    """``n`` open exceptions of one team as exception_to_record holds them, and their customers' statuses."""
    now = now or int(time.time() * 1000)
    routing = load_routing()
    records: list[dict] = []
    statuses: dict[str, Any] = {}
    for i in range(n):
        cid, deal = f"bench-c{i % 400}", f"bench-d{i}"
        draft = {"exception_id": f"bench-x{i:06d}", "reason_code": REASONS[i % len(REASONS)],
                 "trace_id": f"trace:{i}", "source_system": "crm", "entity_type": "deal", "entity_id": deal,
                 "customer_id": cid, "opened_at": now - i * 37_000, "message": f"deal {deal} cannot be billed yet",
                 "suggestions": [{"field": "billing_account_id", "value": f"cus_{i}", "label": "prior link"}]}
        rec = routing.route(draft, now)
        rec["owner"] = team
        records.append(table_record(rec))
        status = statuses.setdefault(cid, {"deals": {}})
        status["deals"][deal] = {"amount_cents": 10_000 + i, "currency": "USD", "position": "sold"}
    return records, statuses


def render_once(records: list[dict], statuses: dict[str, Any], team: str, query: dict[str, str], now: int) -> str:
    """One inbox page as the worker renders it: amounts looked up per record, filters, sorting, one page of HTML."""
    def amount(r: dict) -> int | None:
        return amount_at_risk(r, statuses.get(r["customer_key"]))

    def currency(r: dict) -> str | None:
        return currency_of(r, statuses.get(r["customer_key"]))

    body = inbox.render_inbox(team, records, inbox.Filters.from_query(query), now, amount, currency)
    return inbox.page(f"Inbox: {team}", body, team, "inbox")


def inbox_render_p95_ms(n: int = 1000, runs: int = 40, query: dict[str, str] | None = None) -> float:
    """The 95th percentile of ``runs`` renders of the first inbox page over ``n`` open exceptions, in ms."""
    records, statuses = open_exceptions(n)
    now = int(time.time() * 1000)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        page = render_once(records, statuses, "revenue-ops", query or {}, now)
        times.append((time.perf_counter() - t0) * 1000)
    if f"{n} matching" not in page:  # a render that lost records is no measurement
        raise AssertionError(f"the inbox did not show {n} matching exceptions")
    return statistics.quantiles(times, n=20)[-1]


def inbox_line() -> str:
    """The inbox's render time as `make bench` prints it, on its own line."""
    return f"inbox: render_p95_ms={inbox_render_p95_ms():.0f}"


if __name__ == "__main__":
    print(inbox_line())
