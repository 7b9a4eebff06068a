"""The offset ledger: only records decided in order, from the committed offset, are ever committable."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from concord.runtime.offsets import GAP_SEEK_EVERY_S, GAP_SEEKS, PROCESS, SEEK, SKIP, OffsetLedger

TP = ("changes.crm.deal", 0)


def positioned(committed: int | None) -> OffsetLedger:
    ledger = OffsetLedger()
    ledger.assigned([TP])
    ledger.committed_known({TP: committed})
    return ledger


def test_nothing_is_processed_or_committable_before_the_committed_offset_is_known():
    ledger = OffsetLedger()
    ledger.assigned([TP])
    assert ledger.admit(TP, 40, 0.0).action == SKIP
    assert ledger.committable(TP) is None


def test_records_delivered_before_positioning_are_fetched_again_when_nothing_was_committed():
    ledger = OffsetLedger()
    ledger.assigned([TP])
    assert ledger.admit(TP, 7, 0.0).action == SKIP
    assert ledger.admit(TP, 8, 0.0).action == SKIP
    assert ledger.committed_known({TP: None}) == {TP: 7}
    assert ledger.admit(TP, 7, 0.1).action == PROCESS


def test_a_jump_ahead_is_never_passed_over_and_seeks_back():
    ledger = positioned(100)
    assert ledger.admit(TP, 100, 0.0).action == PROCESS
    ledger.done(TP, 100)
    verdict = ledger.admit(TP, 250, 0.0)
    assert (verdict.action, verdict.offset) == (SEEK, 101)
    assert ledger.admit(TP, 251, 0.1).action == SKIP  # still buffered from before the seek
    assert ledger.committable(TP) == 101
    assert ledger.admit(TP, 101, 0.2).action == PROCESS


def test_done_only_advances_in_order_so_a_failed_batch_holds_the_commit():
    ledger = positioned(0)
    for off in range(4):
        assert ledger.admit(TP, off, 0.0).action == PROCESS
    ledger.done(TP, 0)
    ledger.done(TP, 2)  # 1 never acknowledged
    ledger.done(TP, 3)
    assert ledger.committable(TP) == 1


def test_offsets_that_hold_no_record_are_accepted_only_after_repeated_seeks():
    ledger = positioned(10)
    now = 0.0
    for _ in range(GAP_SEEKS):
        assert ledger.admit(TP, 12, now).action == SEEK
        now += GAP_SEEK_EVERY_S
    assert ledger.admit(TP, 12, now).action == PROCESS
    ledger.done(TP, 12)
    assert ledger.committable(TP) == 13


def test_revoked_partitions_are_forgotten():
    ledger = positioned(5)
    ledger.revoked([TP])
    assert ledger.committable(TP) is None and ledger.partitions() == []


@given(st.lists(st.integers(0, 60), max_size=200), st.integers(0, 30))
def test_whatever_is_delivered_the_committable_offset_never_passes_an_unprocessed_record(deliveries, committed):
    ledger = positioned(committed)
    processed: set[int] = set()
    for i, off in enumerate(deliveries):  # 10 ms apart: too short a run for any offsets to be taken as empty
        if ledger.admit(TP, off, i * 0.01).action == PROCESS:
            processed.add(off)
            ledger.done(TP, off)
    top = ledger.committable(TP)
    assert top is not None and top >= committed
    assert set(range(committed, top)) <= processed
