"""Ordering guard: duplicates, stale events and gaps, as pure functions."""

from concord.domain.guard import (
    APPLY,
    DUPLICATE,
    PARK,
    STALE,
    Incoming,
    admit,
    gap_overdue,
    missing_seqs,
    release_parked,
)


def inc(seq, eid=None, digest=None, contiguous=True, snapshot=False):
    return Incoming(seq, eid or f"e{seq}", digest or f"d{seq}", contiguous, snapshot, ref=f"r{seq}")


def run(events, now=0):
    cur, verdicts = None, []
    for ev in events:
        cur, v = admit(cur, ev, now)
        verdicts.append(v)
    return cur, verdicts


def test_in_order_applies_each():
    cur, vs = run([inc(1), inc(2), inc(3)])
    assert [v.kind for v in vs] == [APPLY] * 3
    assert [v.release for v in vs] == [["r1"], ["r2"], ["r3"]]
    assert cur["seq"] == 3


def test_same_event_id_is_duplicate_even_when_late():
    _, vs = run([inc(1), inc(2), inc(3), inc(2)])
    assert vs[-1].kind == DUPLICATE


def test_same_seq_same_content_other_id_is_duplicate():
    _, vs = run([inc(1), inc(1, eid="other")])
    assert vs[-1].kind == DUPLICATE


def test_same_seq_other_content_is_stale_not_applied():
    cur, vs = run([inc(1), inc(1, eid="other", digest="changed")])
    assert vs[-1].kind == STALE and cur["digest"] == "d1"


def test_lower_seq_is_stale_and_never_overwrites():
    cur, vs = run([inc(5, contiguous=False), inc(3, contiguous=False)])
    assert [v.kind for v in vs] == [APPLY, STALE]
    assert cur["seq"] == 5


def test_gap_parks_then_releases_in_order():
    cur, vs = run([inc(1), inc(4), inc(3), inc(2)], now=100)
    assert [v.kind for v in vs] == [APPLY, PARK, PARK, APPLY]
    assert vs[-1].release == ["r2", "r3", "r4"]
    assert cur["seq"] == 4 and cur["parked"] == [] and cur["gap_since"] is None


def test_gap_on_non_contiguous_source_applies():
    _, vs = run([inc(1, contiguous=False), inc(7, contiguous=False)])
    assert [v.kind for v in vs] == [APPLY, APPLY]


def test_duplicate_of_a_parked_event():
    _, vs = run([inc(1), inc(3), inc(3)])
    assert vs[-1].kind == DUPLICATE


def test_gap_overdue_and_release_by_owner():
    cur, _ = run([inc(1), inc(4), inc(5)], now=1_000)
    assert missing_seqs(cur) == [2, 3]
    assert not gap_overdue(cur, 1_500, wait_ms=1_000)
    assert gap_overdue(cur, 2_000, wait_ms=1_000)
    cur2, refs = release_parked(cur)
    assert refs == ["r4", "r5"] and cur2["seq"] == 5 and cur2["parked"] == []
    assert cur["parked"], "release_parked must not mutate its input"


def test_first_event_of_contiguous_source_waits_for_seq_1_unless_snapshot():
    _, vs = run([inc(2)])
    assert vs[0].kind == PARK
    _, vs = run([inc(9, snapshot=True), inc(10)])
    assert [v.kind for v in vs] == [APPLY, APPLY]
