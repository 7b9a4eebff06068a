"""Salesforce compound fields, Pub/Sub bitmaps, one seq scheme per channel, GAP_OVERFLOW; Jobber's occuredAt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connectors.inbound import common as c
from connectors.inbound import jobber, salesforce
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import normalize

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"
NOW = 1_714_600_000_000


def ctx(**settings) -> c.Context:
    return c.Context(identity=IdentityMap(), clock=lambda: NOW, settings=settings)


def doc(name: str) -> dict:
    return json.loads((FIX / name).read_text())


def test_a_compound_field_changed_in_part_asks_for_the_whole_record():
    batch = normalize("salesforce", (FIX / "salesforce_compound_update.json").read_bytes(), ctx())
    assert batch.events == [], "BillingAddress carries City alone: nothing partial goes out at this seq"
    [dl] = batch.deadletters
    assert dl.record["stage"] == "gap" and "BillingAddress.City" in dl.record["error"]
    assert "001RM000003Z9aBYAS" in dl.record["error"]


def test_pubsub_bitmaps_are_decoded_against_the_event_schema():
    rec = doc("salesforce_pubsub_account_update.json")
    schema = rec["schema"]
    names = salesforce.decode_field_list(["0x38", "3-0x02"], schema, ctx(), "changedFields")
    assert names == ["BillingAddress", "Billing_Terms__c", "LastModifiedDate", "BillingAddress.City"]
    out = salesforce.map_record(rec, b"", ctx())
    assert not out.events and [r.change_type for r in out.rereads] == ["UPDATE"], "the partial address is re-read"
    rec["payload"]["ChangeEventHeader"]["changedFields"] = ["0x10"]
    [m] = salesforce.map_record(rec, b"", ctx()).events
    assert m.event["changed_fields"] == ["billing_terms"] and m.event["payload"]["billing_terms"] == "net60"


def test_pubsub_bitmap_schema_by_id_from_the_schema_directory(tmp_path, monkeypatch):
    rec = doc("salesforce_pubsub_account_update.json")
    schema = rec.pop("schema")
    with pytest.raises(c.BadInput, match="schema 'IeRuaY6cbI_HsV8Rv1Mc5g' is not known"):
        salesforce.map_record(rec, b"", ctx())
    (tmp_path / "IeRuaY6cbI_HsV8Rv1Mc5g.avsc").write_text(json.dumps(schema))
    monkeypatch.setenv("CONCORD_SALESFORCE_SCHEMA_DIR", str(tmp_path))
    [rr] = salesforce.map_record(rec, b"", ctx()).rereads
    assert "BillingAddress.City" in rr.reason
    with pytest.raises(c.BadInput, match="bit 9 is past the schema's 6 fields"):
        salesforce.decode_field_list(["0x200"], schema, ctx(), "changedFields")


def test_one_seq_scheme_per_channel():
    cometd, pubsub = doc("salesforce_compound_update.json"), doc("salesforce_pubsub_account_update.json")
    cometd["data"]["payload"]["ChangeEventHeader"]["changedFields"] = ["Billing_Terms__c"]
    pubsub["payload"]["ChangeEventHeader"]["changedFields"] = ["0x10"]
    s1 = salesforce.map_record(cometd, b"", ctx()).events[0].event["seq"]
    s2 = salesforce.map_record(pubsub, b"", ctx()).events[0].event["seq"]
    assert (s1, s2) == (10716790000 * 1000 + 1, 10716790100 * 1000 + 1), "commitNumber whatever the delivery"
    by_replay = salesforce.map_record(pubsub, b"", ctx(salesforce_seq="replayId")).events[0].event["seq"]
    assert by_replay == 23502 * 1000 + 1, "the Pub/Sub replay id's bytes, read as a number"
    bare = cometd["data"]["payload"]
    with pytest.raises(c.BadInput, match="ordered by replayId and the delivery has none"):
        salesforce.map_record(bare, b"", ctx(salesforce_seq="replayId"))
    del bare["ChangeEventHeader"]["commitNumber"]
    with pytest.raises(c.BadInput, match="commitNumber"):
        salesforce.map_record(bare, b"", ctx())


def test_gap_overflow_is_a_resync_of_the_entity_type_not_a_reread_of_a_placeholder():
    batch = normalize("salesforce", (FIX / "salesforce_gap_overflow.json").read_bytes(), ctx())
    assert batch.events == [] and batch.gaps == 1
    err = batch.deadletters[0].record["error"]
    assert "resync Opportunity records modified since 2024-04-30T20:46:40.000Z (commit 10716800000)" in err
    assert "000000000000000AAA" not in err


def test_jobber_occuredat_spelling_is_read():
    body = doc("jobber_job_complete.json")
    hook = body["data"]["webHookEvent"]
    hook["occuredAt"] = hook.pop("occurredAt")
    [m] = jobber.map_record(body, b"", ctx()).events
    assert m.event["occurred_at"] == 1714595400000
    del hook["occuredAt"]
    with pytest.raises(c.BadInput, match="occurredAt"):
        jobber.map_record(body, b"", ctx())
