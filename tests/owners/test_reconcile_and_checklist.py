"""The reconciliation view's figures and plots, and the Monday-morning checklist, from plain records."""

import json
import re

from workspace_data import HOUR, NOW, record

from concord.domain.routing import load_routing
from concord.owners import checklist as checks
from concord.owners import reconcile

DAY = 24 * HOUR


def closed(n, reason, opened, at, by, state="resolved"):
    rec = record(n, reason, opened=opened, state=state)
    rec["resolution"] = {"by": by, "at": at, "patch": {}, "note": ""}
    return rec


def sample():
    recs = [record(1, opened=NOW - 30 * 60_000, customer="big", amount_at_risk_cents=500_000),
            record(2, opened=NOW - 2 * DAY, customer="big", amount_at_risk_cents=100_000),
            record(3, "unmapped_sku", opened=NOW - 10 * DAY, customer="small", amount_at_risk_cents=2_500),
            record(4, "sequence_gap", opened=NOW - 3 * HOUR, customer="small"),  # no amount: counted apart
            closed(5, "missing_billing_account", NOW - DAY, NOW - DAY + HOUR, "revenue-ops:alice"),
            closed(6, "unmapped_sku", NOW - 2 * DAY, NOW - DAY, "marketing-ops", state="discarded"),
            closed(7, "sequence_gap", NOW - 2 * DAY, NOW - 2 * DAY + 60_000, "concord")]  # closed by later data
    return recs


def amount(rec):
    return rec.get("amount_at_risk_cents")


def test_money_at_risk_by_reason_owner_age_and_customer():
    counters = reconcile.Counters.from_samples([
        ("concord_events_total", {"topic": "t", "outcome": "applied"}, 180.0),
        ("concord_events_total", {"topic": "t", "outcome": "exception"}, 20.0),
        ("concord_exceptions_opened_total", {"owner": "o", "reason": "r"}, 10.0),
        ("concord_invoices_total", {"on_time": "true"}, 3.0), ("concord_invoices_total", {"on_time": "false"}, 1.0),
        ("concord_replays_total", {"outcome": "succeeded"}, 4.0),
        ("concord_replays_total", {"outcome": "failed"}, 1.0),
        ("concord_events_created", {"topic": "t", "outcome": "applied"}, 1e9)])
    s = reconcile.summarize(sample(), NOW, amount, counters)
    assert (s.total.count, s.total.cents, s.total.unknown) == (4, 602_500, 1)
    assert s.by_reason["missing_billing_account"].cents == 600_000 and s.by_reason["sequence_gap"].unknown == 1
    assert s.by_owner["marketing-ops"].cents == 2_500
    assert {k: v.count for k, v in s.by_age.items()} == {"< 1 h": 1, "1–3 d": 1, "> 7 d": 1, "1–4 h": 1}
    assert s.by_customer["big"].cents == 600_000
    assert sum(s.opened_per_day) == 7 and sum(s.closed_per_day) == 3 and len(s.days) == 14
    assert s.tiles["Exception rate"][0] == "5.0%"
    assert s.tiles["On-time invoicing"][0] == "75.0%" and s.tiles["Retry success"][0] == "80.0%"
    assert s.tiles["MTTR vs SLA"][0] == "8.3 h / 10.0 h", "1 h, 24 h and 1 min against SLAs of 4 h, 1 d and 2 h"
    assert s.tiles["Manual handoffs"][0] == "2", "the gap closed by later data was no one's handoff"
    empty = reconcile.summarize([], NOW, amount, reconcile.Counters())
    assert empty.tiles["Exception rate"][0] == "—" and empty.tiles["MTTR vs SLA"][0] == "—"


def test_the_page_has_every_plot_as_inline_svg():
    s = reconcile.summarize(sample(), NOW, amount, reconcile.Counters())
    html = reconcile.render_reconciliation(s)
    for plot in ("plot-reason", "plot-owner", "plot-age", "plot-trend", "plot-customers"):
        assert re.search(rf"<svg class=plot id={plot} role=img", html), plot
    assert html.count("<polyline") == 2 and "6,025.00" in html
    assert "<script" not in html
    bars = re.findall(r'<rect class=bar x="170" y="\d+" width="([\d.]+)"', html[html.index("plot-reason"):])
    assert float(bars[0]) > float(bars[1]), "the largest amount draws the longest bar"


def canary(outcome="succeeded", enabled=True):
    return checks.Canary(enabled, 3, 0 if outcome == "succeeded" else 1, NOW - 60_000 if outcome else None, outcome)


def test_checklist_needs_attention_and_says_why(tmp_path):
    recs = sample()
    c = checks.build(load_routing(), recs, canary("failed"), {"decode: DecodeError": 4}, NOW)
    assert c.needs_attention
    sections = {s.name: s for s in c.sections}
    late = sections["Exceptions past SLA, per owner"]
    assert late.attention and late.data["revenue-ops"]["by_reason"] == {"missing_billing_account": 1,
                                                                        "sequence_gap": 1}, "4 h and 2 h SLAs"
    assert late.data["marketing-ops"]["by_reason"] == {"unmapped_sku": 1}
    assert sections["Canary"].attention and "failed" in sections["Canary"].lines[0]
    assert sections["Dead letters since last week, by reason"].lines == ["decode: DecodeError: 4"]
    used = sections["Runbooks referenced by this week's resolutions"]
    assert used.data["closed_by_reason"] == {"missing_billing_account": 1, "unmapped_sku": 1} and not used.attention
    flows = sections["Flows and their owners"].data
    assert flows["closed-won deal → invoice"]["owners"] == ["marketing-ops", "revenue-ops"]
    text = checks.render_text(c)
    assert "needs attention" in text.splitlines()[0] and "[!!] Canary" in text
    again = checks.Checklist.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again.needs_attention and checks.render_text(again) == text
    assert "Needs attention" in checks.render_html(c)

    nothing = tmp_path / "runbooks"
    nothing.mkdir()
    bare = checks.build(load_routing(), recs, canary(), {}, NOW, runbooks=nothing)
    rules = next(s for s in bare.sections if s.name == "Rule-change checks")
    assert rules.attention and any("missing_billing_account" in p and "no runbook" in p for p in rules.data["problems"])


def test_checklist_all_clear(tmp_path):
    fine = [record(1, opened=NOW - 60_000)]
    c = checks.build(load_routing(), fine, canary(), {}, NOW)
    assert [s.name for s in c.sections if s.attention] == [], checks.render_text(c)
    assert "all clear" in checks.render_text(c)
    assert checks.build(load_routing(), fine, canary(None), {}, NOW).needs_attention, "a canary that never ran"
    assert checks.build(load_routing(), fine, canary(enabled=False), {}, NOW).needs_attention
    assert checks.build(load_routing(), fine, canary(), None, NOW).needs_attention, "dead letters not read"
    broken = checks.build(None, fine, canary(), {}, NOW, config_error="routing.yaml:3: reasons: bad")
    assert broken.needs_attention and "routing.yaml:3" in checks.render_text(broken)
