"""Schemas parse, and every committed version of each stays readable by the current one, union branches too."""

import copy

import pytest
from fastavro.read import SchemaResolutionError

import schemas
from schemas.compat import check, check_branches, committed_versions


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
