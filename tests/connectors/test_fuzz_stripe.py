"""Hostile stripe input: normalization returns events or dead letters, never raises, and every event encodes."""

from __future__ import annotations

from fuzz_helpers import FUZZ, assert_keeps_the_promise, hostile
from hypothesis import given


@FUZZ
@given(data=hostile("stripe"))
def test_stripe_normalization_keeps_the_promise_on_hostile_input(data: bytes) -> None:
    assert_keeps_the_promise("stripe", data)
