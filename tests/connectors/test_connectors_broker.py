"""Connectors against the session's real broker: ``concord ingest`` publishing and the webhook receiver."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import stripe
from http_helpers import post, serve
from kafka_helpers import end_offsets, read_until

from concord.contracts import topics
from concord.runtime import metrics
from concord.runtime.broker import free_port
from concord.tools import cli
from connectors.inbound import hubspot, jobber
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import Deduper
from connectors.inbound.webhooks import make_app

pytestmark = pytest.mark.broker
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"
INVOICES = topics.changes_topic("billing", "invoice")
JOBS = topics.changes_topic("dispatch", "job")
DEALS = topics.changes_topic("crm", "deal")


def stripe_event(uid: str, n: int = 0, etype: str = "invoice.paid", status: str = "paid") -> dict:
    ev = json.loads((FIX / "stripe_invoice_paid.json").read_text())
    ev.update(id=f"evt_{uid}_{n}", type=etype)
    ev["data"]["object"].update(id=f"in_{uid}", status=status)
    return ev


def _dl(source: str) -> str:
    return topics.deadletter_topic(f"ingest.{source}")


def test_ingest_publishes_dead_letters_and_drops_duplicates(broker, uid, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap_servers)
    src = tmp_path / "events.jsonl"
    src.write_text("\n".join([json.dumps(stripe_event(uid, 0, "invoice.finalized", "open")),
                              json.dumps(stripe_event(uid, 1)), f'{{"id": "evt_{uid}_broken", "object": "event"',
                              json.dumps(stripe_event(uid, 1))]) + "\n")
    since = end_offsets(broker.bootstrap_servers, [INVOICES, _dl("stripe")])
    args = ["ingest", "--source", "stripe", str(src), "--identity", str(tmp_path / "id.json"),
            "--dedupe-file", str(tmp_path / "seen.txt")]
    assert cli.main(args) == 3, "3: some items were rejected (and dead-lettered), the rest published"
    err = capsys.readouterr().err
    assert "published 2, duplicate 1, rejected 1" in err
    assert f"{src} item 3 (line 3)" in err and "dead-lettered to deadletter.ingest.stripe" in err

    def done(got):
        mine = [g for g in got if g.topic == INVOICES and g.record and g.record["entity_id"] == f"in_{uid}"]
        dls = [g for g in got if g.topic == _dl("stripe") and g.record and uid.encode() in g.record["original_value"]]
        return len(mine) >= 2 and len(dls) >= 1

    got = read_until(broker.bootstrap_servers, since, done, timeout=30)
    mine = [g for g in got if g.topic == INVOICES and g.record and g.record["entity_id"] == f"in_{uid}"]
    assert [g.record["payload"]["status"] for g in mine] == ["open", "paid"], "same partition, in order"
    assert all(g.key == f"in_{uid}".encode() for g in mine)
    assert mine[0].record["seq"] < mine[1].record["seq"]
    assert mine[1].record["source_payload"] == json.dumps(stripe_event(uid, 1)).encode()
    assert mine[1].headers["concord-source"] == b"stripe"
    [dl] = [g for g in got if g.topic == _dl("stripe") and uid.encode() in g.record["original_value"]]
    assert dl.record["stage"] == "normalize" and dl.record["original_topic"] == "ingest.stripe"
    assert dl.record["original_value"] == f'{{"id": "evt_{uid}_broken", "object": "event"'.encode()

    # a second run with the same dedupe file publishes nothing new
    since2 = end_offsets(broker.bootstrap_servers, [INVOICES])
    assert cli.main(args) == 3, "the broken line is rejected (and dead-lettered) again"
    assert "published 0, duplicate 3" in capsys.readouterr().err
    time.sleep(0.5)
    assert end_offsets(broker.bootstrap_servers, [INVOICES]) == since2


def test_ingest_gap_event_goes_to_the_dead_letter_topic_with_stage_gap(broker, uid, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap_servers)
    rec = json.loads((FIX / "salesforce_gap.json").read_text())
    rec["ChangeEventHeader"]["recordIds"] = [f"006{uid}"]
    since = end_offsets(broker.bootstrap_servers, [_dl("salesforce"), DEALS])
    monkeypatch.setattr("sys.stdin", _Stdin(json.dumps(rec).encode()))
    assert cli.main(["ingest", "--source", "salesforce", "-", "--identity", str(tmp_path / "id.json")]) == 0
    assert "needs re-read 1" in capsys.readouterr().err
    got = read_until(broker.bootstrap_servers, since,
                     lambda got: any(g.topic == _dl("salesforce") and f"006{uid}" in g.record["error"] for g in got),
                     timeout=30)
    [dl] = [g for g in got if g.topic == _dl("salesforce") and f"006{uid}" in g.record["error"]]
    assert dl.record["stage"] == "gap" and dl.headers["concord-stage"] == b"gap"
    assert not [g for g in got if g.topic == DEALS and g.record and g.record["entity_id"] == f"006{uid}"]


class _Stdin:
    def __init__(self, data: bytes) -> None:
        import io

        self.buffer = io.BytesIO(data)


def test_ingest_exits_non_zero_when_the_broker_does_not_acknowledge(tmp_path, monkeypatch, capsys, uid):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    src = tmp_path / "e.json"
    src.write_text(json.dumps(stripe_event(uid)))
    seen = tmp_path / "seen.txt"
    t0 = time.monotonic()
    rc = cli.main(["ingest", "--source", "stripe", str(src), "--no-create-topics", "--timeout", "2",
                   "--identity", str(tmp_path / "id.json"), "--dedupe-file", str(seen)])
    assert rc == 1 and time.monotonic() - t0 < 20
    assert "not acknowledged" in capsys.readouterr().err
    assert not seen.exists() or seen.read_text() == "", "unacknowledged records must not be remembered as seen"


# ---------------------------------------------------------------- webhook receiver


SECRETS = {"STRIPE_WEBHOOK_SECRET": "whsec_concord_test", "HUBSPOT_CLIENT_SECRET": "hs-secret",
           "JOBBER_WEBHOOK_SECRET": "jb-secret", "SALESFORCE_WEBHOOK_TOKEN": "sf-token"}


@pytest.fixture
def server(broker, tmp_path):
    app = make_app(broker.bootstrap_servers, IdentityMap(tmp_path / "id.json"), Deduper(), 10.0, env=SECRETS)
    with serve(app) as base:
        yield base


def test_webhook_answers_200_only_once_the_record_is_on_the_topic(broker, server, uid):
    body = json.dumps(stripe_event(uid)).encode()
    sig = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRETS["STRIPE_WEBHOOK_SECRET"])
    since = end_offsets(broker.bootstrap_servers, [INVOICES])
    status, result = post(f"{server}/webhooks/stripe", body, {"Stripe-Signature": sig})
    assert status == 200 and result["published"] == 1
    # no waiting: the acknowledgement came before the answer, so the high watermark has already moved
    after = end_offsets(broker.bootstrap_servers, [INVOICES])
    # more than before, not exactly one more: the embedded broker reports a partition's end as the start of
    # its last batch + 1, so an earlier multi-record batch can make `since` read low
    assert sum(after.values()) > sum(since.values())
    got = read_until(broker.bootstrap_servers, since,
                     lambda got: any(g.record and g.record["entity_id"] == f"in_{uid}" for g in got), timeout=15)
    [ev] = [g.record for g in got if g.record and g.record["entity_id"] == f"in_{uid}"]
    assert ev["event_id"] == f"stripe:evt_{uid}_0" and ev["source_payload"] == body
    # a redelivery is acknowledged without publishing again
    status, result = post(f"{server}/webhooks/stripe", body, {"Stripe-Signature": sig})
    assert status == 200 and result == {**result, "published": 0, "duplicate": 1}
    assert end_offsets(broker.bootstrap_servers, [INVOICES]) == after


@pytest.mark.parametrize("source", ["stripe", "hubspot", "jobber", "salesforce"])
def test_webhook_rejects_a_bad_signature_with_401_and_publishes_nothing(broker, server, uid, source):
    body = json.dumps(stripe_event(uid)).encode()
    bad = {"stripe": {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body.decode(), "wrong")},
           "hubspot": {"X-HubSpot-Signature-v3": "AAAA", "X-HubSpot-Request-Timestamp": str(int(time.time() * 1000))},
           "jobber": {"X-Jobber-Hmac-SHA256": jobber.sign("wrong", body)},
           "salesforce": {"Authorization": "Bearer nope"}}[source]
    names = [t.name for t in topics.CHANGES] + [_dl(source)]
    labels = {"source": source, "outcome": "unauthorized"}
    before = metrics.REGISTRY.get_sample_value("concord_ingested_total", labels) or 0
    since = end_offsets(broker.bootstrap_servers, names)
    status, result = post(f"{server}/webhooks/{source}", body, bad)
    assert status == 401 and result["error"]
    status, _ = post(f"{server}/webhooks/{source}", body, {})
    assert status == 401
    assert metrics.REGISTRY.get_sample_value("concord_ingested_total", labels) == before + 2
    time.sleep(0.3)
    assert end_offsets(broker.bootstrap_servers, names) == since


def test_webhook_hubspot_and_jobber_signed_requests_are_published(broker, server, uid):
    batch = json.loads((FIX / "hubspot_batch.json").read_text())[:1]
    batch[0].update(objectId=int(uid, 16) % 10**9, eventId=int(uid, 16) % 10**12)
    body = json.dumps(batch).encode()
    ts = str(int(time.time() * 1000))
    url = f"{server}/webhooks/hubspot"
    hs = {"X-HubSpot-Signature-v3": hubspot.sign_v3("hs-secret", "POST", url, body, ts),
          "X-HubSpot-Request-Timestamp": ts}
    jb_body = (FIX / "jobber_job_complete.json").read_bytes().replace(b"Z2lkOi8vSm9iYmVyL0pvYi85ODc2NTQ=",
                                                                      f"job-{uid}".encode())
    since = end_offsets(broker.bootstrap_servers, [DEALS, JOBS])
    assert post(url, body, hs)[0] == 200
    assert post(f"{server}/webhooks/jobber", jb_body, {"X-Jobber-Hmac-SHA256": jobber.sign("jb-secret", jb_body)}) \
        == (200, {"published": 1, "duplicate": 0, "rejected": 0, "needs_reread": 0, "skipped": 0})
    got = read_until(broker.bootstrap_servers, since, lambda got: {g.record["entity_id"] for g in got if g.record}
                     >= {str(batch[0]["objectId"]), f"job-{uid}"}, timeout=15)
    job = next(g.record for g in got if g.record and g.record["entity_id"] == f"job-{uid}")
    assert job["payload"]["status"] == "completed" and job["source_vendor"] == "jobber"


def test_webhook_unparseable_body_is_dead_lettered_then_answered_400(broker, server, uid):
    body = f"not json {uid}".encode()
    sig = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRETS["STRIPE_WEBHOOK_SECRET"])
    since = end_offsets(broker.bootstrap_servers, [_dl("stripe")])
    status, result = post(f"{server}/webhooks/stripe", body, {"Stripe-Signature": sig})
    assert status == 400 and "JSON" in result["error"]
    after = end_offsets(broker.bootstrap_servers, [_dl("stripe")])
    assert sum(after.values()) == sum(since.values()) + 1, "dead-lettered before answering"
    got = read_until(broker.bootstrap_servers, since, lambda got: any(g.record and g.record["original_value"] == body
                                                                      for g in got), timeout=15)
    assert any(g.record["stage"] == "normalize" for g in got if g.record)
    with urllib.request.urlopen(f"{server}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'concord_ingested_total{outcome="rejected",source="stripe"}' in text
