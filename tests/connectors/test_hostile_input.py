"""Each class of hostile input, through `concord ingest --dry-run` (no broker): a clear error, never a crash.

Whole-run crashes (deep nesting, Infinity and 400-digit numbers, a CSV with bare CRs or a huge cell, an
empty Jobber occurredAt, a lone surrogate, a record id that is not text), failures that used to wait for
the producer (a non-string name, a seq past 2^63), numbers that took minutes to convert, one bad HubSpot
event in a batch: each item is rejected alone, named with its field, and the rest is mapped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from concord.contracts.codec import Codec
from concord.tools import cli
from connectors.inbound import boundary, ingest
from connectors.inbound import common as c

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "connectors"


def fixture(name: str) -> dict:
    return json.loads((FIX / name).read_text())


@pytest.fixture
def dry_run(tmp_path, capsys):
    def run(source: str, data: bytes, name: str = "input.jsonl") -> tuple[int, list[dict], str]:
        src = tmp_path / name
        src.write_bytes(data)
        rc = cli.main(["ingest", "--source", source, str(src), "--dry-run", "--identity", str(tmp_path / "id.json")])
        out = capsys.readouterr()
        return rc, [json.loads(ln) for ln in out.out.splitlines() if ln.strip()], out.err
    return run


def stripe(n: int, **obj_changes) -> dict:
    ev = fixture("stripe_invoice_paid.json")
    ev["id"] = f"evt_hostile_{n}"
    ev["data"]["object"].update(id=f"in_hostile_{n}", **obj_changes)
    return ev


def jsonl(*docs: dict | str) -> bytes:
    return b"\n".join(d.encode("utf-8", "surrogatepass") if isinstance(d, str) else json.dumps(d).encode()
                      for d in docs) + b"\n"


def test_inputs_that_crashed_the_run_are_rejected_alone_with_the_field_named(dry_run):
    def amount(n: int, text: str) -> str:
        return json.dumps(stripe(n, amount_due=7_654_321)).replace("7654321", text)
    deep = json.dumps(stripe(1)).replace('"paid"', "[" * 5000 + '"paid"' + "]" * 5000, 1)
    infinity, digits, overflow = amount(2, "Infinity"), amount(3, "9" * 400), amount(4, "1e999999")
    surrogate = json.dumps(stripe(5, customer_name="\ud800"))  # json writes it as the escape \ud800
    rc, events, err = dry_run("stripe", jsonl(deep, infinity, digits, overflow, surrogate, stripe(6)))
    assert rc == ingest.EXIT_REJECTED, err
    assert [e["entity_id"] for e in events] == ["in_hostile_6"]
    assert "rejected 5" in err and "Traceback" not in err
    assert "item 1 (line 1)" in err and "nesting depth is over the 64 limit (CONCORD_INPUT_DEPTH" in err
    assert "item 2 (line 2)" in err and "Infinity is not JSON" in err
    assert "item 3 (line 3)" in err and "has 400 digits, over the 40 limit (CONCORD_INPUT_DIGITS)" in err
    assert "item 4 (line 4)" in err and "number at $.data.object.amount_due is out of range" in err
    assert "item 5 (line 5)" in err and "string at $.data.object.customer_name is not valid Unicode" in err


def test_a_raw_lone_surrogate_and_a_record_id_that_is_not_text_still_make_a_dead_letter(dry_run):
    raw_surrogate = json.dumps(stripe(1), ensure_ascii=False).replace("Acme", "Ac\ud800me")
    batch = fixture("hubspot_batch.json")
    mangled = [{**batch[0], "eventId": {"not": "text"}, "subscriptionType": 7}, *batch[1:]]
    rc, _, err = dry_run("stripe", jsonl(raw_surrogate, stripe(2)))
    assert rc == ingest.EXIT_REJECTED and "is not UTF-8 text" in err and "Traceback" not in err
    _, whole, _ = dry_run("hubspot", json.dumps(batch).encode(), "whole.json")
    rc, events, err = dry_run("hubspot", json.dumps(mangled).encode(), "batch.json")
    assert rc == ingest.EXIT_REJECTED and "Traceback" not in err and "rejected 1" in err
    assert [e["event_id"] for e in events] == [e["event_id"] for e in whole[1:]]
    assert "subscriptionType '7' (7) is not mapped" in err


def test_csv_with_bare_cr_line_ends_maps_like_lf_and_an_oversized_cell_is_refused(dry_run):
    lf = (FIX / "spreadsheet.csv").read_bytes()
    rc_lf, events_lf, _ = dry_run("csv", lf, "lf.csv")
    rc_cr, events_cr, err = dry_run("csv", lf.replace(b"\n", b"\r"), "cr.csv")
    assert rc_cr == rc_lf and "Traceback" not in err and "malformed" not in err, err
    assert [e["entity_id"] for e in events_cr] == [e["entity_id"] for e in events_lf] and events_lf
    rows = lf.decode().splitlines()
    cells = rows[1].split(",")
    cells[17] = "d" * 140_000  # over Python's default 128 KB cell, under CONCORD_INPUT_STRING_CHARS
    rc, events, err = dry_run("csv", "\n".join([rows[0], ",".join(cells), *rows[2:]]).encode(), "cell.csv")
    assert rc == rc_lf and any(ln["description"] == "d" * 140_000 for e in events if e["payload"]
                           for ln in e["payload"].get("lines", ())), err
    cells[17] = "d" * 300_000
    rc, events, err = dry_run("csv", "\n".join([rows[0], ",".join(cells), *rows[2:]]).encode(), "huge.csv")
    assert rc == ingest.EXIT_REJECTED and "CSV is malformed: field larger than field limit (262144)" in err
    assert not events


def test_empty_jobber_occurred_at_is_rejected_by_name(dry_run):
    doc = fixture("jobber_job_complete.json")
    doc["data"]["webHookEvent"]["occurredAt"] = ""
    rc, events, err = dry_run("jobber", json.dumps(doc).encode(), "hook.json")
    assert rc == ingest.EXIT_REJECTED and not events and "occurredAt is empty" in err and "Traceback" not in err


def test_what_the_dry_run_accepts_encodes_and_what_would_fail_at_the_producer_is_rejected_now(dry_run):
    account = fixture("salesforce_account_create.json")
    account["payload"]["Name"] = 12345  # a non-string name used to fail only at Avro encoding
    far = stripe(2)
    far_event = {**far, "created": 2**62}  # seq = created × 1000: past a signed 64-bit long
    rc, events, err = dry_run("salesforce", json.dumps(account).encode(), "account.json")
    assert rc == ingest.EXIT_REJECTED and not events
    assert "mapped event does not fit schemas/change_event.avsc" in err and "payload" in err
    rc, events, err = dry_run("stripe", jsonl(far_event, stripe(3)))
    assert rc == ingest.EXIT_REJECTED and [e["entity_id"] for e in events] == ["in_hostile_3"]
    assert "item 1 (line 1)" in err and "out of range (a signed 64-bit integer)" in err


@pytest.mark.parametrize("source", ["salesforce", "hubspot", "debezium", "csv"])
def test_numbers_that_took_minutes_to_convert_are_refused_before_conversion(dry_run, source):
    if source == "salesforce":
        doc = fixture("salesforce_account_create.json")
        doc["payload"]["ChangeEventHeader"]["sequenceNumber"] = "1.5e1000000"
        data, name = json.dumps(doc).encode(), "cdc.json"
    elif source == "hubspot":
        batch = fixture("hubspot_batch.json")
        batch[0]["occurredAt"] = "1.5e1000000"
        data, name = json.dumps(batch).encode(), "batch.json"
    elif source == "debezium":
        first = json.loads((FIX / "debezium_jobs.jsonl").read_text().splitlines()[0])
        first["payload"]["source"]["lsn"] = "1.5e1000000"
        data, name = json.dumps(first).encode(), "cdc.json"
    else:
        rows = (FIX / "spreadsheet.csv").read_text().splitlines()
        data, name = "\n".join([rows[0], rows[1].rsplit(",", 1)[0] + ",1.5e1000000"]).encode(), "sheet.csv"
    rc, _, err = dry_run(source, data, name)
    assert rc == ingest.EXIT_REJECTED, err
    assert "has an exponent over 30 (CONCORD_INPUT_EXPONENT)" in err and "Traceback" not in err


def test_one_bad_hubspot_event_fails_alone_and_its_reason_is_a_field_not_a_type_error(dry_run):
    batch = fixture("hubspot_batch.json")
    bad = {**batch[0], "eventId": 99, "occurredAt": [1, 2], "propertyName": {"x": 1}}
    _, whole, _ = dry_run("hubspot", json.dumps(batch).encode(), "whole.json")
    rc, events, err = dry_run("hubspot", json.dumps([bad, *batch]).encode(), "batch.json")
    assert rc == ingest.EXIT_REJECTED, err
    assert [e["event_id"] for e in events] == [e["event_id"] for e in whole]
    assert "rejected 1" in err and "record 99" in err and "occurredAt is a list, not an integer" in err


# ---------------------------------------------------------------- the boundary and the dead-letter builder


def test_boundary_limits_come_from_settings_with_documented_defaults():
    assert boundary.Limits() == boundary.Limits.from_env({})
    small = boundary.Limits.from_env({"CONCORD_INPUT_DEPTH": "3", "CONCORD_INPUT_ARRAY_ITEMS": "2",
                                      "CONCORD_INPUT_STRING_CHARS": "5", "CONCORD_MAX_RECORD_BYTES": "100"})
    assert (small.depth, small.array_items, small.string_chars, small.record_bytes) == (3, 2, 5, 100)
    assert boundary.loads(b'{"a": [[1]]}', small) == {"a": [[1]]}
    for doc, error in ((b'{"a": [[[1]]]}', "nesting depth is over the 3 limit"),
                       (b'{"a": [1, 2, 3]}', "array length at $.a is over the 2 limit"),
                       (b'{"a": "toolong"}', "string length at $.a is over the 5 limit"),
                       (b'{"a": NaN}', "NaN is not JSON"), (b'{"a": 1', "not JSON"),
                       (b'{"a": "\\udc00"}', "not valid Unicode"), (b'\xff{}', "not UTF-8 text")):
        with pytest.raises(c.BadInput, match=re.escape(error)):
            boundary.loads(doc, small)
    with pytest.raises(SystemExit, match="CONCORD_INPUT_DEPTH='deep' is not a number"):
        boundary.Limits.from_env({"CONCORD_INPUT_DEPTH": "deep"})


def test_number_parsers_raise_only_bad_input_naming_the_field():
    assert c.to_int("42", "qty") == 42 and c.to_int("1.5e3", "qty") == 1500 and c.to_cents("12.50") == 1250
    for value in (float("inf"), float("nan"), "1.5e1000000", "1e999999", "9" * 400, 2**63, True, [1], {"a": 1}):
        with pytest.raises(c.BadInput, match="^price"):
            c.to_cents(value, "price")
        with pytest.raises(c.BadInput, match="^seq"):
            c.to_int(value, "seq")
    for value in (float("inf"), 10**400, "9" * 400, [1]):
        with pytest.raises(c.BadInput, match="^closed"):
            c.to_ms(value, "closed")


def test_a_dead_letter_always_encodes_and_fits_the_broker():
    ctx = c.Context(clock=lambda: 1)
    dl = ingest.dead_letter("stripe", b"x" * 890_000, "normalize", "BadInput", "value 'y" + "\ud800" * 900_000,
                            {"not": "text"}, ctx, "f item 1")
    encoded = Codec().encode("dead_letter", dl.record)
    assert len(encoded) + sum(len(k) + len(v) for k, v in dl.headers) < 1_000_000
    assert dl.record["original_key"] == b"{'not': 'text'}" and "\\ud800" in dl.record["error"]
    assert dict(dl.headers)["concord-original-size"] == b"890000" and "sha256" in dl.record["error"]


def test_map_unit_turns_a_mappers_accident_into_bad_input():
    err = c.unexpected(KeyError("ChangeEventHeader"))
    assert str(err) == "missing required field 'ChangeEventHeader'" and err.unexpected == "KeyError"
    event = stripe(1, lines={"data": ["not an object"]})
    expected = "a field that must be a JSON object is a str (looked up 'get') (in stripe_events._lines)"
    with pytest.raises(c.BadInput, match=re.escape(expected)) as caught:
        ingest.map_unit("stripe", event, json.dumps(event).encode(), c.Context())
    assert caught.value.unexpected == "AttributeError"
