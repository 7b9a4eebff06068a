"""Salesforce GAP_OVERFLOW: a resync of the entity type since the overflow, read through the loopback REST fake."""

import json

from test_adapters_crm import tls  # noqa: F401 - the self-signed loopback certificate fixture

from connectors.fetch import fetcher as f
from connectors.fetch.fakes import Script, as_json, salesforce_app, salesforce_error, serve
from connectors.fetch.readers import SalesforceReader
from connectors.inbound import common as c
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import normalize

OVERFLOW = {"data": {"schema": "abc", "event": {"replayId": 77}, "payload": {"ChangeEventHeader": {
    "entityName": "Account", "recordIds": ["001xx000003GYk1AAG"], "changeType": "GAP_OVERFLOW",
    "changeOrigin": "", "transactionKey": "0002343d-9d90-e395-ed20-cf416ba652ad", "sequenceNumber": 1,
    "commitTimestamp": 1767312000000, "commitNumber": 1234567, "commitUser": "005xx000001Svq5AAC",
    "changedFields": [], "nulledFields": [], "diffFields": []}}}}


def _account(name: str, stamp: str) -> dict:
    return {"Name": name, "Email__c": f"ap@{name.lower()}.example", "Website": None, "Billing_Terms__c": "net_30",
            "Billing_Policy__c": "on_close", "Billing_Account_Id__c": f"cus_{name}", "Dispatch_Account_Id__c": None,
            "BillingAddress": {"street": "1 Main St", "city": "Springfield", "country": "US"},
            "SystemModstamp": stamp, "LastModifiedDate": stamp}


def test_gap_overflow_is_a_durable_resync_request_not_a_placeholder_reread(tls):  # noqa: F811
    raw = as_json(OVERFLOW)
    batch = normalize("salesforce", raw, c.Context(identity=IdentityMap(None)))
    [notice] = batch.deadletters
    assert notice.record["stage"] == "gap" and notice.record["original_value"] == raw
    assert notice.key is None, "no record id: the placeholder is not a record to re-read"
    assert "resync Account records modified since 2026-01-02T00:00:00.000Z" in notice.record["error"]

    server_ctx, ca = tls
    script = Script(records={"001A": _account("Acme", "2026-01-02T00:00:00.000+0000"),
                             "001B": _account("Birch", "2026-01-03T08:00:00.000+0000"),
                             "001C": _account("Cobalt", "2026-01-01T23:59:59.000+0000"),  # before: not read
                             "006D": {"Name": "a deal", "SystemModstamp": "2026-01-04T00:00:00.000+0000"}},
                    page_size=1)  # one record a page: the reader follows nextRecordsUrl
    script.failures["query"] = [salesforce_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")]
    waits: list[float] = []
    with serve(salesforce_app(script, "00Dfake!s"), server_ctx) as base:
        reader = SalesforceReader(base, "00Dfake!s", "59.0", verify=ca)
        fetcher = f.Fetcher({"salesforce": reader}, c.Context(identity=IdentityMap(None)),
                            wait=lambda s: waits.append(s) or False)
        out = fetcher.handle(f.Notice("salesforce", raw, None))
    assert not out.exceptions
    events = [m.event for m in out.batch.events]
    assert [(e["entity_id"], e["op"], e["payload"]["name"]) for e in events] == [
        ("001A", "snapshot", "Acme"), ("001B", "snapshot", "Birch")]
    assert all(e["seq"] == 1234567 * 1000 + 1 for e in events), "the overflow's place in order"
    assert len({e["event_id"] for e in events}) == 2 and events[0]["customer_id"] == "001A"
    soql = [q for q in script.calls if q.startswith("SELECT")]
    assert len(soql) == 2 and "FROM Account WHERE SystemModstamp >= 2026-01-02T00:00:00.000Z" in soql[-1]
    assert waits == [0.2], "REQUEST_LIMIT_EXCEEDED on the query is retried"
    assert json.loads(out.batch.events[1].event["source_payload"])["Id"] == "001B"


def test_a_resync_the_vendor_cannot_answer_is_a_dead_letter_and_an_exception():
    class NoQuery:
        vendor = "salesforce"

        def read(self, *_a):
            raise AssertionError("a resync reads no single record")

    out = f.Fetcher({"salesforce": NoQuery()}, c.Context()).handle(f.Notice("salesforce", as_json(OVERFLOW), None))
    assert out.batch.deadletters[0].record["stage"] == "fetch" and out.exceptions[0]["reason_code"] == "fetch_failed"
    assert "offers no query by modification time" in out.batch.deadletters[0].record["error"]


def test_hubspots_ten_secondly_burst_limit_waits_for_its_window():
    from connectors.fetch.fakes import hubspot_app, hubspot_error
    from connectors.fetch.readers import HubSpotReader

    body = [{"eventId": 1, "subscriptionId": 2, "portalId": 62515, "occurredAt": 1714490400000, "attemptNumber": 0,
             "subscriptionType": "company.propertyChange", "objectId": 9912400, "propertyName": "billing_email"}]
    script = Script(records={"9912400": {"properties": {"name": "Acme", "billing_email": "ap@acme.example"}}})
    script.failures["9912400"] = [hubspot_error(429, "You have reached your ten_secondly_rolling limit.",
                                                "RATE_LIMITS", errorType="RATE_LIMIT",
                                                policyName="TEN_SECONDLY_ROLLING")]
    waits: list[float] = []
    with serve(hubspot_app(script, "hs")) as base:
        fetcher = f.Fetcher({"hubspot": HubSpotReader("hs", base)}, c.Context(identity=IdentityMap(None)),
                            wait=lambda s: waits.append(s) or False)
        out = fetcher.handle(f.Notice("hubspot", as_json(body), b"9912400"))
    [m] = out.batch.events  # a property change without its value: the company read whole
    assert m.event["payload"]["email"] == "ap@acme.example" and m.event["op"] == "snapshot"
    assert waits == [10.0], "the burst window is ten seconds, not one"
