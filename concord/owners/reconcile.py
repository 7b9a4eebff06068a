"""The reconciliation view: money at risk by reason, owner, age and customer, a trend and the KPI tiles."""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from concord.owners import svg
from concord.owners.picture import money

OPEN_STATES = ("open", "acknowledged", "escalated")
CLOSED_STATES = ("resolved", "discarded")
DAY_MS = 86_400_000
AGES = (("< 1 h", 3_600_000), ("1–4 h", 4 * 3_600_000), ("4–24 h", DAY_MS), ("1–3 d", 3 * DAY_MS),
        ("3–7 d", 7 * DAY_MS), ("> 7 d", None))
Amount = Callable[[dict[str, Any]], "int | None"]


@dataclass(frozen=True)
class Counters:
    """What the worker counted (its Prometheus counters), for the tiles that records alone cannot give."""

    events: float = 0
    exceptions_opened: float = 0
    invoices_on_time: float = 0
    invoices_late: float = 0
    replays_succeeded: float = 0
    replays_failed: float = 0

    @classmethod
    def from_samples(cls, samples: Iterable[tuple[str, dict[str, str], float]]) -> Counters:
        """Sum (name, labels, value) samples of concord_* counters into the tiles' inputs."""
        acc: dict[str, float] = {}

        def add(key: str, value: float) -> None:
            acc[key] = acc.get(key, 0) + value

        for name, labels, value in samples:
            if name == "concord_events_total":
                add("events", value)
            elif name == "concord_exceptions_opened_total":
                add("exceptions_opened", value)
            elif name == "concord_invoices_total":
                add("invoices_on_time" if labels.get("on_time") == "true" else "invoices_late", value)
            elif name == "concord_replays_total":
                add("replays_succeeded" if labels.get("outcome") == "succeeded" else "replays_failed", value)
        return cls(**acc)


@dataclass
class Bucket:
    """A count of exceptions and the money known to be at risk in them (and how many had no amount)."""

    count: int = 0
    cents: int = 0
    unknown: int = 0

    def add(self, cents: int | None) -> None:
        """Count one exception and its amount, if it has one."""
        self.count += 1
        if cents is None:
            self.unknown += 1
        else:
            self.cents += cents


@dataclass
class Summary:
    """Everything the reconciliation page shows, computed from exception records and counters."""

    now: int
    total: Bucket = field(default_factory=Bucket)
    by_reason: dict[str, Bucket] = field(default_factory=dict)
    by_owner: dict[str, Bucket] = field(default_factory=dict)
    by_age: dict[str, Bucket] = field(default_factory=dict)
    by_customer: dict[str, Bucket] = field(default_factory=dict)
    days: list[str] = field(default_factory=list)
    opened_per_day: list[int] = field(default_factory=list)
    closed_per_day: list[int] = field(default_factory=list)
    at_risk_opened_per_day: list[int] = field(default_factory=list)
    tiles: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (value, explanation)


def _ratio(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "—"


def _hours(ms: float) -> str:
    return f"{ms / 3_600_000:.1f} h" if ms >= 360_000 else f"{ms / 60_000:.1f} min"


def summarize(records: Iterable[dict[str, Any]], now: int, amount: Amount, counters: Counters,
              days: int = 14) -> Summary:
    """Aggregate exception records (every team, every state) into the reconciliation page's figures."""
    s = Summary(now)
    start_day = (now // DAY_MS - days + 1) * DAY_MS
    s.days = [time.strftime("%m-%d", time.gmtime((start_day + i * DAY_MS) / 1000)) for i in range(days)]
    s.opened_per_day, s.closed_per_day, s.at_risk_opened_per_day = [0] * days, [0] * days, [0] * days
    week = now - 7 * DAY_MS
    resolve_ms, sla_ms, within, closed_week, manual = [], [], 0, 0, 0
    for r in records:
        cents = amount(r)
        day = (r["opened_at"] - start_day) // DAY_MS
        if 0 <= day < days:
            s.opened_per_day[day] += 1
            s.at_risk_opened_per_day[day] += cents or 0
        res = r.get("resolution") or {}
        if r["state"] in CLOSED_STATES and res.get("at"):
            cday = (res["at"] - start_day) // DAY_MS
            if 0 <= cday < days:
                s.closed_per_day[cday] += 1
            if res["at"] >= week:
                closed_week += 1
                resolve_ms.append(res["at"] - r["opened_at"])
                sla_ms.append(r["sla_deadline"] - r["opened_at"])
                within += res["at"] <= r["sla_deadline"]
                manual += str(res.get("by") or "concord") != "concord"  # "concord": the data fixed itself
        if r["state"] not in OPEN_STATES:
            continue
        s.total.add(cents)
        s.by_reason.setdefault(r["reason_code"], Bucket()).add(cents)
        s.by_owner.setdefault(r["owner"], Bucket()).add(cents)
        s.by_customer.setdefault(r.get("customer_id") or "unknown customer", Bucket()).add(cents)
        age = now - r["opened_at"]
        label = next(name for name, limit in AGES if limit is None or age < limit)
        s.by_age.setdefault(label, Bucket()).add(cents)
    c = counters
    mttr = sum(resolve_ms) / len(resolve_ms) if resolve_ms else None
    sla = sum(sla_ms) / len(sla_ms) if sla_ms else None
    s.tiles = {
        "Exception rate": (_ratio(c.exceptions_opened, c.events),
                           f"{c.exceptions_opened:,.0f} exceptions opened for {c.events:,.0f} events"),
        "MTTR vs SLA": (f"{_hours(mttr)} / {_hours(sla)}" if mttr is not None and sla is not None else "—",
                        f"{_ratio(within, closed_week)} of {closed_week} closed in the last 7 days within SLA"),
        "Manual handoffs": (f"{manual}", "exceptions closed by an owner's hand in the last 7 days"),
        "On-time invoicing": (_ratio(c.invoices_on_time, c.invoices_on_time + c.invoices_late),
                              f"{c.invoices_on_time:,.0f} of {c.invoices_on_time + c.invoices_late:,.0f} invoices "
                              "for completed work within policy"),
        "Retry success": (_ratio(c.replays_succeeded, c.replays_succeeded + c.replays_failed),
                          f"{c.replays_succeeded:,.0f} of {c.replays_succeeded + c.replays_failed:,.0f} replays "
                          "succeeded"),
    }
    return s


def _table(title: str, rows: dict[str, Bucket], key: str, ordered: list[str] | None = None) -> str:
    names = ordered if ordered is not None else sorted(rows, key=lambda k: (-rows[k].cents, -rows[k].count, k))
    body = "".join(f"<tr><td>{html.escape(n)}</td><td class=num>{rows[n].count}</td>"
                   f"<td class=num>{html.escape(money(rows[n].cents) if rows[n].count > rows[n].unknown else '—')}"
                   f"</td><td class=num>{rows[n].unknown or ''}</td></tr>" for n in names if n in rows)
    return (f'<table id=t-{key}><caption>{html.escape(title)}</caption><thead><tr><th scope=col>{key}</th>'
            "<th scope=col class=num>Open</th><th scope=col class=num>At risk</th>"
            "<th scope=col class=num>Without amount</th></tr></thead>"
            f"<tbody>{body or '<tr><td colspan=4>nothing open</td></tr>'}</tbody></table>")


def render_reconciliation(s: Summary, currency_note: str = "") -> str:
    """The reconciliation page's body: tiles, plots (inline SVG) and the tables behind them."""
    tiles = "".join(f'<div class=tile><h3>{html.escape(name)}</h3><p class=value>{html.escape(value)}</p>'
                    f"<p class=hint>{html.escape(why)}</p></div>" for name, (value, why) in s.tiles.items())
    by_reason = sorted(s.by_reason.items(), key=lambda kv: (-kv[1].cents, kv[0]))
    by_owner = sorted(s.by_owner.items(), key=lambda kv: (-kv[1].cents, kv[0]))
    ages = [name for name, _ in AGES]
    aged = [(a, float(s.by_age[a].count)) for a in ages if a in s.by_age]
    top = sorted(s.by_customer.items(), key=lambda kv: (-kv[1].cents, -kv[1].count, kv[0]))[:10]

    def cents_bars(title: str, items: list[tuple[str, Bucket]], plot_id: str) -> str:
        return svg.bars(title, [(k, b.cents / 100) for k, b in items], fmt="{:,.2f}", plot_id=plot_id)

    return (
        f'<p>{s.total.count} open exceptions hold <b id=total-at-risk>{money(s.total.cents)}</b> at risk'
        f'{f" ({s.total.unknown} without an amount, not counted)" if s.total.unknown else ""}. '
        f"{html.escape(currency_note)}</p>"
        f'<section aria-labelledby=h-kpi><h2 id=h-kpi>KPIs</h2><div class=tiles id=tiles>{tiles}</div></section>'
        '<section aria-labelledby=h-reason class=grid><h2 id=h-reason>Revenue at risk by reason and owner</h2>'
        f'<figure>{cents_bars("At risk by reason", by_reason, "plot-reason")}<figcaption>by reason</figcaption>'
        f'</figure><figure>{cents_bars("At risk by owner", by_owner, "plot-owner")}<figcaption>by owner'
        "</figcaption></figure>"
        f'{_table("By reason", s.by_reason, "reason")}{_table("By owner", s.by_owner, "owner")}</section>'
        '<section aria-labelledby=h-age class=grid><h2 id=h-age>Aging</h2>'
        f'<figure>{svg.bars("Open exceptions by age", aged, plot_id="plot-age")}'
        f'<figcaption>open exceptions by age</figcaption></figure>{_table("By age", s.by_age, "age", ages)}</section>'
        f'<section aria-labelledby=h-trend><h2 id=h-trend>The last {len(s.days)} days</h2><figure>'
        + svg.lines("Opened and closed per day", s.days,
                    [("opened", s.opened_per_day), ("closed", s.closed_per_day)], plot_id="plot-trend")
        + '<figcaption>exceptions opened and closed per day (UTC)</figcaption></figure></section>'
        '<section aria-labelledby=h-top class=grid><h2 id=h-top>Customers most at risk</h2>'
        f'<figure>{cents_bars("Customers most at risk", top, "plot-customers")}</figure>'
        f'{_table("Top customers", dict(top), "customer", [k for k, _ in top])}</section>')
