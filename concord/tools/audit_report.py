"""The audit report as one self-contained HTML page: inline CSS and SVG plots, no script, nothing fetched."""

from __future__ import annotations

import time
from html import escape
from typing import TYPE_CHECKING

from concord.tools.audit import summarize

if TYPE_CHECKING:
    from concord.tools.audit import Audit

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1b1f24}h1{font-size:22px}h2{font-size:17px;margin-top:28px}
.kpis{display:flex;gap:16px}.kpi{border:1px solid #d0d7de;border-radius:6px;padding:10px 16px}
.kpi b{display:block;font-size:20px}.plots{display:flex;flex-wrap:wrap;gap:24px}
figure{margin:0}figcaption{font-weight:600;margin-bottom:4px}
table{border-collapse:collapse;width:100%;margin-top:8px}th,td{border:1px solid #d0d7de;padding:4px 6px;
vertical-align:top;text-align:left}th{background:#f6f8fa}td.num{text-align:right;white-space:nowrap}
.ev{font-size:12px;color:#57606a}.sev-high,.sev-critical{color:#b42318;font-weight:600}.bad{color:#b42318}
"""


def _bars(rows: list[tuple[str, float]], fmt: str, title: str, plot_id: str, color: str = "#0969da") -> str:
    """A horizontal bar chart as inline SVG."""
    height = 24 * len(rows) + 10
    top = max((v for _, v in rows), default=0) or 1
    parts = [f'<figure><figcaption>{escape(title)}</figcaption><svg id="{plot_id}" class="plot" width="500" '
             f'height="{height}" role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">']
    for i, (label, value) in enumerate(rows):
        y = 5 + 24 * i
        w = 220 * value / top
        parts.append(f'<text x="180" y="{y + 15}" text-anchor="end" font-size="12">{escape(label)}</text>'
                     f'<rect class="bar" x="186" y="{y}" width="{w:.1f}" height="18" fill="{color}"/>'
                     f'<text x="{190 + w:.1f}" y="{y + 15}" font-size="12">{fmt.format(value)}</text>')
    if not rows:
        parts.append('<text x="10" y="20" font-size="12">nothing to plot</text>')
    return "".join(parts) + "</svg></figure>"


def render(audit: Audit) -> str:
    """The report page."""
    s = summarize(audit.items)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(audit.as_of / 1000))
    buckets = [("< 1 day", 1), ("1-7 days", 7), ("7-30 days", 30), ("> 30 days", 10**9)]
    ages = [0] * len(buckets)
    for f in audit.items:
        age = audit.age_days(f)
        ages[next(i for i, (_, hi) in enumerate(buckets) if age < hi)] += 1
    plots = "".join([
        _bars([(k, v["count"]) for k, v in s["by_kind"].items()], "{:.0f}", "Disagreements by type", "plot-kind"),
        _bars([(k, v["amount_cents"] / 100) for k, v in s["by_owner"].items()], "{:,.2f}", "Money at risk by owner",
              "plot-owner", "#bf8700"),
        _bars([(label, n) for (label, _), n in zip(buckets, ages, strict=True)], "{:.0f}", "Age of disagreements",
              "plot-age", "#8250df"),
    ])
    owners = "".join(f"<tr><td>{escape(o)}</td><td class=num>{v['count']}</td><td class=num>"
                     f"{v['amount_cents'] / 100:,.2f}</td></tr>" for o, v in s["by_owner"].items())
    rows = []
    for f in audit.items:
        ev = "".join(f"<div><b>{escape(sys_)}</b>: {escape(f.evidence.get(sys_, ''))}</div>"
                     for sys_ in ("crm", "dispatch", "billing"))
        rows.append(
            f"<tr class=item><td>{escape(f.kind)}</td><td>{escape(f.owner)}</td>"
            f"<td class='sev-{escape(f.severity)}'>{escape(f.severity)}</td><td>{escape(f.customer_id or '')}</td>"
            f"<td>{escape(f.entity_type)} {escape(f.entity_id)}</td><td class=num>{f.amount_cents / 100:,.2f} "
            f"{escape(f.currency)}</td><td class=num>{audit.age_days(f)}</td><td>{escape(f.message)}"
            f"<div class=ev>{ev}</div></td><td>{escape(f.source_of_truth)}</td><td>{escape(f.fix)}</td>"
            f"<td class=ev>{escape(f.trace_id)}</td></tr>")
    files = "".join(f"<tr><td>{escape(x['name'])}</td><td>{escape(x['format'])}</td><td class=num>{x['events']}"
                    f"</td><td class=num>{x['rejected']}</td></tr>" for x in audit.files)
    bad = "".join(f"<li class=bad>{escape(d.where)}: {escape(d.record['error'])}</li>" for d in audit.unreadable)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Concord systems audit, {when}</title>
<style>{CSS}</style></head><body>
<h1>Systems audit: where CRM, dispatch and billing disagree</h1>
<p>As of {when}. {audit.events} records of {audit.customers} customers, read from {len(audit.files)} export(s)
and run through Concord's connectors and flow rules.</p>
<div class=kpis><div class=kpi><b id=kpi-items>{s['items']}</b>disagreements</div>
<div class=kpi><b id=kpi-money>{s['amount_cents'] / 100:,.2f}</b>at risk</div>
<div class=kpi><b>{len(audit.unreadable)}</b>rows not read</div></div>
<h2>Plots</h2><div class=plots>{plots}</div>
<h2>Owners' workload</h2><table id=owners><tr><th>owner</th><th>items</th><th>at risk</th></tr>{owners}</table>
<h2>Items</h2>
<table id=items><thead><tr><th>type</th><th>owner</th><th>severity</th><th>customer</th><th>record</th>
<th>at risk</th><th>age (days)</th><th>what is wrong, and what each system says</th><th>source of truth</th>
<th>fix</th><th>trace</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
<h2>Inputs</h2><table id=inputs><tr><th>file</th><th>format</th><th>records</th><th>rejected</th></tr>{files}</table>
{f'<h2>Not read</h2><ul id=unreadable>{bad}</ul>' if bad else ''}
</body></html>
"""
