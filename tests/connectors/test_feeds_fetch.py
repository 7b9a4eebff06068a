"""The fetcher against loopback fakes of Stripe, HubSpot, Jobber and Salesforce: snapshots in order, failures."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from http_helpers import serve
from kafka_helpers import deployment, end_offsets, read_until, start_group_at_end
from test_adapters_crm import tls  # noqa: F401 - the self-signed loopback certificate fixture

from concord.contracts import topics
from connectors.fetch import fetcher as f
from connectors.fetch.fakes import (
    Script,
    as_json,
    hubspot_app,
    hubspot_error,
    jobber_app,
    jobber_throttled,
    salesforce_app,
    salesforce_error,
    stripe_app,
    stripe_error,
)
from connectors.fetch.readers import (
    HubSpotReader,
    JobberReader,
    PermanentReadError,
    SalesforceReader,
    StripeReader,
    TransientReadError,
)
from connectors.inbound import common as c
from connectors.inbound import stripe_events
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import Publisher, normalize
from connectors.outbound.consumer import RetryPolicy

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"
NOW = 1_743_600_000_000
KEY, TOKEN = "sk_test_fetch", "jobber-token"


def thin(uid: str = "0001") -> bytes:
    doc = json.loads((FIX / "stripe_thin_invoice_paid.json").read_text())
    doc["id"] = f"evt_test_thin_{uid}"
    doc["related_object"] = {"id": f"in_{uid}", "type": "invoice", "url": f"/v1/invoices/in_{uid}"}
    return as_json(doc)


def invoice(uid: str = "0001") -> dict:
    obj = json.loads((FIX / "stripe_basil_invoice_paid.json").read_text())["data"]["object"]
    return {**obj, "id": f"in_{uid}"}


def jobber_notice(topic: str = "JOB_UPDATE", item: str = "Z2lkOi8vSm9iYmVyL0pvYi85ODc2NTU=") -> bytes:
    doc = json.loads((FIX / "jobber_job_update_ids_only.json").read_text())
    doc["data"]["webHookEvent"].update(topic=topic, itemId=item)
    return as_json(doc)


def jobber_job(job_id: str = "Z2lkOi8vSm9iYmVyL0pvYi85ODc2NTU=", status: str = "requires_invoicing") -> dict:
    job = json.loads((FIX / "jobber_job_complete.json").read_text())["data"]["webHookEvent"]["job"]
    return {**job, "id": job_id, "jobStatus": status}


class Waits(list):
    """Records the backoff the fetcher asked for instead of sleeping it."""

    def __call__(self, seconds: float) -> bool:
        self.append(round(seconds, 3))
        return False


def make(readers: dict, waits: Waits | None = None, attempts: int = 8) -> f.Fetcher:
    ctx = c.Context(identity=IdentityMap(), clock=lambda: NOW)
    return f.Fetcher(readers, ctx, RetryPolicy(initial=0.2, maximum=10.0, attempts=attempts),
                     wait=waits if waits is not None else Waits(),
                     clock=lambda: NOW)


@pytest.fixture
def stripe_fake():
    script = Script(records={"in_0001": invoice()})
    with serve(stripe_app(script, KEY)) as base:
        script.base = base
        yield script, StripeReader(KEY, base, timeout_s=5)


@pytest.fixture
def jobber_fake():
    script = Script(records={"Z2lkOi8vSm9iYmVyL0pvYi85ODc2NTU=": jobber_job()})
    with serve(jobber_app(script, TOKEN)) as base:
        yield script, JobberReader(TOKEN, f"{base}/api/graphql", timeout_s=5)


# ---------------------------------------------------------------- Stripe


def test_a_thin_event_becomes_the_snapshot_stripe_would_have_sent_in_order(stripe_fake):
    script, reader = stripe_fake
    out = make({"stripe": reader}).handle(f.Notice("stripe", thin(), b"in_0001"))
    [m] = out.batch.events
    ev = m.event
    assert (ev["entity_type"], ev["entity_id"], ev["op"]) == ("invoice", "in_0001", "snapshot")
    assert ev["event_id"] == "stripe:evt_test_thin_0001", "the notice's id: a redelivered notice is the same event"
    created_s = 1743500000  # the thin event's created, 2025-04-01T09:33:20Z
    assert ev["seq"] == created_s * 1000 + stripe_events.RANK["invoice.paid"], "the notification's place in order"
    assert ev["payload"]["status"] == "paid" and ev["payload"]["lines"][0]["sku"] == "price_1RBoilerSvc"
    assert json.loads(ev["source_payload"])["id"] == "in_0001", "the record as the API returned it"
    assert script.calls == ["in_0001"] and not out.exceptions


def test_429_with_retry_after_and_a_5xx_are_retried_with_backoff(stripe_fake):
    script, reader = stripe_fake
    status, _, body = stripe_error(429, "invalid_request_error", "Too many requests", "rate_limit")
    script.failures["in_0001"] = [(status, {"Retry-After": "2"}, body),
                                  stripe_error(500, "api_error", "Something went wrong on Stripe's end.")]
    waits = Waits()
    out = make({"stripe": reader}, waits).handle(f.Notice("stripe", thin(), b"in_0001"))
    assert len(out.batch.events) == 1 and out.attempts == 3
    assert waits == [2.0, 0.4], "Retry-After first, then the policy's doubling"


@pytest.mark.parametrize(("reader_key", "status"), [(KEY, 404), ("sk_test_wrong", 401)])
def test_a_deleted_record_or_bad_credentials_is_a_dead_letter_and_an_exception_for_its_owner(stripe_fake,
                                                                                              reader_key, status):
    script, reader = stripe_fake
    if status == 404:
        script.records.clear()
    else:
        reader = StripeReader(reader_key, script.base)
    raw = thin()
    out = make({"stripe": reader}).handle(f.Notice("stripe", raw, b"in_0001", "deadletter.ingest.stripe", 2, 41))
    assert not out.batch.events
    [dl] = out.batch.deadletters
    assert dl.record["stage"] == "fetch" and dl.record["original_value"] == raw and f"Stripe {status}" in \
        dl.record["error"]
    [exc] = out.exceptions
    assert (exc["reason_code"], exc["owner"], exc["entity_type"]) == ("fetch_failed", "finance", "invoice")
    assert exc["original"]["value"] == raw and exc["original"]["offset"] == 41
    again = make({"stripe": reader}).handle(f.Notice("stripe", raw, b"in_0001"))
    assert again.exceptions[0]["exception_id"] == exc["exception_id"], "a redelivered notice is the same exception"


def test_a_vendor_that_stays_down_stalls_the_notice_uncommitted(stripe_fake):
    script, reader = stripe_fake
    script.failures["in_0001"] = [stripe_error(503, "api_error", "unavailable")] * 3
    with pytest.raises(f.FetchStalled, match="gave up after 3 attempts"):
        make({"stripe": reader}, attempts=3).handle(f.Notice("stripe", thin(), b"in_0001"))


def test_a_timeout_is_transient():
    script = Script(records={"in_0001": invoice()}, latency_s=3.0)
    with serve(stripe_app(script, KEY)) as base:
        with pytest.raises(TransientReadError):
            StripeReader(KEY, base, timeout_s=0.3).read("invoice", "in_0001")


# ---------------------------------------------------------------- Jobber


def test_an_id_only_jobber_webhook_becomes_the_jobs_snapshot(jobber_fake):
    _, reader = jobber_fake
    out = make({"jobber": reader}).handle(f.Notice("jobber", jobber_notice(), b"job"))
    [m] = out.batch.events
    assert (m.event["entity_type"], m.event["op"], m.event["payload"]["status"]) == ("job", "snapshot", "completed")
    assert m.event["seq"] == m.event["occurred_at"] == 1714597200000, "the webhook's occurredAt orders it"
    assert m.event["payload"]["lines"][0]["sku"] == "SVC-BOILER"


def test_a_visit_complete_reads_the_visits_job(jobber_fake):
    script, reader = jobber_fake
    script.records["visit-1"] = jobber_job("Z2lkOi8vSm9iYmVyL0pvYi8xMTE=")
    out = make({"jobber": reader}).handle(f.Notice("jobber", jobber_notice("VISIT_COMPLETE", "visit-1"), b"v"))
    [m] = out.batch.events
    assert m.event["entity_id"] == "Z2lkOi8vSm9iYmVyL0pvYi8xMTE="


def test_jobber_throttling_waits_for_the_cost_bucket_and_a_missing_job_is_permanent(jobber_fake):
    script, reader = jobber_fake
    item = "Z2lkOi8vSm9iYmVyL0pvYi85ODc2NTU="
    script.failures[item] = [jobber_throttled(cost=600, available=100, rate=500), (429, {"Retry-After": "3"}, {})]
    waits = Waits()
    out = make({"jobber": reader}, waits).handle(f.Notice("jobber", jobber_notice(), b"job"))
    assert len(out.batch.events) == 1 and waits == [1.0, 3.0], "(600 - 100) / 500 s, then Retry-After"
    script.records.clear()
    gone = make({"jobber": reader}).handle(f.Notice("jobber", jobber_notice(), b"job"))
    assert gone.exceptions[0]["owner"] == "dispatch-ops" and "Record not found" in gone.batch.deadletters[0].record[
        "error"]
    with pytest.raises(PermanentReadError, match="401"):
        JobberReader("wrong", reader.url).read("job", item)


# ---------------------------------------------------------------- HubSpot


def test_a_hubspot_creation_becomes_the_deal_with_its_company_and_a_secondly_limit_waits_a_second():
    body = json.loads((FIX / "hubspot_object_subscriptions.json").read_text())
    raw = as_json(body)
    script = Script(records={"18273901": {"properties": {"dealname": "Boiler retrofit", "dealstage": "closedwon",
                                                         "amount": "3000.00", "closedate": "2024-05-02T00:00:00Z",
                                                         "deal_currency_code": "USD"}, "companies": ["9912400"]}})
    status, headers, err = hubspot_error(429, "You have reached your secondly limit.", "RATE_LIMITS",
                                         errorType="RATE_LIMIT", policyName="SECONDLY")
    script.failures["18273901"] = [(status, headers, err)]
    waits = Waits()
    with serve(hubspot_app(script, "hs-token")) as base:
        reader = HubSpotReader("hs-token", base)
        out = make({"hubspot": reader}, waits).handle(f.Notice("hubspot", raw, b"18273901"))
        [m] = out.batch.events
        assert (m.event["entity_type"], m.event["entity_id"], m.event["op"]) == ("deal", "18273901", "snapshot")
        assert m.event["payload"]["stage"] == "closed_won" and m.event["payload"]["amount_cents"] == 300000
        # the deal as of its updatedAt (2024-05-01T10:05:00Z): it sorts after every change up to then
        assert m.event["customer_id"] == "9912400" and m.event["seq"] == 1714557900000 * 1000 + 999
        assert waits == [1.0], "HubSpot's secondly limit refills within a second"
        assert script.calls == ["18273901", "18273901"], "the body's other events are not this notice's"
        gone = make({"hubspot": reader}).handle(f.Notice("hubspot", raw.replace(b"18273901", b"18273999"),
                                                         b"18273999"))
        assert "HubSpot 404: Object not found" in gone.batch.deadletters[0].record["error"]
        assert gone.exceptions[0]["owner"] == "revenue-ops", "deals belong to the CRM's owner"


# ---------------------------------------------------------------- Salesforce


def test_a_salesforce_gap_event_becomes_the_records_snapshot_and_a_request_limit_is_transient(tls):  # noqa: F811
    from connectors.fetch.fakes import serve as serve_tls

    server_ctx, ca = tls
    gap = json.loads((FIX / "salesforce_gap.json").read_text())
    hdr = gap["ChangeEventHeader"] if "ChangeEventHeader" in gap else gap["data"]["payload"]["ChangeEventHeader"]
    [rid] = hdr["recordIds"]
    hdr["changeType"] = "GAP_UPDATE"
    script = Script(records={rid: {"Name": "Boiler retrofit", "StageName": "Closed Won", "IsWon": True,
                                   "IsClosed": True, "Amount": 3000.0, "CurrencyIsoCode": "USD",
                                   "CloseDate": "2024-05-02", "AccountId": "001RM000003Z9aBYAS"}})
    script.failures[rid] = [salesforce_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")]
    waits = Waits()
    with serve_tls(salesforce_app(script, "00Dfake!s"), server_ctx) as base:
        reader = SalesforceReader(base, "00Dfake!s", "59.0", verify=ca)
        out = make({"salesforce": reader}, waits).handle(f.Notice("salesforce", as_json(gap), rid.encode()))
        [m] = out.batch.events
        assert (m.event["entity_type"], m.event["entity_id"], m.event["op"]) == ("deal", rid, "snapshot")
        assert m.event["payload"]["stage"] == "closed_won" and m.event["customer_id"] == "001RM000003Z9aBYAS"
        assert m.event["seq"] == hdr["commitNumber"] * 1000 + hdr["sequenceNumber"], "the gap's place in order"
        assert waits == [0.2], "REQUEST_LIMIT_EXCEEDED is retried"
        hdr["changeType"] = "GAP_DELETE"
        [d] = make({"salesforce": reader}).handle(f.Notice("salesforce", as_json(gap), rid.encode())).batch.events
        assert d.event["op"] == "delete" and script.calls == [rid, rid], "a deleted record is not read"
        expired = SalesforceReader(base, "00Dold", "59.0", verify=ca)
        hdr["changeType"] = "GAP_UPDATE"
        failed = make({"salesforce": expired}).handle(f.Notice("salesforce", as_json(gap), rid.encode()))
        assert "Session expired or invalid" in failed.batch.deadletters[0].record["error"]
        assert failed.exceptions[0]["owner"] == "revenue-ops"


# ---------------------------------------------------------------- through the broker


def _notice_on_the_broker(bootstrap: str, raw: bytes) -> None:
    batch = normalize("stripe", raw, c.Context(identity=IdentityMap()))
    assert batch.gaps == 1
    pub = Publisher(bootstrap)
    try:
        pub.publish(batch)
    finally:
        pub.close()


def test_the_fetcher_publishes_snapshots_and_a_fetcher_killed_mid_request_commits_nothing(broker, uid):
    bootstrap = broker.bootstrap_servers
    group = f"fetch-{uid}"
    notices = [topics.deadletter_topic("ingest.stripe")]
    start_group_at_end(bootstrap, group, notices)
    names = deployment(bootstrap, f"concord-test-{uid}")  # where a failed fetch would raise its exception
    invoices = topics.changes_topic("billing", "invoice")
    since = end_offsets(bootstrap, [invoices])
    released = asyncio.Event()
    loop_of_hold: list[asyncio.AbstractEventLoop] = []

    async def hold(_oid: str) -> None:
        loop_of_hold.append(asyncio.get_running_loop())
        await released.wait()

    script = Script(records={f"in_{uid}": invoice(uid)}, hold=hold)
    with serve(stripe_app(script, KEY)) as base:
        _notice_on_the_broker(bootstrap, thin(uid))
        first = make({"stripe": StripeReader(KEY, base)})
        t = threading.Thread(target=f.run, args=(bootstrap, first, names, ("stripe",), group),
                             kwargs={"log": lambda _: None})
        t.start()
        deadline = time.monotonic() + 60
        while f"in_{uid}" not in script.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert script.calls == [f"in_{uid}"], "the first fetcher is in the middle of the request"
        first.stop.set()  # killed mid-request
        loop_of_hold[0].call_soon_threadsafe(released.set)
        t.join(60)
        assert not t.is_alive()
        assert end_offsets(bootstrap, [invoices]) == since, "nothing published"
        second = make({"stripe": StripeReader(KEY, base)})
        t2 = threading.Thread(target=f.run, args=(bootstrap, second, names, ("stripe",), group),
                              kwargs={"log": lambda _: None})
        t2.start()
        try:
            def mine(got: list) -> list:
                return [g.record for g in got if g.topic == invoices and g.record
                        and g.record["entity_id"] == f"in_{uid}"]
            [ev] = mine(read_until(bootstrap, since, lambda got: bool(mine(got)), timeout=60))
        finally:
            second.stop.set()
            t2.join(60)
    assert ev["op"] == "snapshot" and ev["payload"]["status"] == "paid"
    assert script.calls == [f"in_{uid}", f"in_{uid}"], "the notice came back to the second fetcher"


def test_concord_fetch_refuses_to_start_without_a_broker_or_credentials(monkeypatch, capsys):
    from concord.tools import cli

    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    assert cli.main(["fetch"]) == 2 and "KAFKA_BOOTSTRAP_SERVERS" in capsys.readouterr().err
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)
    assert cli.main(["fetch", "--sources", "stripe"]) == 2 and "STRIPE_API_KEY" in capsys.readouterr().err
    assert cli.main(["fetch", "--sources", "pipedrive"]) == 2 and "--sources takes" in capsys.readouterr().err


def test_a_compound_field_changed_in_part_is_published_whole_at_the_updates_place(tls):  # noqa: F811
    from connectors.fetch.fakes import serve as serve_tls

    server_ctx, ca = tls
    raw = (FIX / "salesforce_compound_update.json").read_bytes()
    hdr = json.loads(raw)["data"]["payload"]["ChangeEventHeader"]
    [rid] = hdr["recordIds"]
    script = Script(records={rid: {"Name": "Acme Plumbing Ltd", "Billing_Terms__c": "net45",
                                   "BillingAddress": {"street": "1 Main St", "city": "Shelbyville", "state": "IL",
                                                      "postalCode": "62565", "country": "US"}}})
    with serve_tls(salesforce_app(script, "00Dfake!s"), server_ctx) as base:
        reader = SalesforceReader(base, "00Dfake!s", "59.0", verify=ca)
        [m] = make({"salesforce": reader}).handle(f.Notice("salesforce", raw, rid.encode())).batch.events
    assert m.event["payload"]["billing_address"] == "1 Main St, Shelbyville, IL, 62565, US"
    assert m.event["payload"]["billing_terms"] == "net45" and m.event["op"] == "snapshot"
    assert m.event["seq"] == hdr["commitNumber"] * 1000 + hdr["sequenceNumber"]
