"""The one dead-letter builder: whole when it fits, else a prefix with size and sha256; it always fits."""

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from concord.contracts.codec import Codec
from concord.contracts.deadletter import DEFAULT_MAX_RECORD_BYTES, Origin, dead_letter

CODEC = Codec()


def produced_size(dl):
    """What the broker is asked to keep: value, key and headers."""
    value = CODEC.encode("dead_letter", dl.record())
    return len(value) + len(dl.key or b"") + sum(len(k) + len(v) for k, v in dl.headers())


def test_a_small_record_is_kept_whole_with_its_origin():
    origin = Origin("changes.crm.deal", 2, 41, b"d1", b"\xde\xad")
    dl = dead_letter(origin, "decode", "DecodeError", "not Avro-framed", 7, processor="order_changes")
    assert dl.topic == "deadletter.changes.crm.deal" and not dl.truncated
    assert dl.record() == {"original_topic": "changes.crm.deal", "original_partition": 2, "original_offset": 41,
                           "original_key": b"d1", "original_value": b"\xde\xad", "stage": "decode",
                           "error_type": "DecodeError", "error": "not Avro-framed", "failed_at": 7}
    headers = dict(dl.headers())
    assert headers["concord-src-offset"] == b"41" and headers["concord-processor"] == b"order_changes"
    assert "concord-original-sha256" not in headers


def test_a_2mb_record_keeps_a_prefix_its_size_and_sha256_and_fits():
    value = bytes(range(256)) * (2 * 1024 * 4)
    dl = dead_letter(Origin("changes.crm.deal", 0, 5, b"d1", value), "decode", "TooLarge", "too big", 1)
    digest = hashlib.sha256(value).hexdigest()
    assert dl.truncated and value.startswith(dl.value) and 0 < len(dl.value) < DEFAULT_MAX_RECORD_BYTES
    assert dict(dl.headers())["concord-original-sha256"] == digest.encode()
    assert dict(dl.headers())["concord-original-size"] == str(len(value)).encode()
    assert f"of {len(value)} bytes; sha256 {digest}" in dl.error and dl.error.startswith("too big")
    assert produced_size(dl) <= DEFAULT_MAX_RECORD_BYTES


@settings(max_examples=40, deadline=None)
@given(key=st.integers(0, 20_000), value=st.integers(0, 1_200_000), error=st.integers(0, 50_000),
       limit=st.sampled_from([100_000, DEFAULT_MAX_RECORD_BYTES]), text=st.sampled_from(["x", "é", "\u2603"]))
def test_whatever_the_sizes_the_dead_letter_fits_its_limit(key, value, error, limit, text):
    origin = Origin("concord-exceptions.revenue-ops", 3, 9, b"k" * key, b"v" * value)
    dl = dead_letter(origin, "process", "RuleError", text * error, 1, limit)
    assert produced_size(dl) <= limit
    assert origin.value.startswith(dl.value) and origin.key.startswith(dl.key)
    assert dl.truncated == (dl.value != origin.value or dl.key != origin.key)
    if dl.truncated:
        assert "sha256" in dl.error


def test_a_tombstone_keeps_no_value_and_no_key():
    dl = dead_letter(Origin("changes.crm.deal", 0, 1, None, None), "decode", "DecodeError", "tombstone", 1)
    assert dl.record()["original_value"] is None and dl.key is None and not dl.truncated


def test_the_builders_limit_is_within_what_every_concord_producer_may_send():
    from concord.runtime.producer import MAX_RECORD_BYTES, SETTINGS

    assert DEFAULT_MAX_RECORD_BYTES <= MAX_RECORD_BYTES < SETTINGS["message.max.bytes"]
