"""HubSpot as new apps receive it: object.* subscriptions, configured stage maps, associations, values, merges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from concord.exceptions import ConfigError
from connectors.inbound import common as c
from connectors.inbound import hubspot
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import normalize

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"
NOW = 1_714_600_000_000
STAGES = hubspot.load_config(FIX / "hubspot_stages.yaml")


def ctx(identity: IdentityMap | None = None, **settings) -> c.Context:
    return c.Context(identity=identity or IdentityMap(), clock=lambda: NOW, settings=settings)


def test_object_subscriptions_map_stage_values_associations_and_merges():
    ident = IdentityMap()
    batch = normalize("hubspot", (FIX / "hubspot_object_subscriptions.json").read_bytes(), ctx(ident, hubspot=STAGES))
    assert batch.rejected == 0, [d.record["error"] for d in batch.deadletters]
    evs = [m.event for m in batch.events]
    assert [(e["entity_type"], e["entity_id"], e["op"]) for e in evs] == [
        ("deal", "18273900", "update"), ("deal", "18273900", "update"), ("deal", "18273900", "update"),
        ("customer", "9912400", "update"), ("customer", "9912400", "update"), ("customer", "9912399", "delete")]
    assoc, stage, amount, billing, survivor, merged = evs
    assert assoc["customer_id"] == "9912400" and assoc["payload"] is None, "the deal now belongs to the company"
    assert stage["payload"]["stage"] == "closed_won", "a custom pipeline's won stage, from the stage map"
    assert stage["customer_id"] == "9912400", "later deal events resolve through the association"
    assert amount["payload"]["amount_cents"] == 150050 and amount["changed_fields"] == ["amount_cents"]
    assert billing["payload"]["billing_account_id"] == "cus_Q1acme" and billing["changed_fields"] == [
        "billing_account_id"]
    assert ident.resolve("billing", "cus_Q1acme") == "9912400", "billing joins the company's customer"
    assert merged["customer_id"] == "9912399" and survivor["customer_id"] == "9912400"
    assert ident.resolve("hubspot-company", "9912399") == "9912400"
    assert batch.gaps == 1, "object.creation carries no properties: a re-read notice"


def test_an_unlisted_stage_is_a_dead_letter_not_open():
    body = json.loads((FIX / "hubspot_object_subscriptions.json").read_text())[1:2]
    batch = normalize("hubspot", json.dumps(body).encode(), ctx())
    assert not batch.events and "deal stage '93310247' is not in the stage map" in batch.deadletters[0].record["error"]


def test_after_a_merge_the_merged_away_companys_deals_land_on_the_survivor():
    ident = IdentityMap()
    ident.link("hubspot-deal", "555", "9912399")
    merge = {"eventId": 1, "subscriptionId": 2, "occurredAt": NOW, "subscriptionType": "object.merge",
             "objectTypeId": "0-2", "objectId": 9912400, "primaryObjectId": 9912400, "mergedObjectIds": [9912399],
             "newObjectId": 9912400}
    hubspot.map_record(merge, b"", ctx(ident))
    change = {"eventId": 3, "subscriptionId": 4, "occurredAt": NOW + 1, "subscriptionType": "deal.propertyChange",
              "objectId": 555, "propertyName": "dealname", "propertyValue": "Boiler retrofit"}
    [m] = hubspot.map_record(change, b"", ctx(ident)).events
    assert m.event["customer_id"] == "9912400" and m.event["payload"]["name"] == "Boiler retrofit"
    late = {**change, "eventId": 5, "subscriptionType": "company.propertyChange", "objectId": 9912399,
            "propertyName": "name", "propertyValue": "Acme (old)"}
    [m] = hubspot.map_record(late, b"", ctx(ident)).events
    assert m.event["customer_id"] == "9912400", "a late event of the merged-away company goes to the survivor"


def test_a_removed_or_secondary_association_does_not_move_the_deal():
    assoc = {"eventId": 1, "subscriptionId": 2, "occurredAt": NOW, "subscriptionType": "deal.associationChange",
             "associationType": "DEAL_TO_COMPANY", "fromObjectId": 7, "toObjectId": 8, "associationRemoved": False,
             "isPrimaryAssociation": False}
    ident = IdentityMap()
    assert hubspot.map_record(assoc, b"", ctx(ident)).skipped == 1 and ident.resolve("hubspot-deal", "7") is None
    [m] = hubspot.map_record({**assoc, "isPrimaryAssociation": True, "associationRemoved": True}, b"",
                             ctx(ident)).events
    assert m.event["customer_id"] is None and ident.resolve("hubspot-deal", "7") is None
    hubspot.map_record({**assoc, "isPrimaryAssociation": True}, b"", ctx(ident))
    assert ident.resolve("hubspot-deal", "7") == "8"
    hubspot.map_record({**assoc, "eventId": 9, "isPrimaryAssociation": True, "associationRemoved": True}, b"",
                       ctx(ident))
    assert ident.resolve("hubspot-deal", "7") is None, "a removed association is forgotten"
    contact = {**assoc, "associationType": "DEAL_TO_CONTACT", "isPrimaryAssociation": True}
    assert hubspot.map_record(contact, b"", ctx(ident)).skipped == 1


def test_a_bad_property_value_names_the_property():
    ev = {"eventId": 1, "subscriptionId": 2, "occurredAt": NOW, "subscriptionType": "deal.propertyChange",
          "objectId": 9, "propertyName": "amount", "propertyValue": "lots"}
    with pytest.raises(c.BadInput, match="amount 'lots' is not a number"):
        hubspot.map_record(ev, b"", ctx())


def test_a_bad_stage_map_names_its_file_and_line(tmp_path):
    path = tmp_path / "hubspot.yaml"
    path.write_text("stages:\n  closedwon: won\n  closedlost: maybe\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: stages.closedlost"):
        hubspot.load_config(path)


def test_stages_from_a_cached_pipelines_response_and_listed_stages_win(tmp_path):
    (tmp_path / "pipelines.json").write_text((FIX / "hubspot_pipelines_deals.json").read_text())
    path = tmp_path / "hubspot.yaml"
    path.write_text("pipelines_cache: pipelines.json\nstages:\n  93310245: won\n")
    cfg = hubspot.load_config(path)
    assert cfg.stages["93310247"] == "won" and cfg.stages["93310248"] == "lost"
    assert cfg.stages["appointmentscheduled"] == "open" and cfg.stages["93310245"] == "won", "the listed one wins"
    ev = {"eventId": 1, "subscriptionId": 2, "occurredAt": NOW, "subscriptionType": "deal.propertyChange",
          "objectId": 9, "propertyName": "dealstage", "propertyValue": "93310248"}
    [m] = hubspot.map_record(ev, b"", ctx(hubspot=cfg)).events
    assert m.event["payload"]["stage"] == "closed_lost"


def test_a_closed_stage_with_an_in_between_probability_is_not_guessed():
    doc = json.loads((FIX / "hubspot_pipelines_deals.json").read_text())
    doc["results"][1]["stages"][1]["metadata"]["probability"] = "0.9"
    with pytest.raises(ConfigError, match="closed stage '93310247' has probability 0.9"):
        hubspot.stages_from_pipelines(doc)
