"""Bad input at the connectors' real entry points: `concord ingest` files and the `concord webhooks` receiver.

Truncated JSON, wrong types, missing ids, unknown event types, a 2 MB payload, bad and stale signatures and the
same webhook delivered twice: each gets a clear error (exit status and a message naming the file and item; an
HTTP status and a JSON body), a dead-letter record with the original bytes (or, for a request that is not
authentic, a log record with the body's sha256), and processing goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import pytest
import stripe
from http_helpers import post, serve
from kafka_helpers import end_offsets, read_until

from concord.contracts import topics
from concord.tools import cli
from connectors.inbound import hubspot, jobber, webhooks
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import DEFAULT_MAX_RECORD_BYTES, Deduper
from connectors.inbound.webhooks import make_app

pytestmark = pytest.mark.broker
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"
INVOICES = topics.changes_topic("billing", "invoice")
JOBS = topics.changes_topic("dispatch", "job")
ACCOUNTS = topics.changes_topic("crm", "customer")
SECRETS = {"STRIPE_WEBHOOK_SECRET": "whsec_badinput", "HUBSPOT_CLIENT_SECRET": "hs-secret",
           "JOBBER_WEBHOOK_SECRET": "jb-secret", "SALESFORCE_WEBHOOK_TOKEN": "sf-token"}


def dl_topic(source: str) -> str:
    return topics.deadletter_topic(f"ingest.{source}")


def stripe_event(uid: str, n: int = 0, **changes) -> dict:
    ev = json.loads((FIX / "stripe_invoice_paid.json").read_text())
    ev.update(id=f"evt_{uid}_{n}", **changes)
    ev["data"]["object"]["id"] = f"in_{uid}_{n}"
    return ev


def line(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def dead_letters(bootstrap: str, since: dict, source: str, marker: bytes, n: int) -> list:
    """The ``n`` dead letters on deadletter.ingest.<source> whose original bytes contain ``marker``."""
    def mine(got: list) -> list:
        return [g for g in got if g.topic == dl_topic(source) and g.record and marker in g.record["original_value"]]
    return mine(read_until(bootstrap, since, lambda got: len(mine(got)) >= n, timeout=30))


# ---------------------------------------------------------------- concord ingest


@pytest.fixture
def ingest(broker, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap_servers)

    def run(source: str, *files: str, dedupe: bool = False) -> tuple[int, str]:
        args = ["ingest", "--source", source, *files, "--identity", str(tmp_path / "id.json")]
        if dedupe:
            args += ["--dedupe-file", str(tmp_path / "seen.txt")]
        rc = cli.main(args)
        return rc, capsys.readouterr().err
    return run


def test_cli_truncated_json_is_dead_lettered_whole_and_the_next_file_still_goes(broker, ingest, uid, tmp_path):
    full = json.dumps(stripe_event(uid, 0), indent=2).encode()
    truncated = full[: len(full) // 2]
    bad, good = tmp_path / "truncated.json", tmp_path / "good.json"
    bad.write_bytes(truncated)
    good.write_bytes(line(stripe_event(uid, 1)))
    since = end_offsets(broker.bootstrap_servers, [INVOICES, dl_topic("stripe")])
    rc, err = ingest("stripe", str(bad), str(good))
    assert rc == 3, err
    assert f"error: {bad}: normalize (BadInput): not JSON (truncated or malformed)" in err
    assert "published 1, duplicate 0, rejected 1" in err
    [dl] = dead_letters(broker.bootstrap_servers, since, "stripe", f"evt_{uid}_0".encode(), 1)
    assert dl.record["original_value"] == truncated, "one dead letter with all the file's bytes, not one per line"
    got = read_until(broker.bootstrap_servers, since, lambda got: any(
        g.record and g.topic == INVOICES and g.record["entity_id"] == f"in_{uid}_1" for g in got), timeout=30)
    assert got


def test_cli_wrong_types_missing_ids_and_unknown_types_name_file_and_item(broker, ingest, uid, tmp_path):
    no_id = stripe_event(uid, 2)
    del no_id["id"]
    list_object = stripe_event(uid, 4)
    list_object["data"]["object"] = [1, 2]
    items = [stripe_event(uid, 0), stripe_event(uid, 1, created="yesterday"), no_id,
             stripe_event(uid, 3, type="charge.refunded"), list_object, stripe_event(uid, 5)]
    src = tmp_path / "events.jsonl"
    src.write_bytes(b"\n".join(line(i) for i in items) + b"\n")
    since = end_offsets(broker.bootstrap_servers, [INVOICES, dl_topic("stripe")])
    rc, err = ingest("stripe", str(src))
    assert rc == 3
    assert "published 2, duplicate 0, rejected 4" in err
    assert f"{src} item 2 (line 2)" in err and "created 'yesterday' is not an integer" in err
    assert f"{src} item 3 (line 3)" in err and "missing required field id" in err
    assert f"{src} item 4 (line 4) record evt_{uid}_3" in err and "'charge.refunded' is not mapped" in err
    assert f"{src} item 5 (line 5) record evt_{uid}_4" in err and "data.object is not an object" in err
    dls = dead_letters(broker.bootstrap_servers, since, "stripe", uid.encode(), 4)
    assert sorted(d.record["original_value"] for d in dls) == sorted(line(i) for i in items[1:5])
    assert all(d.record["stage"] == "normalize" and d.headers["concord-stage"] == b"normalize" for d in dls)


def test_cli_record_over_the_size_limit_is_dead_lettered_with_its_digest(broker, ingest, uid, tmp_path):
    big = stripe_event(uid, 0)
    big["data"]["object"]["description"] = "x" * (2 * 1024 * 1024)
    raw_big = line(big)
    src = tmp_path / "big.jsonl"
    src.write_bytes(raw_big + b"\n" + line(stripe_event(uid, 1)) + b"\n")
    since = end_offsets(broker.bootstrap_servers, [INVOICES, dl_topic("stripe")])
    rc, err = ingest("stripe", str(src))
    assert rc == 3, err
    assert f"{src} item 1 (line 1) record evt_{uid}_0" in err
    assert f"record is {len(raw_big)} bytes, over the {DEFAULT_MAX_RECORD_BYTES}-byte limit" in err
    assert "published 1" in err, "the record after it still goes through"
    [dl] = dead_letters(broker.bootstrap_servers, since, "stripe", f"evt_{uid}_0".encode(), 1)
    kept = dl.record["original_value"]
    assert 0 < len(kept) < DEFAULT_MAX_RECORD_BYTES and raw_big.startswith(kept)
    digest = hashlib.sha256(raw_big).hexdigest()
    assert dl.record["error_type"] == "TooLarge" and digest in dl.record["error"]
    assert dl.headers["concord-original-sha256"] == digest.encode()
    assert dl.headers["concord-original-size"] == str(len(raw_big)).encode()


def test_cli_non_utf8_bytes_keep_their_original_bytes(broker, ingest, uid, tmp_path):
    raw = b"\xff\xfe" + uid.encode() + b" \x80 not text"
    src = tmp_path / "binary.json"
    src.write_bytes(raw)
    since = end_offsets(broker.bootstrap_servers, [dl_topic("debezium")])
    rc, err = ingest("debezium", str(src))
    assert rc == 3 and "not UTF-8 text" in err and str(src) in err
    [dl] = dead_letters(broker.bootstrap_servers, since, "debezium", uid.encode(), 1)
    assert dl.record["original_value"] == raw


def test_cli_unreadable_file_is_reported_and_the_others_are_published(broker, ingest, uid, tmp_path):
    good = tmp_path / "good.json"
    good.write_bytes(line(stripe_event(uid)))
    rc, err = ingest("stripe", str(tmp_path / "missing.json"), str(good))
    assert rc == 2
    assert f"cannot read {tmp_path / 'missing.json'}" in err and "published 1" in err


def test_cli_same_file_twice_is_published_once(broker, ingest, uid, tmp_path):
    src = tmp_path / "once.jsonl"
    src.write_bytes(line(stripe_event(uid, 0)) + b"\n" + line(stripe_event(uid, 1)) + b"\n")
    assert ingest("stripe", str(src), dedupe=True)[0] == 0
    since = end_offsets(broker.bootstrap_servers, [INVOICES])
    rc, err = ingest("stripe", str(src), dedupe=True)
    assert rc == 0 and "published 0, duplicate 2" in err
    time.sleep(0.3)
    assert end_offsets(broker.bootstrap_servers, [INVOICES]) == since


# ---------------------------------------------------------------- concord webhooks


@pytest.fixture
def server(broker, tmp_path):
    app = make_app(broker.bootstrap_servers, IdentityMap(tmp_path / "id.json"), Deduper(), 10.0, env=SECRETS)
    with serve(app) as base:
        yield base


def signed_stripe(body: bytes, timestamp: int | None = None) -> dict[str, str]:
    return {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(
        body.decode(), SECRETS["STRIPE_WEBHOOK_SECRET"], timestamp=timestamp or int(time.time()))}


def signed_jobber(body: bytes) -> dict[str, str]:
    return {"X-Jobber-Hmac-SHA256": jobber.sign(SECRETS["JOBBER_WEBHOOK_SECRET"], body)}


SF = {"Authorization": f"Bearer {SECRETS['SALESFORCE_WEBHOOK_TOKEN']}"}


def jobber_body(uid: str, **hook) -> bytes:
    doc = json.loads((FIX / "jobber_job_complete.json").read_text())
    doc["data"]["webHookEvent"]["job"]["id"] = f"job-{uid}"
    doc["data"]["webHookEvent"]["itemId"] = f"job-{uid}"
    doc["data"]["webHookEvent"].update(hook)
    return json.dumps(doc).encode()


def account_body(uid: str) -> dict:
    doc = json.loads((FIX / "salesforce_account_create.json").read_text())
    payload = doc.get("data", doc).get("payload", doc)
    payload["ChangeEventHeader"]["recordIds"] = [f"001{uid}"]
    payload["ChangeEventHeader"]["transactionKey"] = f"tx-{uid}"
    return doc


def _header(doc: dict) -> dict:
    return doc.get("data", doc).get("payload", doc)["ChangeEventHeader"]


@pytest.mark.parametrize("case", ["truncated", "wrong_type", "missing_id", "unknown_type"])
def test_webhook_bad_bodies_are_dead_lettered_then_answered(broker, server, uid, case):
    if case == "truncated":
        source, body = "stripe", line(stripe_event(uid))[:-40]
        headers, error = signed_stripe(body), "not JSON"
    elif case == "wrong_type":
        source, body = "jobber", jobber_body(uid, occurredAt="soon")
        headers, error = signed_jobber(body), "occurredAt 'soon' is not a timestamp"
    elif case == "missing_id":
        doc = account_body(uid)
        del _header(doc)["recordIds"]
        _header(doc)["transactionKey"] = f"tx-{uid}"
        source, body, headers, error = "salesforce", line(doc), SF, "missing required field ChangeEventHeader.recordIds"
    else:
        source, body = "stripe", line(stripe_event(uid, type="customer.subscription.trial_will_end"))
        headers, error = signed_stripe(body), "is not mapped"
    since = end_offsets(broker.bootstrap_servers, [dl_topic(source)])
    status, result = post(f"{server}/webhooks/{source}", body, headers)
    # an unmapped event type is recorded and acknowledged (no redelivery storm); a broken body is refused
    assert status == (200 if case == "unknown_type" else 400), result
    assert result.get("ignored", False) == (case == "unknown_type")
    assert error in result["error"] and result["rejected"] == 1 and result["published"] == 0
    assert result["dead_letter_topic"] == dl_topic(source)
    [dl] = dead_letters(broker.bootstrap_servers, since, source, uid.encode(), 1)
    assert dl.record["original_value"] == body and dl.record["stage"] == "normalize"
    # and the receiver goes on: a good delivery right after is published
    good = line(stripe_event(uid, 9))
    assert post(f"{server}/webhooks/stripe", good, signed_stripe(good))[0] == 200


def test_webhook_2mb_payload_is_dead_lettered_with_digest_and_answered_413(broker, server, uid):
    big = stripe_event(uid)
    big["data"]["object"]["description"] = "y" * (2 * 1024 * 1024)
    body = line(big)
    since = end_offsets(broker.bootstrap_servers, [INVOICES, dl_topic("stripe")])
    status, result = post(f"{server}/webhooks/stripe", body, signed_stripe(body))
    assert status == 413, result
    digest = hashlib.sha256(body).hexdigest()
    assert result["size"] == len(body) and result["sha256"] == digest and result["limit"] == DEFAULT_MAX_RECORD_BYTES
    assert "over the 900000-byte limit" in result["error"] and result["rejected"] == 1
    [dl] = dead_letters(broker.bootstrap_servers, since, "stripe", f"evt_{uid}_0".encode(), 1)
    assert body.startswith(dl.record["original_value"]) and dl.record["error_type"] == "TooLarge"
    assert dl.headers["concord-original-sha256"] == digest.encode()
    assert not [g for g in read_until(broker.bootstrap_servers, since, lambda got: True, timeout=2)
                if g.topic == INVOICES and g.record and g.record["entity_id"] == f"in_{uid}_0"]
    good = line(stripe_event(uid, 1))
    assert post(f"{server}/webhooks/stripe", good, signed_stripe(good))[0] == 200


def test_webhook_body_over_the_hard_cap_is_refused_unread(broker, server, uid, monkeypatch, caplog):
    monkeypatch.setattr(webhooks, "HARD_CAP", 1_000_000)
    monkeypatch.setenv("CONCORD_MAX_RECORD_BYTES", "500000")
    body = b"z" * 2_000_000
    since = end_offsets(broker.bootstrap_servers, [dl_topic("jobber")])
    with caplog.at_level(logging.WARNING, logger="concord.webhooks"):
        status, result = post(f"{server}/webhooks/jobber", body, signed_jobber(body))
    assert status == 413 and result["size"] == 2_000_000 and "not read, not stored" in result["error"]
    assert any(hashlib.sha256(body).hexdigest() in r.getMessage() for r in caplog.records)
    time.sleep(0.3)
    assert end_offsets(broker.bootstrap_servers, [dl_topic("jobber")]) == since


@pytest.mark.parametrize("case", ["stripe_stale", "stripe_wrong_secret", "hubspot_stale", "jobber_bad"])
def test_webhook_bad_or_stale_signature_is_401_logged_and_nothing_written(broker, server, uid, case, caplog):
    body = line(stripe_event(uid))
    if case == "stripe_stale":
        source, headers, error = "stripe", signed_stripe(body, int(time.time()) - 600), "tolerance"
    elif case == "stripe_wrong_secret":
        source, error = "stripe", "signature"
        headers = {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body.decode(), "nope")}
    elif case == "hubspot_stale":
        ts = str(int((time.time() - 600) * 1000))
        url = f"{server}/webhooks/hubspot"
        source, error = "hubspot", ""
        headers = {"X-HubSpot-Signature-v3": hubspot.sign_v3(SECRETS["HUBSPOT_CLIENT_SECRET"], "POST", url, body, ts),
                   "X-HubSpot-Request-Timestamp": ts}
    else:
        source, headers, error = "jobber", {"X-Jobber-Hmac-SHA256": jobber.sign("wrong", body)}, "does not match"
    names = [t.name for t in topics.CHANGES] + [dl_topic(source)]
    since = end_offsets(broker.bootstrap_servers, names)
    with caplog.at_level(logging.WARNING, logger="concord.webhooks"):
        status, result = post(f"{server}/webhooks/{source}", body, headers)
    assert status == 401 and result["error"] and error.lower() in result["error"].lower()
    refused = [json.loads(r.getMessage()) for r in caplog.records if r.name == "concord.webhooks"]
    assert refused and refused[-1]["status"] == 401 and refused[-1]["sha256"] == hashlib.sha256(body).hexdigest()
    time.sleep(0.3)
    assert end_offsets(broker.bootstrap_servers, names) == since


@pytest.mark.parametrize("source", ["stripe", "jobber", "salesforce"])
def test_webhook_same_delivery_twice_is_published_once(broker, server, uid, source):
    if source == "stripe":
        body, headers, topic = line(stripe_event(uid)), None, INVOICES
        headers = signed_stripe(body)
    elif source == "jobber":
        body, topic = jobber_body(uid), JOBS
        headers = signed_jobber(body)
    else:
        body, headers, topic = line(account_body(uid)), SF, ACCOUNTS
    first = post(f"{server}/webhooks/{source}", body, headers)
    assert first[0] == 200 and first[1]["published"] == 1, first
    after = end_offsets(broker.bootstrap_servers, [topic])
    again = post(f"{server}/webhooks/{source}", body, headers)
    assert again == (200, {**first[1], "published": 0, "duplicate": 1})
    time.sleep(0.3)
    assert end_offsets(broker.bootstrap_servers, [topic]) == after
