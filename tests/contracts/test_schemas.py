"""Schemas parse, and every committed version of each stays readable by the current one, union branches too."""

import copy
import io
import json

import pytest
from fastavro import schemaless_writer
from fastavro.read import SchemaResolutionError

import schemas
from concord.contracts.codec import SINGLE_OBJECT_MAGIC, Codec
from concord.exceptions import DecodeError
from schemas.compat import check, check_branches, committed_versions, keep_as, sample_record


@pytest.mark.parametrize("name", schemas.SCHEMA_FILES)
def test_current_schema_reads_every_committed_version(name):
    current = schemas.document(name)
    versions = committed_versions(name)
    for _commit, raw in versions:
        check(schemas.expand_all(raw)[name], current)  # raises on an incompatible change


@pytest.mark.parametrize("name", schemas.SCHEMA_FILES)
def test_every_payload_branch_of_every_committed_version_reads_as_the_same_record(name):
    current = schemas.document(name)
    for _commit, raw in committed_versions(name):
        check_branches(schemas.expand_all(raw)[name], current)


def _payload_types(doc):
    return next(f for f in doc["fields"] if f["name"] == "payload")["type"]


def test_branch_check_accepts_reordered_branches():
    new = copy.deepcopy(schemas.document("change_event"))
    null, customer, deal, job, invoice, payment = _payload_types(new)
    _payload_types(new)[:] = [null, deal, payment, customer, job, invoice]  # Deal first: it defines Line
    check_branches(schemas.document("change_event"), new)


def test_branch_check_rejects_a_payload_that_would_read_as_another_record():
    new = copy.deepcopy(schemas.document("change_event"))
    branches = _payload_types(new)
    invoice = next(b for b in branches if isinstance(b, dict) and b["name"] == "Invoice")
    invoice["aliases"] = ["concord.Payment"]  # old payments would now resolve to the Invoice branch
    branches.remove(next(b for b in branches if isinstance(b, dict) and b["name"] == "Payment"))
    with pytest.raises(ValueError, match="a concord.Payment written with the old schema reads as concord.Invoice"):
        check_branches(schemas.document("change_event"), new)


def framed(parsed, record):
    """``record`` written with ``parsed`` in single-object framing, as a producer with that version would."""
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + schemas.fingerprint(parsed))
    schemaless_writer(buf, parsed, record)
    return buf.getvalue()


@pytest.mark.parametrize("name", schemas.SCHEMA_FILES)
def test_the_codec_decodes_what_every_committed_version_wrote(name):
    codec = Codec()
    for commit, raw in committed_versions(name):
        old = schemas.expand_all(raw)[name]
        parsed = schemas.parse(old)
        try:
            got, _ = codec.decode(framed(parsed, sample_record(parsed)))
        except DecodeError as exc:
            pytest.fail(f"what schemas/{name}.avsc of {commit[:10]} wrote no longer decodes ({exc}): keep that "
                        f"version, expanded, as {keep_as(name, old)}")
        assert got == name


def test_a_kept_earlier_version_decodes_and_one_not_kept_says_so(tmp_path):
    old = copy.deepcopy(schemas.document("control"))
    old["fields"] = [f for f in old["fields"] if f["name"] != "actor"]  # as if control.avsc once lacked actor
    data = framed(schemas.parse(old), {"action": "tick", "guard_key": None, "at": 5})
    with pytest.raises(DecodeError, match="unknown writer schema fingerprint"):
        Codec(history_dir=tmp_path).decode(data)
    (tmp_path / keep_as("control", old).name).write_text(json.dumps(old))
    assert Codec(history_dir=tmp_path).decode(data) == (
        "control", {"action": "tick", "guard_key": None, "actor": None, "at": 5})


def test_a_kept_version_must_be_named_by_its_fingerprint(tmp_path):
    (tmp_path / "control-0000000000000000.avsc").write_text(json.dumps(schemas.document("control")))
    with pytest.raises(ValueError, match="named by its fingerprint"):
        Codec(history_dir=tmp_path)


def test_history_is_visible_to_the_check():
    # A fresh clone has the full history; without it the test above would compare nothing.
    assert committed_versions("change_event"), "git history of schemas/ not found"


def test_check_rejects_a_new_required_field_without_default():
    old = schemas.document("command")
    new = copy.deepcopy(old)
    new["fields"].append({"name": "priority", "type": "int"})
    with pytest.raises(SchemaResolutionError):
        check(old, new)


def test_check_rejects_a_changed_field_type():
    old = schemas.document("payment")
    new = copy.deepcopy(old)
    next(f for f in new["fields"] if f["name"] == "status")["type"] = "int"
    with pytest.raises(SchemaResolutionError):
        check(old, new)


def test_check_accepts_a_new_optional_field():
    old = schemas.document("deal")
    new = copy.deepcopy(old)
    new["fields"].append({"name": "region", "type": ["null", "string"], "default": None})
    check(old, new)


def test_fingerprints_differ_per_schema():
    fps = {schemas.fingerprint(schemas.load(n)) for n in schemas.SCHEMA_FILES}
    assert len(fps) == len(schemas.SCHEMA_FILES)
