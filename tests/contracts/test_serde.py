"""Codec: single-object framing round-trips; bad bytes raise DecodeError saying why."""

import pytest

from concord.contracts.codec import SINGLE_OBJECT_MAGIC, Codec
from concord.exceptions import DecodeError


def change(**kw):
    base = dict(event_id="e1", source_system="crm", entity_type="deal", entity_id="d1", seq=3, op="update",
                occurred_at=1_700_000_000_000, ingested_at=1_700_000_000_500, trace_id="t1",
                payload={"stage": "closed_won", "lines": [{"sku": "SVC-1", "quantity": 2}]})
    base.update(kw)
    return base


def test_round_trip_single_object():
    codec = Codec()
    data = codec.encode("change_event", change())
    assert data[:2] == SINGLE_OBJECT_MAGIC
    name, rec = codec.decode(data)
    assert name == "change_event"
    assert rec["payload"]["lines"][0] == {"sku": "SVC-1", "description": "", "quantity": 2, "unit_price_cents": 0}
    assert rec["occurred_at"] == 1_700_000_000_000


@pytest.mark.parametrize("bad,why", [
    (b"", "empty"),
    (b"{\"json\": true}", "not Avro-framed"),
    (SINGLE_OBJECT_MAGIC + b"\x01\x02", "truncated"),
    (SINGLE_OBJECT_MAGIC + b"\xff" * 8 + b"\x00", "unknown writer schema"),
    (b"\x00\x00\x00\x00\x07abc", "no schema registry"),
])
def test_bad_bytes_say_why(bad, why):
    with pytest.raises(DecodeError, match=why):
        Codec().decode(bad)


def test_truncated_body_and_trailing_bytes():
    codec = Codec()
    data = codec.encode("change_event", change())
    with pytest.raises(DecodeError, match="corrupt change_event"):
        codec.decode(data[:-5])
    with pytest.raises(DecodeError, match="trailing bytes"):
        codec.decode(data + b"\x00\x00")


def foreign_payload_bytes(event, branch):
    """A change event whose payload a careless writer put in another entity's branch (no Codec involved)."""
    import io

    from fastavro import schemaless_writer

    import schemas

    parsed = schemas.load("change_event")
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + schemas.fingerprint(parsed))
    schemaless_writer(buf, parsed, {**event, "payload": (branch, event["payload"])})
    return buf.getvalue()


def test_payload_is_written_as_the_branch_its_entity_names_never_guessed():
    from concord.contracts import events as ev

    # A payment carrying invoice-shaped fields: Avro's union resolution would write it as an Invoice.
    pay = {**ev.payment("succeeded", "in_1", 500), "amount_due_cents": 500, "amount_paid_cents": 500, "lines": [],
           "issued_at": None, "due_at": None}
    event = ev.change_event("payment", "py_1", 1, pay, "c1", at=1)
    guessed = foreign_payload_bytes(event, "concord.Invoice")
    codec = Codec()
    typed = codec.encode("change_event", event)
    assert typed != guessed
    _, rec = codec.decode(typed)
    assert rec["payload"]["attempt"] == 1 and "amount_due_cents" not in rec["payload"]
    assert event["payload"] is pay, "encoding does not change the caller's record"


def test_a_payload_of_another_entity_does_not_decode():
    from concord.contracts import events as ev
    from concord.exceptions import PayloadTypeError

    event = ev.change_event("deal", "d1", 1, ev.customer("Acme"), "c1", at=1)
    with pytest.raises(PayloadTypeError, match="payload is a concord.Customer record but entity_type is 'deal'"):
        Codec().decode(foreign_payload_bytes(event, "concord.Customer"))


def test_encoding_a_payload_for_an_entity_without_a_record_type_is_refused():
    from concord.contracts import events as ev
    from concord.exceptions import EncodeError

    event = {**ev.change_event("deal", "d1", 1, ev.deal("open", []), "c1", at=1), "entity_type": "widget"}
    with pytest.raises(EncodeError, match="entity_type 'widget' names no payload record"):
        Codec().encode("change_event", event)
    with pytest.raises(EncodeError, match="a concord.Job payload on a deal event"):
        Codec().encode("change_event", {**event, "entity_type": "deal", "payload": ("concord.Job", {})})


def test_a_record_that_does_not_fit_its_schema_is_an_encode_error():
    from concord.exceptions import EncodeError

    with pytest.raises(EncodeError, match="schemas/control.avsc"):
        Codec().encode("control", {"action": "tick"})


def test_decode_checks_the_schema_the_topic_declares():
    from concord.exceptions import ConfigError, SchemaMismatch

    codec = Codec()
    command = codec.encode("control", {"action": "tick", "guard_key": None, "actor": None, "at": 1})
    with pytest.raises(SchemaMismatch, match="a valid control record where schemas/change_event.avsc is declared"):
        codec.decode_topic("changes.crm.deal", command)
    assert codec.decode_topic("concord-guard.controls", command)[1]["action"] == "tick"
    assert codec.decode_topic("other-app-guard.controls", command)[1]["action"] == "tick"  # any deployment's
    with pytest.raises(ConfigError, match="'changes.crm.widget' is not declared"):
        codec.decode_topic("changes.crm.widget", command)
