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
