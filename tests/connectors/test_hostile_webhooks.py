"""Hostile bodies at `concord webhooks`: 4xx with a JSON body and a dead letter, never a 5xx, never a stalled loop.

The body is decoded only after its signature is checked (an unsigned non-UTF-8 body is a 401, a signed one a
400 with a dead letter); mapping runs off the event loop (``/healthz`` answers while a body is being mapped)
and within ``CONCORD_INPUT_PARSE_SECONDS`` (past it: 422 and a dead letter); one bad HubSpot event fails alone.
"""

from __future__ import annotations

import json
import random
import threading
import urllib.request
from pathlib import Path

import pytest
from http_helpers import post, serve
from kafka_helpers import end_offsets, read_until

from concord.contracts import topics
from connectors.inbound import fuzz, webhooks
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import Deduper
from connectors.inbound.webhooks import make_app

pytestmark = pytest.mark.broker
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"


@pytest.fixture
def server(broker, tmp_path):
    base_env = dict(fuzz.SECRETS)
    app = make_app(broker.bootstrap_servers, IdentityMap(tmp_path / "id.json"), Deduper(), 10.0, env=base_env)
    with serve(app) as base:
        base_env["CONCORD_WEBHOOK_PUBLIC_URL"] = base  # HubSpot signs the URL it posted to
        yield base


def send(base: str, source: str, body: bytes, signed: bool = True) -> tuple[int, dict]:
    path = f"/webhooks/{source}"
    return post(base + path, body, fuzz.sign(source, body, path, base) if signed else {})


def dead_letter_of(bootstrap: str, since: dict, source: str, body: bytes) -> list:
    topic = topics.deadletter_topic(f"ingest.{source}")
    got = read_until(bootstrap, since, lambda got: any(g.topic == topic and g.record and
                                                       g.record["original_value"] == body for g in got), timeout=30)
    return [g for g in got if g.topic == topic and g.record and g.record["original_value"] == body]


def test_invalid_utf8_is_checked_for_its_signature_before_it_is_decoded(broker, server, uid):
    body = b'{"id": "evt_' + uid.encode() + b'", "type": "invoice.paid", "x": "\xff\xfe"}'
    status, result = send(server, "stripe", body, signed=False)
    assert status == 401 and "Stripe-Signature" in result["error"]
    since = end_offsets(broker.bootstrap_servers, [topics.deadletter_topic("ingest.stripe")])
    status, result = send(server, "stripe", body)
    assert status == 400 and "not UTF-8 text" in result["error"] and result["rejected"] == 1
    [dl] = dead_letter_of(broker.bootstrap_servers, since, "stripe", body)
    assert dl.record["stage"] == "normalize" and dl.record["error_type"] == "BadInput"


def test_signed_hostile_bodies_get_4xx_with_json_never_5xx(server):
    rng = random.Random(13)
    statuses = []
    for n in range(24):
        source = ("stripe", "hubspot", "salesforce", "jobber")[n % 4]
        body = fuzz.mutate(source, rng.choice(fuzz.seeds(source)), rng)
        status, result = send(server, source, body)  # post() parses the JSON body: a non-JSON answer fails here
        statuses.append(status)
        assert status < 500, (source, status, result, body[:200])
        assert status == 200 or result["error"], result
    assert any(400 <= s < 500 for s in statuses)
    assert post(f"{server}/webhooks/salesforce", b"{}", {"Authorization": b"Bearer \xc3\xa9\xff"})[0] == 401


def test_one_bad_hubspot_event_is_dead_lettered_alone(broker, server, uid):
    batch = json.loads((FIX / "hubspot_batch.json").read_text())
    for e in batch:
        e["objectId"] = f"{e['objectId']}{uid}"
    bad = {**batch[0], "eventId": f"bad-{uid}", "occurredAt": {"when": "now"}}
    status, result = send(server, "hubspot", json.dumps([bad, *batch]).encode())
    assert status == 200, result
    assert result["rejected"] == 1 and result["published"] >= 1


def test_healthz_answers_while_a_body_is_mapped_and_a_slow_mapping_is_cut_off(broker, server, uid, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    real = webhooks.map_body

    def held(*args):
        entered.set()
        release.wait(60)  # the mapping is held until the test has seen /healthz answer
        return real(*args)

    monkeypatch.setattr(webhooks, "map_body", held)
    monkeypatch.setenv("CONCORD_INPUT_PARSE_SECONDS", "30")
    body = json.dumps(json.loads((FIX / "stripe_invoice_paid.json").read_text()) | {"id": f"evt_{uid}"}).encode()
    answer: dict = {}
    poster = threading.Thread(target=lambda: answer.update(r=send(server, "stripe", body)))
    poster.start()
    assert entered.wait(30)
    with urllib.request.urlopen(f"{server}/healthz", timeout=30) as r:
        assert r.status == 200 and r.read() == b"ok\n"
    assert poster.is_alive(), "the webhook is still being mapped while /healthz answered"
    release.set()
    poster.join(60)
    assert answer["r"][0] == 200, answer

    release.clear()
    monkeypatch.setenv("CONCORD_INPUT_PARSE_SECONDS", "0.2")
    since = end_offsets(broker.bootstrap_servers, [topics.deadletter_topic("ingest.stripe")])
    slow = body.replace(b"evt_", b"evt_slow_")
    try:
        status, result = send(server, "stripe", slow)
    finally:
        release.set()
    assert status == 422 and "CONCORD_INPUT_PARSE_SECONDS" in result["error"], result
    [dl] = dead_letter_of(broker.bootstrap_servers, since, "stripe", slow)
    assert dl.record["error_type"] == "Timeout"
