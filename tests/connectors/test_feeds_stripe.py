"""Stripe's current shapes (2025-03-31 basil: InvoicePayment, pricing.price_details, thin events) beside older ones."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import stripe
from http_helpers import post, serve
from kafka_helpers import end_offsets, read_until

from concord.contracts import topics
from concord.domain.status import apply_event, empty_status, invoice_paid
from connectors.inbound import common as c
from connectors.inbound import stripe_events
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import Deduper, normalize
from connectors.inbound.webhooks import make_app

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"
NOW = 1_743_600_000_000
SECRET = "whsec_feeds"


def ctx(identity: IdentityMap | None = None) -> c.Context:
    return c.Context(identity=identity or IdentityMap(), clock=lambda: NOW)


def raw(name: str) -> bytes:
    return (FIX / name).read_bytes()


def one(name: str, context: c.Context) -> dict:
    batch = normalize("stripe", raw(name), context)
    assert batch.rejected == 0, [d.record["error"] for d in batch.deadletters]
    [m] = batch.events
    return m.event


def test_basil_invoice_lines_take_their_sku_from_pricing_price_details():
    ev = one("stripe_basil_invoice_paid.json", ctx())
    assert ev["payload"]["lines"] == [{"sku": "price_1RBoilerSvc", "description": "Boiler service", "quantity": 2,
                                       "unit_price_cents": 15000}]
    assert ev["payload"]["status"] == "paid" and ev["payload"]["deal_id"] == "006RM000004ABCDYA4"


def test_an_invoice_says_whom_billing_billed_and_its_address_object_becomes_one_line():
    ev = one("stripe_invoice_paid.json", ctx())
    assert (ev["payload"]["customer_name"], ev["payload"]["customer_email"]) == (
        "Acme Plumbing Ltd", "ap@acmeplumbing.example")
    record = json.loads(raw("stripe_invoice_paid.json"))
    record["data"]["object"]["customer_address"] = {"line1": "1 Main St", "line2": None, "city": "Leeds",
                                                    "state": None, "postal_code": "LS1 4AP", "country": "GB"}
    [m] = normalize("stripe", json.dumps(record).encode(), ctx()).events
    assert m.event["payload"]["customer_address"] == "1 Main St, Leeds, LS1 4AP, GB"


def test_invoice_payment_links_the_payment_intent_to_its_invoice_and_the_payment_joins_it():
    ident = IdentityMap()
    ident.link("billing", "cus_Q1acme", "001RM000003Z9aBYAS")
    context = ctx(ident)
    pi = one("stripe_basil_payment_intent_succeeded.json", context)
    inv = one("stripe_basil_invoice_paid.json", context)
    link = one("stripe_basil_invoice_payment_paid.json", context)
    assert pi["payload"]["invoice_id"] is None and "invoice_id" not in pi["changed_fields"]
    assert (link["entity_type"], link["entity_id"]) == ("payment", "pi_3RBasilPi000001"), "the payment's own id"
    assert link["payload"]["invoice_id"] == "in_1RBasilInv00001" and link["payload"]["amount_cents"] == 30000
    assert link["customer_id"] == "001RM000003Z9aBYAS", "found through the invoice it pays"
    assert link["seq"] > pi["seq"], "the link ranks after the PaymentIntent's own event"
    st = empty_status("001RM000003Z9aBYAS")
    for ev in (pi, link, inv):
        assert apply_event(st, ev)
    assert st["payments"]["pi_3RBasilPi000001"]["invoice_id"] == "in_1RBasilInv00001"
    assert invoice_paid(st, "in_1RBasilInv00001")
    later = {**pi, "seq": link["seq"] + 1000, "event_id": "stripe:evt_later"}
    apply_event(st, later)
    assert st["payments"]["pi_3RBasilPi000001"]["invoice_id"] == "in_1RBasilInv00001", "a later PI keeps the link"


def test_older_versions_still_read_the_payment_intents_invoice():
    ev = one("stripe_payment_failed.json", ctx())
    assert ev["payload"]["invoice_id"] == "in_1PB7nh2eZvKYlo2Ck8Tq3xYz" and "invoice_id" not in ev["changed_fields"]
    assert ev["changed_fields"] == ["status"]


def test_last_payment_error_keeps_code_and_type():
    ev = one("stripe_basil_payment_failed.json", ctx())
    assert ev["payload"]["failure_reason"] == "expired_card (card_error)"


@pytest.mark.parametrize(("path", "value", "reason"), [
    (("amount_due",), None, "missing required field data.object.amount_due"),
    (("currency",), None, "missing required field data.object.currency"),
    (("lines", "data", 0, "pricing", "unit_amount_decimal"), "1500.5", "fraction of the smallest currency unit"),
])
def test_an_invoice_missing_its_amount_or_currency_is_a_dead_letter_not_a_zero(path, value, reason):
    doc = json.loads(raw("stripe_basil_invoice_paid.json"))
    node = doc["data"]["object"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    body = json.dumps(doc).encode()
    batch = normalize("stripe", body, ctx())
    assert not batch.events and reason in batch.deadletters[0].record["error"]
    assert batch.deadletters[0].record["original_value"] == body


def test_a_thin_event_is_a_fetch_notice_for_its_related_object():
    out = stripe_events.map_record(json.loads(raw("stripe_thin_invoice_paid.json")), b"x", ctx())
    [rr] = out.rereads
    assert not out.events
    assert (rr.entity_type, rr.entity_ids, rr.change_type) == ("invoice", ["in_1RBasilInv00001"], "v1.invoice.paid")
    assert "/v1/invoices/in_1RBasilInv00001" in rr.reason and rr.dedupe_key == "stripe:evt_test_65RBasilThin0001"
    with pytest.raises(c.BadInput, match="billing.meter"):
        stripe_events.map_record({"id": "evt_x", "object": "v2.core.event", "type": "v1.billing.meter.no_meter_found",
                                  "related_object": {"id": "mtr_1", "type": "billing.meter"}}, b"", ctx())


def test_a_signed_thin_event_is_accepted_and_becomes_a_fetch_notice(broker, tmp_path):
    app = make_app(broker.bootstrap_servers, IdentityMap(tmp_path / "id.json"), Deduper(), 10.0,
                   env={"STRIPE_WEBHOOK_SECRET": SECRET})
    body = raw("stripe_thin_invoice_paid.json").replace(b"Thin0001", f"Thin{int(time.time() * 1e6)}".encode())
    dl = topics.deadletter_topic("ingest.stripe")
    since = end_offsets(broker.bootstrap_servers, [dl])
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET, timestamp=int(time.time()))
    with serve(app) as base:
        status, answer = post(f"{base}/webhooks/stripe", body, {"Stripe-Signature": header})
    assert status == 200 and answer["needs_reread"] == 1, answer

    def mine(got: list) -> list:
        return [g.record for g in got if g.record and g.record["original_value"] == body]
    [notice] = mine(read_until(broker.bootstrap_servers, since, lambda got: bool(mine(got)), timeout=30))
    assert notice["stage"] == "gap" and "in_1RBasilInv00001" in notice["error"]
