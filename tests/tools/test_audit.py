"""concord audit: exports through the connectors and rules in process, to findings, a report and exit statuses."""

import csv
import json
from pathlib import Path

import pytest

from concord.tools import audit_exports
from concord.tools.audit import check_example, run_audit
from concord.tools.audit_example import FILES, write_example
from concord.tools.cli import main


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The bundled example set, written once for the module, and its audit."""
    dest = tmp_path_factory.mktemp("example")
    paths, injected, end = write_example(dest)
    return paths, injected, end, run_audit(paths, as_of=end)


def test_the_example_audit_finds_every_injected_disagreement_and_nothing_else(example):
    _, injected, _, audit = example
    found, expected, missed, invented = check_example(audit, injected)
    assert (missed, invented) == ([], [])
    assert found == expected == len(injected) >= 10
    assert not audit.unreadable
    assert {f["format"] for f in audit.files} == {"salesforce-accounts", "salesforce-opportunities", "jobber-jobs",
                                                  "stripe-list", "stripe-payments"}


def test_a_clean_month_has_no_disagreement(tmp_path):
    paths, injected, end = write_example(tmp_path, inject=False)
    audit = run_audit(paths, as_of=end)
    assert injected == [] and audit.items == [] and not audit.unreadable and audit.events > 100


def test_each_finding_names_owner_money_evidence_truth_and_fix(example):
    _, _, _, audit = example
    by_kind = {f.kind: f for f in audit.items}
    unbilled = by_kind["unbilled_work"]
    assert unbilled.owner == "finance" and unbilled.amount_cents > 0 and unbilled.source_of_truth == "billing"
    assert unbilled.evidence["billing"] == "no invoice" and "closed_won" in unbilled.evidence["crm"]
    drift = by_kind["billing_drift"]
    assert drift.source_of_truth == "crm" and "(paid)" in drift.evidence["billing"]
    assert "billing status none" in drift.evidence["crm"]
    dup = by_kind["duplicate_invoice"]
    assert dup.owner == "finance" and dup.fix.startswith("void") and dup.trace_id


def test_the_cli_example_prints_the_score_and_writes_three_outputs(tmp_path, capsys):
    rc = main(["audit", "--example", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    n = doc["summary"]["items"]
    assert rc == 0 and f"audit: found {n}/{n} injected disagreements" in out
    with (tmp_path / "out" / "items.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n and {r["kind"] for r in rows} == set(doc["summary"]["by_kind"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<svg" in html and "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert sorted(p.name for p in (tmp_path / "out" / "exports").iterdir()) == sorted([*FILES, "injected.json"])


def test_exit_status_is_one_on_disagreements_and_zero_when_clean(tmp_path, capsys):
    paths, _, end = write_example(tmp_path / "bad")
    assert main(["audit", *map(str, paths), "--out", str(tmp_path / "r1"), "--as-of", str(end)]) == 1
    clean, _, end = write_example(tmp_path / "clean", inject=False)
    assert main(["audit", *map(str, clean), "--out", str(tmp_path / "r2"), "--as-of", str(end)]) == 0
    assert "0 disagreement(s)" in capsys.readouterr().out


def test_a_bad_row_is_named_by_file_and_row_and_exits_two(tmp_path, capsys):
    paths, _, end = write_example(tmp_path, inject=False)
    opps = paths[FILES.index("salesforce_opportunities.csv")]
    lines = opps.read_text().splitlines()
    rows = [next(csv.reader([ln])) for ln in lines]
    n = next(i for i in range(2, len(rows)) if rows[i][0] == rows[i - 1][0])  # a deal's second product line
    rows[n][9] = "two"  # Quantity
    lines[n] = ",".join(f'"{x}"' for x in rows[n])
    opps.write_text("\n".join(lines) + "\n")
    rc = main(["audit", *map(str, paths), "--out", str(tmp_path / "r"), "--as-of", str(end)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{opps} row {n + 1}" in err and "'two' is not an integer" in err
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    [bad] = doc["unreadable"]
    assert b"two" in __import__("base64").b64decode(bad["original_base64"])  # the dead letter keeps the bytes


def test_an_unrecognised_file_exits_two_naming_it(tmp_path, capsys):
    odd = tmp_path / "notes.csv"
    odd.write_text("when,what\n2026-01-01,lunch\n")
    assert main(["audit", str(odd), str(tmp_path / "missing.csv"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "notes.csv: cannot tell which export this is" in err and "missing.csv" in err


def test_a_debezium_snapshot_and_the_generic_spreadsheet_go_through_their_connectors(tmp_path):
    sheet = tmp_path / "crm.csv"
    sheet.write_text("customer_id,customer_name,billing_account_id,deal_id,deal_stage,sku,quantity,unit_price\n"
                     "c-1,Alder Co,acct_1,d-1,Closed Won,SVC-INSTALL,1,500.00\n")
    row = {"id": "j-9", "customer_id": "c-1", "deal_id": None, "status": "completed", "scheduled_for": 1767225600000,
           "completed_at": 1767232800000, "account_ref": None, "lines": "[]"}
    snap = tmp_path / "jobs.jsonl"
    snap.write_text(json.dumps({"before": None, "after": row, "op": "r", "ts_ms": 1767232800000,
                                "source": {"table": "jobs", "lsn": 42}}) + "\n")
    assert audit_exports.detect(sheet.read_bytes(), "crm.csv") == "csv"
    assert audit_exports.detect(snap.read_bytes(), "jobs.jsonl") == "debezium"
    audit = run_audit([sheet, snap], as_of=1767312000000)
    assert {(f.kind, f.entity_id) for f in audit.items} == {("missing_billing_terms", "d-1"), ("unlinked_job", "j-9")}


def test_stripe_list_items_go_through_the_stripe_connector(tmp_path):
    inv = {"id": "in_1", "object": "invoice", "customer": "cus_1", "status": "open", "currency": "usd",
           "amount_due": 5000, "amount_paid": 0, "created": 1767225600, "status_transitions": {"finalized_at":
                                                                                                1767225600},
           "metadata": {"concord_customer_id": "c-1"}, "lines": {"data": []}}
    odd = {"id": "in_2", "object": "invoice", "status": "weird"}
    path = tmp_path / "invoices.json"
    path.write_text(json.dumps({"object": "list", "data": [inv, odd]}))
    audit = run_audit([path], as_of=1767312000000)
    assert [(f.kind, f.entity_id, f.customer_id) for f in audit.items] == [("orphan_invoice", "in_1", "c-1")]
    [bad] = audit.unreadable
    assert "item 2" in bad.where and "'weird'" in bad.record["error"]


def test_from_apis_says_the_fetch_layer_is_missing(capsys):
    assert main(["audit", "--from-apis"]) == 2
    assert "fetch layer" in capsys.readouterr().err


def test_the_example_set_is_deterministic(tmp_path):
    a, ia, _ = write_example(tmp_path / "a")
    b, ib, _ = write_example(tmp_path / "b")
    assert ia == ib and [p.read_bytes() for p in a] == [Path(p).read_bytes() for p in b]


def test_hubspot_deals_and_stripe_invoice_csv_exports_join_on_their_columns(tmp_path):
    accounts = tmp_path / "accounts.csv"
    accounts.write_text("Account ID,Account Name,Billing Account ID,Billing Terms,Stripe Customer ID\n"
                        "c-7,Birch Co,acct_7,net_30,cus_7\n")
    deals = tmp_path / "hubspot-deals.csv"
    deals.write_text("Record ID,Deal Name,Deal Stage,Concord Customer ID,Line Item SKU,Line Item Quantity,"
                     "Line Item Unit Price\n"
                     "901,Boiler,closedwon,c-7,HW-BOILER,1,\"1,200.00\"\n"
                     "901,Boiler,closedwon,c-7,SVC-INSTALL,1,300.00\n"
                     "902,Pump,appointmentscheduled,c-7,HW-PUMP,1,900.00\n")
    invoices = tmp_path / "stripe-invoices.csv"
    invoices.write_text("id,Customer,Status,Amount Due,Amount Paid,Currency,Date (UTC),concord_deal_id (metadata)\n"
                        "in_7,cus_7,open,1400.00,0,usd,2026-01-20 10:00:00,901\n")
    assert [audit_exports.detect(p.read_bytes(), p.name) for p in (accounts, deals, invoices)] == [
        "salesforce-accounts", "hubspot-deals", "stripe-invoices"]
    audit = run_audit([invoices, deals, accounts], as_of=1769904000000)  # accounts are read first, whatever order
    assert {(f.kind, f.entity_id, f.customer_id) for f in audit.items} == {
        ("amount_mismatch", "in_7", "c-7"), ("billing_drift", "901", "c-7")}  # the CRM has no billing status yet
    [f] = [f for f in audit.items if f.kind == "amount_mismatch"]
    assert "1400.00" in f.message and "1500.00" in f.message


def test_a_billing_record_of_a_customer_no_export_knows_is_a_finding(tmp_path):
    inv = {"id": "in_9", "object": "invoice", "customer": "cus_nobody", "status": "open", "currency": "usd",
           "amount_due": 7000, "amount_paid": 0, "created": 1767225600, "metadata": {"concord_deal_id": "d-9"},
           "lines": {"data": []}}
    path = tmp_path / "invoices.json"
    path.write_text(json.dumps({"object": "list", "data": [inv]}))
    [f] = run_audit([path], as_of=1767312000000).items
    assert (f.kind, f.entity_id, f.owner, f.amount_cents) == ("unknown_customer", "in_9", "revenue-ops", 7000)
