"""Join keys as configuration: the metadata key, field or custom field naming another system's id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from concord.exceptions import ConfigError
from concord.tools import cli
from connectors.inbound import common as c
from connectors.inbound import jobber, join_keys, salesforce, stripe_events
from connectors.inbound.identity import IdentityMap

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"
NOW = 1_714_600_000_000
ORG = """\
stripe:
  customer_id: crm_account
  deal_id: crm_deal
  job_id: fsm_job
  invoice_id: erp_invoice
  attempt: try
  sku: item_code
salesforce:
  billing_account_id: Stripe_Customer__c
  dispatch_account_id: Jobber_Client__c
jobber:
  customer_id: sf_account
  deal_id: sf_opportunity
"""


@pytest.fixture
def keys(tmp_path) -> join_keys.JoinKeys:
    path = tmp_path / "join_keys.yaml"
    path.write_text(ORG)
    return join_keys.load(path)


def ctx(keys: join_keys.JoinKeys, identity: IdentityMap | None = None) -> c.Context:
    return c.Context(identity=identity or IdentityMap(), clock=lambda: NOW, settings={"join_keys": keys})


def test_stripe_metadata_keys_come_from_configuration(keys):
    ev = json.loads((FIX / "stripe_basil_invoice_paid.json").read_text())
    obj = ev["data"]["object"]
    obj["metadata"] = {"crm_account": "001X", "crm_deal": "006X", "fsm_job": "job-1"}
    obj["lines"]["data"][0]["metadata"] = {"item_code": "SVC-BOILER"}
    [m] = stripe_events.map_record(ev, b"", ctx(keys)).events
    p = m.event["payload"]
    assert m.event["customer_id"] == "001X" and (p["deal_id"], p["job_id"]) == ("006X", "job-1")
    assert p["lines"][0]["sku"] == "SVC-BOILER"
    default = stripe_events.map_record(ev, b"", c.Context(identity=IdentityMap(), clock=lambda: NOW)).events[0]
    assert default.event["customer_id"] is None, "the shipped keys (concord_customer_id) are not in this metadata"


def test_salesforce_account_fields_naming_billing_and_dispatch_ids_come_from_configuration(keys):
    rec = json.loads((FIX / "salesforce_account_create.json").read_text())
    body = rec["payload"] if "payload" in rec else rec["data"]["payload"]
    body["Stripe_Customer__c"] = body.pop("Billing_Account_Id__c")
    body["Jobber_Client__c"] = body.pop("Dispatch_Account_Id__c")
    ident = IdentityMap()
    [m] = salesforce.map_record(rec, b"", ctx(keys, ident)).events
    assert m.event["payload"]["billing_account_id"] == "cus_Q1acme"
    assert ident.resolve("billing", "cus_Q1acme") == ident.resolve("dispatch", body["Jobber_Client__c"]) == \
        "001RM000003Z9aBYAS"


def test_jobber_custom_fields_naming_the_crm_account_and_deal_come_from_configuration(keys):
    body = json.loads((FIX / "jobber_job_complete.json").read_text())
    job = body["data"]["job"] if "job" in body.get("data", {}) else body["data"]["webHookEvent"]["job"]
    job["customFields"] = {"sf_account": "001Y", "sf_opportunity": "006Y"}
    [m] = jobber.map_record(body, b"", ctx(keys)).events
    assert m.event["customer_id"] == "001Y" and m.event["payload"]["deal_id"] == "006Y"


def test_a_bad_join_key_file_stops_ingest_with_file_and_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "join_keys.yaml"
    path.write_text(ORG.replace("  sku: item_code\n", "  sku: item_code\n  colour: blue\n"))
    with pytest.raises(ConfigError, match=rf"{path}:8: stripe.colour"):
        join_keys.load(path)
    monkeypatch.setenv(join_keys.ENV_VAR, str(path))
    rc = cli.main(["ingest", "--source", "stripe", "--dry-run", str(FIX / "stripe_invoice_paid.json"),
                   "--identity", str(tmp_path / "id.json")])
    assert rc == 2 and f"{path}:8:" in capsys.readouterr().err
