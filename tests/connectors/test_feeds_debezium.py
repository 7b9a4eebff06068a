"""Debezium as deployed: record dumps, ExtractNewRecordState, the outbox EventRouter, embedded schemas, column maps."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka_helpers import end_offsets, read_until

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.exceptions import ConfigError
from concord.tools import cli
from connectors.inbound import common as c
from connectors.inbound import debezium
from connectors.inbound import debezium_mapping as dm
from connectors.inbound.identity import IdentityMap
from connectors.inbound.ingest import normalize

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"
NOW = 1_714_600_000_000
CODEC = Codec()
ERP = dm.load_config(FIX / "debezium_erp_mapping.yaml")


def ctx(**settings) -> c.Context:
    return c.Context(identity=IdentityMap(), clock=lambda: NOW, settings=settings)


def mapped(name: str, context: c.Context | None = None):
    return normalize("debezium", (FIX / name).read_bytes(), context or ctx())


def ms(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp() * 1000)


def one(record: dict, context: c.Context | None = None) -> dict:
    [m] = debezium.map_record(record, json.dumps(record).encode(), context or ctx()).events
    return m.event


# ---------------------------------------------------------------- record dumps


def test_record_dumps_with_timestamp_and_kcat_form_map_and_a_dumped_tombstone_is_skipped():
    batch = mapped("debezium_record_dumps.jsonl")
    assert batch.rejected == 0, [d.record["error"] for d in batch.deadletters]
    assert batch.skipped == 1
    create, update = (m.event for m in batch.events)
    assert (create["entity_type"], create["entity_id"], create["op"], create["seq"]) == ("invoice", "inv-90", "create",
                                                                                         9052000)
    assert create["payload"]["due_at"] == ms(2024, 5, 31), "due_at is a DATE column: days since epoch"
    assert create["payload"]["issued_at"] == ms(2024, 5, 1, 16), "issued_at is a MicroTimestamp"
    assert create["payload"]["amount_due_cents"] == 45000 and create["payload"]["currency"] == "USD"
    assert (update["op"], update["seq"], update["payload"]["status"]) == ("update", 9052400, "paid")
    assert update["changed_fields"] == ["amount_paid_cents", "status"], "Concord field names, not columns"


# ---------------------------------------------------------------- ExtractNewRecordState


def test_extract_new_record_state_rows_with_add_fields_and_rewritten_deletes():
    batch = mapped("debezium_unwrapped.jsonl")
    assert batch.rejected == 0, [d.record["error"] for d in batch.deadletters]
    evs = [m.event for m in batch.events]
    assert [(e["entity_id"], e["op"], e["seq"]) for e in evs] == [
        ("job-4401", "create", 24100112), ("job-4401", "update", 24100560), ("job-4402", "delete", 24100900)]
    assert evs[1]["payload"]["status"] == "completed" and evs[1]["payload"]["completed_at"] == ms(2024, 5, 2, 12)
    assert evs[1]["occurred_at"] == 1714651200000 and evs[2]["payload"] is None


def test_flattened_row_takes_its_table_from_the_topic_and_needs_an_ordering_field():
    row = {"id": "job-9", "status": "scheduled", "__lsn": 51}
    dump = {"topic": "dispatch.public.jobs", "partition": 0, "offset": 3, "timestamp": NOW, "key": {"id": "job-9"},
            "value": row}
    ev = one(dump)
    assert (ev["entity_type"], ev["op"], ev["seq"]) == ("job", "snapshot", 51), "no __op: the full row, a snapshot"
    unordered = {**dump, "value": {"id": "job-9", "status": "scheduled"}}
    with pytest.raises(c.BadInput, match="add.fields must include lsn"):
        debezium.map_record(unordered, b"", ctx())
    with pytest.raises(c.BadInput, match="needs its table"):
        debezium.map_record({"id": "job-9", "status": "scheduled", "__lsn": 5}, b"", ctx())


# ---------------------------------------------------------------- outbox EventRouter


def test_event_router_output_key_is_the_aggregate_headers_name_the_event_and_a_payment_stays_a_payment():
    batch = mapped("debezium_outbox_router.jsonl")
    assert batch.rejected == 0, [d.record["error"] for d in batch.deadletters]
    pay, inv = (m.event for m in batch.events)
    assert (pay["entity_type"], pay["entity_id"], pay["event_id"]) == (
        "payment", "pay-601", "dbz-outbox:5d3c1e2a-8f4b-4c6d-9e0f-1a2b3c4d5e6f")
    assert pay["payload"]["invoice_id"] == "88", "an integer foreign key is the same id as text"
    assert pay["seq"] == 17 and pay["occurred_at"] == 1714580100000, "no version: the partition offset orders it"
    assert pay["op"] == "update" and pay["payload"]["attempt"] == 1
    _, back = CODEC.decode(CODEC.encode("change_event", pay))
    assert back["payload"]["amount_cents"] == 45000 and "amount_due_cents" not in back["payload"]
    assert (inv["entity_type"], inv["entity_id"], inv["seq"]) == ("invoice", "inv-90", 4), "payload version wins"
    assert inv["payload"]["status"] == "paid"


def test_event_router_output_for_an_unmapped_aggregate_or_without_a_key_is_rejected():
    rec = {"topic": "outbox.event.order", "partition": 0, "offset": 1, "key": "o-1",
           "headers": {"id": "x", "eventType": "OrderCreated"}, "value": "{}"}
    with pytest.raises(c.BadInput, match="aggregate type 'order' is not mapped"):
        debezium.map_record(rec, b"", ctx())
    with pytest.raises(c.BadInput, match="has no key"):
        debezium.map_record({**rec, "topic": "outbox.event.payment", "key": None}, b"", ctx())


# ---------------------------------------------------------------- schemas.enable=true and column mappings


def test_embedded_schema_types_and_a_configured_column_mapping():
    batch = mapped("debezium_schema_enabled.json", ctx(debezium=ERP))
    assert batch.rejected == 0, [d.record["error"] for d in batch.deadletters]
    [ev] = [m.event for m in batch.events]
    assert (ev["entity_type"], ev["entity_id"], ev["seq"]) == ("invoice", "7001", 77120040)
    p = ev["payload"]
    assert p["amount_due_cents"] == 1234567, "Decimal(12,2) bytes 'EtaH' = 12345.67"
    assert p["amount_paid_cents"] == 0, "VariableScaleDecimal {scale 2, value 0}"
    assert p["issued_at"] == ms(2024, 5, 1) and p["due_at"] == ms(2024, 5, 31), "Date = days since epoch"
    assert p["currency"] == "EUR" and ev["customer_id"] == "001RM000003Z9aBYAS"


def test_schema_logical_types_win_over_the_configured_unit():
    stamp = {"type": "int64", "name": "io.debezium.time.MicroTimestamp"}
    assert dm.read(dm.typed(1714579200000000, stamp, "c"), "timestamp_ms", "c") == ms(2024, 5, 1, 16)
    zoned = {"type": "string", "name": "io.debezium.time.ZonedTimestamp"}
    assert dm.read(dm.typed("2024-05-01T18:00:00+02:00", zoned, "c"), "timestamp_us", "c") == ms(2024, 5, 1, 16)
    nano = {"type": "int64", "name": "io.debezium.time.NanoTimestamp"}
    assert dm.read(dm.typed(1714579200000000000, nano, "c"), "timestamp_s", "c") == ms(2024, 5, 1, 16)
    dec = {"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}}
    assert dm.read(dm.typed("/gw=", dec, "c"), "money", "c") == -500, "two's complement: -5.00"
    assert dm.read(19874, "date", "c") == ms(2024, 5, 31), "a DATE without a schema is still days"
    with pytest.raises(c.BadInput, match="not a Date"):
        dm.typed("soon", {"type": "int32", "name": "io.debezium.time.Date"}, "due")


# ---------------------------------------------------------------- no silent defaults


def _invoice_row(**cols) -> dict:
    after = {"id": "inv-1", "status": "open", "amount_due_cents": 100, "amount_paid_cents": 0, "currency": "USD",
             **cols}
    return {"before": None, "after": {k: v for k, v in after.items() if v is not ...}, "op": "c",
            "source": {"name": "billing", "table": "invoices", "lsn": 10, "ts_ms": NOW}}


@pytest.mark.parametrize(("cols", "reason"), [
    ({"amount_due_cents": ..., "total_cents": 100}, "invoices.amount_due_cents (→ amount_due_cents) is missing"),
    ({"amount_due_cents": None}, "amount_due_cents (→ amount_due_cents) is null"),
    ({"amount_due_cents": "12.5"}, "is not a whole number"),
    ({"amount_due_cents": True}, "is not an integer"),
    ({"currency": ...}, "currency (→ currency) is missing"),
    ({"due_at": "next week"}, "not an ISO 8601 date"),
    ({"deal_id": 4.5}, "is not an id"),
    ({"status": "__debezium_unavailable_value"}, "REPLICA IDENTITY FULL"),
])
def test_a_missing_or_wrongly_typed_mapped_value_is_a_dead_letter_with_the_reason(cols, reason):
    rec = _invoice_row(**cols)
    raw = json.dumps(rec).encode()
    batch = normalize("debezium", raw, ctx())
    assert not batch.events and batch.rejected == 1
    [dl] = batch.deadletters
    assert reason in dl.record["error"] and dl.record["original_value"] == raw


def test_a_default_the_configuration_states_is_used_and_one_it_does_not_state_is_not():
    pay = {"before": None, "after": {"id": "p1", "status": "succeeded", "amount_cents": 5, "currency": "USD"},
           "op": "c", "source": {"table": "payments", "lsn": 3}}
    assert one(pay)["payload"]["attempt"] == 1, "debezium.yaml says attempt: default 1"
    del pay["after"]["amount_cents"]
    with pytest.raises(c.BadInput, match="amount_cents"):
        debezium.map_record(pay, b"", ctx())


# ---------------------------------------------------------------- the configuration is checked at start-up


@pytest.mark.parametrize(("text", "line", "message"), [
    ("tables:\n  bills:\n    entity: invoice\n    fields:\n      status: {column: s, type: string}\n",
     3, "invoice needs a column for amount_due_cents"),
    ("tables:\n  bills:\n    entity: payment\n    fields:\n      amount_cents: {column: a, type: date}\n",
     5, "amount_cents cannot be read as date"),
    ("tables:\n  jobs:\n    entity: job\n    fields:\n      status: {column: s, type: string}\n"
     "      colour: {column: c, type: string}\n", 5, "'colour' is not a field of job"),
    ("tables:\n  jobs:\n    entity: job\n    fields:\n      status: {column: s, type: text}\n", 5, "type"),
    ("tables:\n  jobs:\n    entity: job\n    fields:\n      status: {column: s, type: string}\n"
     "outbox:\n  aggregates:\n    job: work\n", 1, "names 'work'"),
])
def test_a_bad_mapping_file_names_its_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "dbz.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        dm.load_config(path)
    assert f"{path}:{line}:" in str(err.value) and message in str(err.value)


def test_the_shipped_mapping_loads():
    cfg = dm.load_config(dm.DEFAULT_PATH)
    assert {t.entity for t in cfg.tables.values()} == {"job", "invoice", "payment", "outbox"}


def test_concord_ingest_refuses_a_bad_mapping_before_reading_records(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tables:\n  bills:\n    entity: invoice\n")
    rc = cli.main(["ingest", "--source", "debezium", "--debezium-config", str(bad), "--dry-run",
                   str(FIX / "debezium_schema_enabled.json"), "--identity", str(tmp_path / "id.json")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:3:" in err and "amount_due_cents" in err


# ---------------------------------------------------------------- through the broker


def test_ingest_publishes_a_mapped_erp_invoice_and_dead_letters_a_bad_row(broker, tmp_path, uid, monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap_servers)
    doc = json.loads((FIX / "debezium_schema_enabled.json").read_text())
    doc["payload"]["after"]["invoice_no"] = uid
    bad = json.loads(json.dumps(doc))
    bad["payload"]["after"].update(invoice_no=f"{uid}-bad", total=None)
    src = tmp_path / "erp.jsonl"
    src.write_text(json.dumps(doc) + "\n" + json.dumps(bad) + "\n")
    invoices, dl = topics.changes_topic("billing", "invoice"), topics.deadletter_topic("ingest.debezium")
    since = end_offsets(broker.bootstrap_servers, [invoices, dl])
    rc = cli.main(["ingest", "--source", "debezium", "--debezium-config", str(FIX / "debezium_erp_mapping.yaml"),
                   str(src), "--identity", str(tmp_path / "id.json")])
    err = capsys.readouterr().err
    assert rc == 3 and "bills.total (→ amount_due_cents) is null" in err, err

    def mine(got: list) -> tuple[list, list]:
        evs = [g.record for g in got if g.topic == invoices and g.record and g.record["entity_id"] == uid]
        dls = [g.record for g in got
               if g.topic == dl and g.record and f"{uid}-bad".encode() in g.record["original_value"]]
        return evs, dls
    [ev], [dead] = mine(read_until(broker.bootstrap_servers, since, lambda got: all(mine(got)), timeout=30))
    assert ev["payload"]["amount_due_cents"] == 1234567
    assert dead["original_value"] == json.dumps(bad).encode() and "amount_due_cents" in dead["error"]
