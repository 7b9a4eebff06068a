"""Schemas parse, and every committed version of each stays readable by the current one."""

import copy

import pytest
from fastavro.read import SchemaResolutionError

import schemas
from schemas.compat import check, committed_versions


@pytest.mark.parametrize("name", schemas.SCHEMA_FILES)
def test_current_schema_reads_every_committed_version(name):
    current = schemas.document(name)
    versions = committed_versions(name)
    for _commit, raw in versions:
        check(schemas.expand_all(raw)[name], current)  # raises on an incompatible change


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
