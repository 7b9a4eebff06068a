"""Hostile-input strategies and the promise every connector keeps, shared by tests/connectors/test_fuzz_*.py."""

from __future__ import annotations

import json
import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from concord.contracts.codec import Codec
from connectors.inbound import fuzz

CODEC = Codec()
# Few examples, no deadline: the suite's fuzzing is a smoke test; `make fuzz` runs the long campaign.
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Any character at all, lone surrogates and controls included.
_chars = st.characters(codec=None, categories=["L", "N", "P", "S", "Z", "Cc", "Cs", "Cf"])
_numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from(fuzz.HOSTILE_NUMBERS))
leaves = st.one_of(st.none(), st.booleans(), _numbers, st.text(_chars, max_size=30), st.sampled_from(fuzz.HOSTILE_TEXT))
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(_chars, max_size=8), inner, max_size=4)),
                      max_leaves=12)


@st.composite
def edited(draw: st.DrawFn, source: str) -> bytes:
    """A seed record with hypothesis-chosen fields replaced by hostile values or deleted."""
    doc = json.loads(draw(st.sampled_from(fuzz.seeds(source))))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(fuzz._paths(doc)))
        if path and draw(st.booleans()):
            doc = fuzz._set(doc, path, None, delete=True)
        else:
            doc = fuzz._set(doc, path, draw(values))
    return json.dumps(doc, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")


def hostile(source: str) -> st.SearchStrategy[bytes]:
    """Inputs for ``source``: the campaign's mutations (seeded by hypothesis) and, for JSON feeds, tree edits."""
    mutated = st.builds(lambda n: fuzz.mutate(source, random.Random(n).choice(fuzz.seeds(source)), random.Random(n)),
                        st.integers(0, 2**32))
    if source == "csv":
        return mutated
    return st.one_of(mutated, edited(source))


def assert_keeps_the_promise(source: str, data: bytes) -> None:
    """Normalization returns within the bound without raising; every event and dead letter encodes and fits."""
    batch, problems, timed_out = fuzz.check_one(source, data, CODEC, time_bound=60.0)
    assert not timed_out, problems
    assert not problems, problems
    assert batch is not None and (batch.events or batch.deadletters or batch.duplicates or batch.skipped)
    for m in batch.events:
        assert CODEC.decode(CODEC.encode("change_event", m.event, m.topic))[1]["event_id"] == m.event["event_id"]
    for d in batch.deadletters:
        assert d.record["original_value"] or not data.strip() or d.record["stage"] == "gap"
