"""The inbox's pure parts: filters, search, paging, money, the item page, history and bulk dry runs."""

import re

import pytest
from workspace_data import HOUR, NOW, record, status_with_chain

from concord.contracts.codec import Codec
from concord.domain.routing import load_routing
from concord.exceptions import ConfigError
from concord.owners import inbox
from concord.owners.desk import table_record, wire_record
from concord.owners.picture import amount_at_risk, chain, load_links, money


def no_amount(rec):
    return None


def test_filters_search_and_soonest_sla_first():
    recs = [record(1, opened=NOW - 5 * HOUR), record(2, "unmapped_sku", opened=NOW - HOUR),
            record(3, opened=NOW - 10 * HOUR, customer="acme-9"), record(4, state="resolved"),
            record(5, state="escalated", opened=NOW - 2 * HOUR)]
    recs[1]["owner"] = "revenue-ops"  # unmapped_sku is marketing-ops' by routing; keep one team for the test
    team = "revenue-ops"

    def ids(**q):
        f = inbox.Filters.from_query({k: str(v) for k, v in q.items()})
        return [r["exception_id"] for r in inbox.select(recs, team, f, NOW, lambda r: r.get("amount_at_risk_cents"))]

    assert ids() == ["x00003", "x00001", "x00005", "x00002"], "open states only, soonest SLA first"
    assert ids(reason="unmapped_sku") == ["x00002"]
    assert ids(state="resolved") == ["x00004"]
    assert ids(scope="escalated") == ["x00005"]
    assert ids(min_age_h=4) == ["x00003", "x00001"]
    assert ids(customer="ACME") == ["x00003"]
    assert ids(q="cus_5") == ["x00005"], "search looks into suggestions too"
    recs[0]["amount_at_risk_cents"] = 90_000
    assert ids(min_amount=500) == ["x00001"], "an item without an amount never passes an amount filter"
    assert inbox.select(recs, "finance", inbox.Filters(), NOW, no_amount) == [], "a team sees its own queue only"
    for bad in ({"min_age_h": "soon"}, {"min_amount": "-1"}, {"state": "lost"}, {"page": "two"}):
        with pytest.raises(inbox.BadFilter):
            inbox.Filters.from_query(bad)


def test_paging_and_the_filters_survive_in_the_links():
    recs = [record(i, opened=NOW - i * 60_000) for i in range(120)]
    f = inbox.Filters.from_query({"reason": "missing_billing_account", "page": "3"})
    html = inbox.render_inbox("revenue-ops", recs, f, NOW, no_amount, lambda r: None)
    assert len(re.findall(r"<tr id=\"x-", html)) == 20 and "page 3 of 3" in html
    assert "120 matching" in html
    assert 'rel=prev href="/inbox?reason=missing_billing_account&amp;page=2"' in html
    first = inbox.render_inbox("revenue-ops", recs, inbox.Filters(), NOW, no_amount, lambda r: None)
    assert len(re.findall(r"<tr id=\"x-", first)) == inbox.PAGE_SIZE and "id=next" in first
    rows = re.findall(r'<tr id="x-(x\d+)"', first)
    assert rows[0] == "x00119" and rows[-1] == "x00070", "the oldest item's SLA runs out first"


def test_amount_is_the_records_own_else_the_entitys_and_never_a_made_up_zero():
    st = status_with_chain("c-1")
    rec = record(1, customer="c-1")
    assert amount_at_risk(rec, st) == 50_000, "the deal the exception is about is worth 2 x 250.00"
    assert amount_at_risk({**rec, "amount_at_risk_cents": 12_345}, st) == 12_345
    assert amount_at_risk({**rec, "entity_id": "not-known"}, st) is None
    assert amount_at_risk(rec, None) is None
    assert money(None) == "—" and money(0) == "0.00" and money(123_456, "USD") == "1,234.56 USD"
    html = inbox.render_inbox("revenue-ops", [rec], inbox.Filters(), NOW, lambda r: amount_at_risk(r, None),
                              lambda r: None)
    assert "<td class=num>—</td>" in html and "at risk <b>—</b>" in html and "1 without an amount" in html


def test_an_item_shows_the_customer_across_systems_links_history_original_and_runbook():
    st = status_with_chain("c-1")
    rec = record(1, customer="c-1")
    rec["original"] = {"topic": "changes.crm.deal", "partition": 0, "offset": 7, "key": "", "value": ""}
    links = load_links()
    html = inbox.render_item("revenue-ops", rec, NOW, chain(st, links), money(50_000, "USD"), links, st,
                             {"entity_id": "d-1", "payload": {"stage": "closed_won"}},
                             inbox.runbook_text("missing_billing_account"))
    rows = re.findall(r'data-kind=(\w+)><td>(?:↳ )?\w+</td><td>.*?</td><td>(\w+)</td><td class=num>([^<]+)</td>', html)
    assert rows == [("deal", "invoiced", "500.00 USD"), ("job", "invoiced", "500.00"),
                    ("invoice", "open", "500.00 USD"), ("payment", "failed", "500.00 USD")]
    assert "https://crm.example.com/lightning/r/Opportunity/d-1/view" in html
    assert "https://dashboard.stripe.com/customers/cus_acme" in html, "the customer's ids in other systems link out"
    assert "changes.crm.deal partition 0 offset 7" in html and "closed_won" in html
    assert "<b>opened</b>" in html and "id=at-risk>500.00 USD" in html
    runbook = html[html.index("id=runbook"):]
    assert "Runbook: missing_billing_account" in runbook and re.search(r"<h[3-6]>", runbook)
    for button in ("id=resolve", "id=ack", "id=assign", "id=discard"):
        assert f"<button class=resolve-btn {button}" in html or f"<button {button}" in html, button
    closed = inbox.render_item("revenue-ops", {**rec, "state": "resolved"}, NOW, [], "—", links, None, None, None)
    assert "id=resolve" not in closed and "No runbook" in closed and "Concord knows no deal" in closed


def test_history_records_escalation_assignment_and_who_resolved_it():
    first = record(1)
    raw = wire_record(first)
    escalated = table_record({**raw, "state": "escalated", "owner": "finance", "backup_owner": "revenue-ops",
                              "updated_at": NOW + HOUR}, first)
    assigned = table_record({**wire_record(escalated), "assignee": "alice", "assigned_by": "finance:bob",
                             "updated_at": NOW + 2 * HOUR}, escalated)
    # the pipeline's own records do not carry the assignee: it is kept
    resolved = table_record({**raw, "state": "resolved", "owner": "finance", "updated_at": NOW + 3 * HOUR,
                             "resolution": {"by": "finance:alice", "at": NOW + 3 * HOUR,
                                            "patch": {"billing_account_id": "cus_1"}, "note": ""}}, assigned)
    steps = [(h["step"], h.get("by"), h["owner"]) for h in resolved["history"]]
    assert steps == [("opened", None, "revenue-ops"), ("escalated", None, "finance"),
                     ("assigned", "finance:bob", "finance"), ("resolved", "finance:alice", "finance")]
    assert resolved["assignee"] == "alice"
    wire = wire_record(resolved)
    assert "history" not in wire and "customer_key" not in wire
    codec = Codec()
    assert codec.decode(codec.encode("exception", wire))[1]["assignee"] == "alice", "the schema carries it"
    reopened = table_record({**raw, "opened_at": NOW + 5 * HOUR, "updated_at": NOW + 5 * HOUR}, resolved)
    assert reopened["history"][-1]["step"] == "opened" and len(reopened["history"]) == 5


def test_bulk_dry_run_counts_first_and_the_confirmation_names_the_exact_set():
    recs = [record(i, "unmapped_sku") for i in range(7)]
    f = inbox.Filters(reason="unmapped_sku")
    page = inbox.render_bulk_dry_run(f, "resolve", "sku:OLD=SVC-INSTALL", "", recs)
    assert "<b id=dry-run-count>7</b>" in page and "nothing has changed yet" in page
    assert f'name="digest" value="{inbox.digest(r["exception_id"] for r in recs)}"' in page
    assert 'name="confirm" value="1"' in page and 'name="reason" value="unmapped_sku"' in page
    assert inbox.digest(["a", "b"]) == inbox.digest(["b", "a"]) != inbox.digest(["a"])
    assert "more than 5000" in inbox.render_bulk_dry_run(f, "replay", "", "", [recs[0]] * (inbox.BULK_MAX + 1))
    done = inbox.render_bulk_result("replay", ["x1", "x2"], [("x3", "422: the patch does not fix it")], "/inbox")
    assert "<b id=bulk-accepted>2</b>" in done and "the patch does not fix it" in done


def test_text_from_records_and_runbooks_is_escaped():
    rec = record(1)
    rec["message"] = "<script>alert(1)</script>"
    html = inbox.render_inbox("revenue-ops", [rec], inbox.Filters(), NOW, no_amount, lambda r: None)
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    md = inbox.markdown_html("# Fix <b>\n\n- run `concord <x>`\n- **now**\n\n```\n<raw>\n```\n")
    assert md == ("<h3>Fix &lt;b&gt;</h3><ul><li>run <code>concord &lt;x&gt;</code></li><li><b>now</b></li></ul>"
                  "<pre><code>&lt;raw&gt;\n</code></pre>")
    assert inbox.runbook_text("../../etc/passwd") is None


def test_every_routed_reason_has_a_runbook_the_item_page_can_show():
    missing = [r for r in load_routing().reasons if inbox.runbook_text(r) is None]
    assert missing == []


def test_link_templates_are_checked(tmp_path):
    bad = tmp_path / "links.yaml"
    bad.write_text("entities:\n  deal: https://crm.example.com/deals/\n")
    with pytest.raises(ConfigError, match=r"\{id\}"):
        load_links(bad)
    bad.write_text("entities:\n  quote: https://crm.example.com/q/{id}\n")
    with pytest.raises(ConfigError, match="quote"):
        load_links(bad)
    assert load_links().of("deal", "006/x y") == "https://crm.example.com/lightning/r/Opportunity/006%2Fx%20y/view"


def test_the_inbox_bench_measures_a_page_that_shows_every_record():
    from concord.tools import bench_inbox

    records, statuses = bench_inbox.open_exceptions(120)
    page = bench_inbox.render_once(records, statuses, "revenue-ops", {}, NOW)
    assert "120 matching" in page and len(re.findall(r'<tr id="x-', page)) == inbox.PAGE_SIZE
    assert "at risk <b>12,071.40</b>" in page, "every deal amount summed: 120 x 100.00 + 0.01 x (0 + ... + 119)"
    assert bench_inbox.inbox_render_p95_ms(n=60, runs=3) > 0


def test_an_escalation_clears_the_assignee_and_summaries_for_other_teams_keep_the_details_back():
    from concord.domain.flow_config import load_flow_config
    from concord.owners.desk import Desk
    from concord.runtime.harness import InProcess

    first = record(1, customer="c-1")
    mine = table_record({**wire_record(first), "assignee": "alice", "assigned_by": "revenue-ops:bob",
                         "updated_at": NOW + 1}, first)
    moved = table_record({**wire_record(mine), "state": "escalated", "owner": "finance", "updated_at": NOW + 2}, mine)
    assert mine["assignee"] == "alice" and moved["assignee"] is None
    desk = Desk(None, {}, load_flow_config(), {b"c-1": status_with_chain("c-1")}, {b"x00001": moved},
                InProcess().pipeline)
    [summary] = desk.everything()
    assert summary["amount_at_risk_cents"] == 50_000 and summary["currency"] == "USD"
    assert summary["owner"] == "finance" and summary["state"] == "escalated"
    assert "message" not in summary and "suggestions" not in summary and "original" not in summary


def test_pages_load_nothing_from_elsewhere():
    page = inbox.page("Inbox", inbox.LOGIN, "revenue-ops")
    assert re.findall(r"(?:src|href)=\"?/inbox/static/[a-z]+\.(?:css|js)", page) == [
        "href=/inbox/static/workspace.css", "src=/inbox/static/workspace.js"]
    assert not re.search(r"(?:src|href)=\"?(?:https?:)?//", page), "no CDN, no other host"
    assert " style=" not in page and "<script>" not in page, "nothing inline for the content policy to refuse"
