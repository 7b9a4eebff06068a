"""Pure mapping tests for the inbound connectors: realistic native records in, canonical events out, no broker."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import stripe

from concord.contracts.codec import Codec
from concord.contracts.validate import validate_change
from connectors.inbound import canonical, csv_import, debezium, hubspot, jobber, salesforce, stripe_events
from connectors.inbound import common as c
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import Deduper, normalize, split_json

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"
NOW = 1_714_600_000_000
CODEC = Codec()


def ctx(identity: IdentityMap | None = None, **settings) -> c.Context:
    return c.Context(identity=identity or IdentityMap(), clock=lambda: NOW, settings=settings)


def raw(name: str) -> bytes:
    return (FIX / name).read_bytes()


def events(source: str, name: str, context: c.Context | None = None) -> list[dict]:
    return [m.event for m in normalize(source, raw(name), context or ctx()).events]


# ---------------------------------------------------------------- every fixture maps to valid, encodable events

ALL = [("salesforce", "salesforce_account_create.json"), ("salesforce", "salesforce_opportunity_update.json"),
       ("hubspot", "hubspot_batch.json"), ("stripe", "stripe_invoice_paid.json"),
       ("stripe", "stripe_payment_failed.json"), ("stripe", "stripe_customer_updated.json"),
       ("debezium", "debezium_jobs.jsonl"), ("debezium", "debezium_outbox.jsonl"),
       ("jobber", "jobber_job_complete.json"), ("csv", "spreadsheet.csv"), ("canonical", "canonical.jsonl")]


@pytest.mark.parametrize(("source", "name"), ALL)
def test_every_fixture_maps_to_events_that_round_trip_avro_and_pass_the_contract(source, name):
    evs = events(source, name)
    assert evs, f"{name} mapped to nothing"
    for ev in evs:
        _, back = CODEC.decode(CODEC.encode("change_event", ev))
        assert back == ev
        validate_change(back, f"changes.{ev['source_system']}.{ev['entity_type']}")
        assert ev["ingested_at"] == NOW and ev["source_vendor"] in (source, "generic")
        assert ev["source_payload"] and ev["source_payload"] in raw(name) or source == "csv"


# ---------------------------------------------------------------- Salesforce CDC


def test_salesforce_account_create_maps_to_customer_and_teaches_identity_links():
    ident = IdentityMap()
    [ev] = events("salesforce", "salesforce_account_create.json", ctx(ident))
    assert ev["entity_type"] == "customer" and ev["source_system"] == "crm" and ev["op"] == "create"
    assert ev["entity_id"] == ev["customer_id"] == "001RM000003Z9aBYAS"
    assert ev["seq"] == 10716768203 * 1000 + 1 and ev["seq_contiguous"] is False, "commitNumber, not replayId"
    assert ev["occurred_at"] == 1714477305000
    p = ev["payload"]
    assert p["name"] == "Acme Plumbing Ltd" and p["billing_account_id"] == "cus_Q1acme"
    assert p["billing_terms"] == "net30"
    assert p["billing_address"] == "1 Main St, Springfield, IL, 62701, US"
    assert ev["caused_by_command_id"] is None
    assert ident.resolve("billing", "cus_Q1acme") == "001RM000003Z9aBYAS"
    assert ident.resolve("dispatch", "Z2lkOi8vSm9iYmVyL0NsaWVudC8xMjM=") == "001RM000003Z9aBYAS"


def test_salesforce_merged_update_is_one_event_per_record_and_recognises_a_concord_echo():
    evs = events("salesforce", "salesforce_opportunity_update.json")
    assert [e["entity_id"] for e in evs] == ["006RM000004ABCDYA4", "006RM000004ABCEYA4"]
    assert len({e["event_id"] for e in evs}) == 2
    for e in evs:
        assert e["entity_type"] == "deal" and e["op"] == "update"
        assert e["payload"]["stage"] == "closed_won" and e["changed_fields"] == ["stage"]
        assert e["caused_by_command_id"] == "cmd_7f3a9c2e"
        assert e["seq"] == 10716770001 * 1000 + 2


def _opp(change: str, commit: int, seq_no: int = 1, **fields) -> dict:
    return {"ChangeEventHeader": {"entityName": "Opportunity", "recordIds": ["006A"], "changeType": change,
                                  "changeOrigin": "", "transactionKey": f"tx{commit}", "sequenceNumber": seq_no,
                                  "commitTimestamp": 1714480000000, "commitNumber": commit,
                                  "changedFields": list(fields)}, **fields}


def test_salesforce_seq_comes_from_commit_number_and_update_resolves_customer_through_earlier_create():
    context = ctx()
    create = salesforce.map_record(_opp("CREATE", 500, Name="Retrofit", StageName="Prospecting", Amount=1234.5,
                                        AccountId="001A"), b"x", context).events[0].event
    assert create["customer_id"] == "001A" and create["payload"]["amount_cents"] == 123450
    assert create["payload"]["stage"] == "open" and create["seq"] == 500_001
    upd = salesforce.map_record(_opp("UPDATE", 501, 3, StageName="Closed Lost"), b"y", context).events[0].event
    assert upd["seq"] == 501_003 > create["seq"]
    assert upd["customer_id"] == "001A" and upd["payload"]["stage"] == "closed_lost"
    other = salesforce.map_record(_opp("UPDATE", 502, 1, Description="x"), b"z", context).events[0].event
    assert other["payload"] is None and other["changed_fields"] == []


@pytest.mark.parametrize("change", ["GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE"])
def test_salesforce_gap_events_emit_no_event_but_a_reread(change):
    rec = json.loads(raw("salesforce_gap.json"))
    rec["ChangeEventHeader"]["changeType"] = change
    out = salesforce.map_record(rec, b"gap", ctx())
    assert out.events == []
    [rr] = out.rereads
    assert rr.entity_ids == ["006RM000004ABCDYA4"] and rr.change_type == change and "re-read" in rr.reason
    batch = normalize("salesforce", json.dumps(rec).encode(), ctx())
    assert batch.events == [] and batch.gaps == 1
    dl = batch.deadletters[0].record
    assert dl["stage"] == "gap" and dl["original_topic"] == "ingest.salesforce" and "006RM000004ABCDYA4" in dl["error"]


def test_salesforce_bad_input_is_rejected_with_a_reason():
    with pytest.raises(c.BadInput, match="ChangeEventHeader"):
        salesforce.map_record({"Name": "x"}, b"", ctx())
    with pytest.raises(c.BadInput, match="StageName"):
        salesforce.map_record(_opp("CREATE", 1, Name="no stage"), b"", ctx())
    with pytest.raises(c.BadInput, match="not mapped"):
        rec = _opp("UPDATE", 1)
        rec["ChangeEventHeader"]["entityName"] = "Lead"
        salesforce.map_record(rec, b"", ctx())


# ---------------------------------------------------------------- HubSpot


def test_hubspot_batch_maps_each_event_rereads_creations_and_skips_contacts():
    batch = normalize("hubspot", raw("hubspot_batch.json"), ctx())
    evs = [m.event for m in batch.events]
    assert [(e["entity_type"], e["entity_id"], e["op"]) for e in evs] == [
        ("deal", "18273645", "update"), ("deal", "18273645", "update"), ("customer", "9912345", "delete")]
    stage, amount, deleted = evs
    assert stage["payload"]["stage"] == "closed_won" and stage["changed_fields"] == ["stage"]
    assert amount["payload"]["amount_cents"] == 420000 and amount["changed_fields"] == ["amount_cents"]
    assert amount["caused_by_command_id"] == "cmd_b91d04aa" and stage["caused_by_command_id"] is None
    assert stage["seq"] < amount["seq"], "same-millisecond changes must still be ordered"
    assert stage["event_id"] == "hs:2412001:1701000001:1714480100000"
    assert deleted["payload"] is None and deleted["customer_id"] == "9912345"
    assert batch.gaps == 1 and batch.skipped == 1 and batch.rejected == 0
    # every event's source payload is the original webhook body
    assert all(e["source_payload"] == raw("hubspot_batch.json") for e in evs)


def test_hubspot_redelivery_is_deduplicated_on_subscription_event_and_time():
    dd = Deduper()
    first = normalize("hubspot", raw("hubspot_batch.json"), ctx(), dd)
    dd.remember(first.dedupe_keys)
    again = normalize("hubspot", raw("hubspot_batch.json"), ctx(), dd)
    assert again.events == [] and again.duplicates == 4 and again.gaps == 0
    body = json.loads(raw("hubspot_batch.json"))
    body[0]["occurredAt"] += 1  # same eventId at another time is another delivery
    third = normalize("hubspot", json.dumps(body).encode(), ctx(), dd)
    assert len(third.events) == 1 and third.duplicates == 3


def test_hubspot_one_bad_event_is_rejected_alone():
    body = json.loads(raw("hubspot_batch.json"))
    del body[0]["objectId"]
    batch = normalize("hubspot", json.dumps(body).encode(), ctx())
    assert batch.rejected == 1 and len(batch.events) == 2
    assert "objectId" in batch.deadletters[0].record["error"]


def test_hubspot_signature_v3_valid_tampered_stale_and_missing():
    secret, uri, body = "hs-secret", "https://hooks.example.com/webhooks/hubspot", raw("hubspot_batch.json")
    ts = str(int(time.time() * 1000))
    sig = hubspot.sign_v3(secret, "POST", uri, body, ts)
    hubspot.verify_v3(secret, "POST", uri, body, sig, ts)
    with pytest.raises(hubspot.SignatureError, match="does not match"):
        hubspot.verify_v3(secret, "POST", uri, body.replace(b"closedwon", b"closedlost"), sig, ts)
    with pytest.raises(hubspot.SignatureError, match="does not match"):
        hubspot.verify_v3("other", "POST", uri, body, sig, ts)
    old = str(int(time.time() * 1000) - 301_000)
    with pytest.raises(hubspot.SignatureError, match="old"):
        hubspot.verify_v3(secret, "POST", uri, body, hubspot.sign_v3(secret, "POST", uri, body, old), old)
    with pytest.raises(hubspot.SignatureError, match="missing"):
        hubspot.verify_v3(secret, "POST", uri, body, None, ts)


# ---------------------------------------------------------------- Stripe


def test_stripe_invoice_paid_maps_lines_amounts_and_echo():
    [ev] = events("stripe", "stripe_invoice_paid.json")
    assert ev["event_id"] == "stripe:evt_1PB7nq2eZvKYlo2CxZ1kLm9q" and ev["entity_id"] == "in_1PB7nh2eZvKYlo2Ck8Tq3xYz"
    p = ev["payload"]
    assert p["status"] == "paid" and p["amount_due_cents"] == p["amount_paid_cents"] == 42000 and p["currency"] == "USD"
    assert [(ln["sku"], ln["quantity"], ln["unit_price_cents"]) for ln in p["lines"]] == [
        ("SVC-BOILER", 2, 15000), ("price_1OuValve", 1, 12000)]
    assert p["deal_id"] == "006RM000004ABCDYA4" and p["job_id"] == "job-3301" and p["issued_at"] == 1714480400000
    assert ev["caused_by_command_id"] == "cmd_5e1f77c0" and ev["seq_contiguous"] is False
    assert ev["occurred_at"] == 1714480500000


def test_stripe_seq_never_lets_an_older_state_overwrite_a_newer_one_in_the_same_second():
    paid = json.loads(raw("stripe_invoice_paid.json"))
    finalized = json.loads(raw("stripe_invoice_paid.json"))
    finalized.update(id="evt_fin", type="invoice.finalized")
    finalized["data"]["object"]["status"] = "open"
    s_paid = stripe_events.map_record(paid, b"", ctx()).events[0].event["seq"]
    s_fin = stripe_events.map_record(finalized, b"", ctx()).events[0].event["seq"]
    assert s_fin < s_paid
    paid["created"] += 1
    assert stripe_events.map_record(paid, b"", ctx()).events[0].event["seq"] > s_paid


def test_stripe_customer_metadata_links_billing_id_so_later_invoices_resolve():
    ident = IdentityMap()
    context = ctx(ident)
    [cust] = events("stripe", "stripe_customer_updated.json", context)
    assert cust["entity_type"] == "customer" and cust["source_system"] == "crm" and cust["source_vendor"] == "stripe"
    assert cust["customer_id"] == "001RM000003Z9aBYAS" and cust["changed_fields"] == ["billing_address", "email"]
    assert cust["caused_by_command_id"] is None, "a non-Concord idempotency key is not an echo"
    [inv] = events("stripe", "stripe_invoice_paid.json", context)
    assert inv["customer_id"] == "001RM000003Z9aBYAS"


def test_stripe_unresolved_customer_stays_null_with_ranked_candidates():
    ident = IdentityMap()
    ident.learn_profile("001ACME", "Acme Plumbing Ltd", "ap@acmeplumbing.example")
    ident.learn_profile("001BOLT", "Bolt Electric", "hello@bolt.example")
    ident.learn_profile("001ACMR", "Acme Roofing", "info@acmeroofing.example")
    rec = json.loads(raw("stripe_invoice_paid.json"))
    rec["data"]["object"].update(customer="cus_NEW", customer_name="ACME Plumbing Inc.")
    [m] = stripe_events.map_record(rec, b"", ctx(ident)).events
    assert m.event["customer_id"] is None
    assert [cand["customer_id"] for cand in m.candidates][:2] == ["001ACME", "001ACMR"]
    assert m.candidates[0]["score"] == 1.0 and "same email" in m.candidates[0]["reasons"]
    assert all(cand["customer_id"] != "001BOLT" for cand in m.candidates)


def test_stripe_payment_failed_maps_reason_and_amount():
    [ev] = events("stripe", "stripe_payment_failed.json")
    assert ev["entity_type"] == "payment" and ev["payload"]["status"] == "failed"
    assert ev["payload"]["failure_reason"] == "card_declined/insufficient_funds (card_error)"
    assert ev["payload"]["amount_cents"] == 42000
    assert ev["payload"]["invoice_id"] == "in_1PB7nh2eZvKYlo2Ck8Tq3xYz"


def test_stripe_signature_valid_tampered_and_stale():
    secret, body = "whsec_test", raw("stripe_invoice_paid.json")
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret)
    stripe_events.verify(body, header, secret)
    with pytest.raises(stripe_events.SignatureError):
        stripe_events.verify(body.replace(b"42000", b"1"), header, secret)
    stale = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, int(time.time()) - 301)
    with pytest.raises(stripe_events.SignatureError):
        stripe_events.verify(body, stale, secret)
    with pytest.raises(stripe_events.SignatureError):
        stripe_events.verify(body, None, secret)


# ---------------------------------------------------------------- Debezium


def test_debezium_envelopes_tombstones_replica_identity_default_and_snapshot():
    batch = normalize("debezium", raw("debezium_jobs.jsonl"), ctx())
    evs = [m.event for m in batch.events]
    assert batch.skipped == 1, "the tombstone after the delete is skipped, not published"
    assert [(e["entity_id"], e["op"], e["seq"]) for e in evs] == [
        ("job-3301", "create", 24023184), ("job-3301", "update", 24023360), ("job-3302", "delete", 24023420),
        ("inv-88", "snapshot", 9051200)]
    create, update, delete, snap = evs
    assert create["payload"]["scheduled_for"] == 1714550400000, "µs timestamps become ms"
    assert create["payload"]["lines"] == [{"sku": "SVC-BOILER", "description": "", "quantity": 2,
                                           "unit_price_cents": 15000}]
    assert update["payload"]["status"] == "completed" and update["changed_fields"] == [], "before=null: unknown"
    assert delete["payload"] is None
    assert snap["payload"]["currency"] == "USD" and snap["customer_id"] == "001RM000003Z9aBYAS"
    assert all(e["seq_contiguous"] is False for e in evs)


def test_debezium_update_with_full_before_lists_changed_columns_and_tables_are_configurable():
    src = {"name": "ops", "table": "work_orders", "lsn": 77, "ts_ms": 1714480000000}
    rec = {"before": {"id": "w1", "status": "scheduled", "account_ref": "A"},
           "after": {"id": "w1", "status": "dispatched", "account_ref": "A"}, "source": src, "op": "u"}
    with pytest.raises(c.BadInput, match="work_orders"):
        debezium.map_record(rec, b"", ctx())
    ident = IdentityMap()
    ident.link("dispatch", "A", "001A")
    [m] = debezium.map_record(rec, b"", ctx(ident, tables={"work_orders": "job"})).events
    assert m.event["changed_fields"] == ["status"] and m.event["customer_id"] == "001A" and m.event["seq"] == 77


def test_debezium_outbox_router_output_and_outbox_table_capture():
    evs = events("debezium", "debezium_outbox.jsonl")
    pay, inv = evs
    assert (pay["entity_type"], pay["entity_id"], pay["seq"]) == ("payment", "pay-501", 3)
    assert pay["payload"]["status"] == "succeeded" and pay["customer_id"] == "001RM000003Z9aBYAS"
    assert (inv["entity_type"], inv["entity_id"], inv["seq"]) == ("invoice", "inv-88", 9051900)
    assert inv["payload"]["status"] == "paid"


def test_debezium_record_without_ordering_is_rejected():
    rec = {"before": None, "after": {"id": "p1", "status": "succeeded"}, "source": {"table": "payments"}, "op": "c"}
    batch = normalize("debezium", json.dumps(rec).encode(), ctx())
    assert batch.rejected == 1 and "ordering" in batch.deadletters[0].record["error"]


# ---------------------------------------------------------------- Jobber


def test_jobber_job_complete_with_job_data():
    ident = IdentityMap()
    ident.link("dispatch", "Z2lkOi8vSm9iYmVyL0NsaWVudC8xMjM=", "001RM000003Z9aBYAS")
    [ev] = events("jobber", "jobber_job_complete.json", ctx(ident))
    assert ev["entity_type"] == "job" and ev["source_system"] == "dispatch" and ev["op"] == "update"
    assert ev["payload"]["status"] == "completed" and ev["changed_fields"] == ["status"]
    assert ev["payload"]["lines"][0] == {"sku": "SVC-BOILER", "description": "Boiler service", "quantity": 2,
                                         "unit_price_cents": 15000}
    assert ev["customer_id"] == "001RM000003Z9aBYAS"
    assert ev["seq"] == ev["occurred_at"] == 1714595400000  # 15:30 -05:00


def test_jobber_ids_only_update_needs_reread_and_destroy_deletes():
    batch = normalize("jobber", raw("jobber_job_update_ids_only.json"), ctx())
    assert batch.events == [] and batch.gaps == 1
    body = json.loads(raw("jobber_job_update_ids_only.json"))
    body["data"]["webHookEvent"]["topic"] = "JOB_DESTROY"
    [m] = jobber.map_record(body, b"", ctx()).events
    assert m.event["op"] == "delete" and m.event["payload"] is None


def test_jobber_hmac_valid_and_tampered():
    body = raw("jobber_job_complete.json")
    sig = jobber.sign("jb-secret", body)
    assert base64.b64decode(sig) and len(base64.b64decode(sig)) == 32
    jobber.verify("jb-secret", body, sig)
    with pytest.raises(jobber.SignatureError):
        jobber.verify("jb-secret", body + b" ", sig)
    with pytest.raises(jobber.SignatureError):
        jobber.verify("jb-secret", body, None)


# ---------------------------------------------------------------- CSV


def test_csv_groups_rows_per_entity_and_rejects_a_bad_row_alone():
    batch = normalize("csv", raw("spreadsheet.csv"), ctx(), name="spreadsheet.csv")
    by = {(m.event["entity_type"], m.event["entity_id"]): m.event for m in batch.events}
    assert set(by) == {("customer", "001RM000003Z9aBYAS"), ("deal", "006RM000004ABCDYA4"), ("job", "job-3301"),
                       ("invoice", "inv-88")}
    deal = by[("deal", "006RM000004ABCDYA4")]
    assert deal["payload"]["stage"] == "closed_won" and deal["payload"]["amount_cents"] == 42000
    assert len(deal["payload"]["lines"]) == 2 and deal["seq"] == 4 and deal["op"] == "snapshot"
    assert by[("invoice", "inv-88")]["payload"]["due_at"] == 1717113600000
    assert batch.rejected == 1
    dl = batch.deadletters[0].record
    assert "row 3" in dl["error"] and "quantity 0" in dl["error"] and b"Bolt Electric" in dl["original_value"]


def test_csv_without_version_orders_by_row_and_unknown_columns_are_refused():
    data = b"customer_id,deal_id,deal_stage\nC1,D1,open\nC1,D2,won\n"
    evs = {(e["entity_type"], e["entity_id"]): e for e in (m.event for m in normalize("csv", data, ctx()).events)}
    assert evs[("deal", "D1")]["seq"] == 1 and evs[("deal", "D2")]["seq"] == 2
    batch = normalize("csv", b"customer_id,colour\nC1,red\n", ctx())
    assert batch.events == [] and "colour" in batch.deadletters[0].record["error"]
    assert set(csv_import.COLUMNS) <= set(csv_import.__doc__.split())


# ---------------------------------------------------------------- canonical


def test_canonical_fills_defaults_and_rejects_what_breaks_the_contract():
    batch = normalize("canonical", raw("canonical.jsonl"), ctx())
    [ev] = [m.event for m in batch.events]
    assert ev["event_id"] == "gen-1" and ev["seq_contiguous"] is True and ev["trace_id"]
    assert ev["source_payload"] == raw("canonical.jsonl").splitlines()[0]
    assert batch.rejected == 1 and "changes.crm.deal" in batch.deadletters[0].record["error"]
    with pytest.raises(c.BadInput, match="seq"):
        canonical.map_record({"event_id": "x", "source_system": "crm", "entity_type": "deal", "entity_id": "d",
                              "op": "update", "occurred_at": 1}, b"", ctx())


# ---------------------------------------------------------------- splitting, dedupe, identity


def test_unparseable_lines_are_dead_lettered_with_their_bytes_and_the_rest_goes_on():
    good = raw("stripe_payment_failed.json").replace(b"\n", b"")
    data = good + b"\n{not json\n"
    batch = normalize("stripe", data, ctx())
    assert len(batch.events) == 1 and batch.rejected == 1
    dl = batch.deadletters[0].record
    assert dl["original_value"] == b"{not json" and dl["stage"] == "normalize"
    assert dl["original_topic"] == "ingest.stripe"


def test_json_array_items_keep_their_original_bytes():
    data = b'[ {"a": 1},\n  {"b": [1, 2]} ]'
    assert split_json(data) == [(b'{"a": 1}', {"a": 1}), (b'{"b": [1, 2]}', {"b": [1, 2]})]


def test_dedupe_file_survives_a_restart(tmp_path):
    path = tmp_path / "seen.txt"
    d1 = Deduper(path)
    b1 = normalize("stripe", raw("stripe_invoice_paid.json"), ctx(), d1)
    assert len(b1.events) == 1
    d1.remember(b1.dedupe_keys)
    b2 = normalize("stripe", raw("stripe_invoice_paid.json"), ctx(), Deduper(path))
    assert b2.events == [] and b2.duplicates == 1
    # within one run, a repeated delivery is dropped before anything was remembered
    line = json.dumps(json.loads(raw("stripe_invoice_paid.json"))).encode()
    b3 = normalize("stripe", line + b"\n" + line + b"\n", ctx())
    assert len(b3.events) == 1 and b3.duplicates == 1


def test_identity_map_persists_and_never_guesses(tmp_path):
    path = tmp_path / "id" / "identity.json"
    ident = IdentityMap(path)
    ident.link("billing", "cus_1", "001A")
    ident.learn_profile("001A", "Northwind Traders", "ap@northwind.example", "https://www.northwind.example")
    ident.save()
    again = IdentityMap(path)
    assert again.resolve("billing", "cus_1") == "001A" and again.resolve("billing", "cus_2") is None
    assert again.profiles["001A"]["domain"] == "northwind.example"
    cands = again.candidates(name="Northwind Traders Inc", email="someone@northwind.example")
    assert cands[0]["customer_id"] == "001A" and any("domain" in r for r in cands[0]["reasons"])
    assert again.candidates(name="Completely Different Co") == []
    context = ctx(again)
    cid, cands = c.resolve_customer(context, "billing", "cus_2", {"name": "Northwind Traders"})
    assert cid is None and cands[0]["customer_id"] == "001A"


def test_hubspot_recognises_the_command_property_concords_adapter_writes_as_an_echo():
    body = json.loads(raw("hubspot_batch.json"))[:1]
    body[0].update(propertyName="concord_command_id", propertyValue="concord:cmd_0123abcd", changeSource="API",
                   sourceId="app:1160452", eventId=1701000099)
    batch = normalize("hubspot", json.dumps(body).encode(), ctx())
    assert [m.event["caused_by_command_id"] for m in batch.events] == ["cmd_0123abcd"]
