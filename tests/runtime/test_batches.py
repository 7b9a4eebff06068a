"""A worker batch whose table value would not fit one changelog record: its records are decided one at a time."""

from types import SimpleNamespace

import orjson
import pytest

from concord.contracts import events as ev
from concord.contracts import topics
from concord.runtime.harness import InProcess
from concord.runtime.pipeline import Record
from concord.runtime.reconciler import SHARDS, Reconciler, is_index_key
from concord.runtime.worker import _decide_batch, _record

NOW = 1_767_225_600_000
LIMIT = 40_000
MANY_LINES = [ev.line("SVC-INSTALL", i + 1, 1_000) for i in range(20)]


def accepted(h, events):
    """The accepted.changes records the guard forwards for ``events``, as faust events of one batch."""
    out = []
    for i, event in enumerate(events):
        topic = topics.changes_topic(event["source_system"], event["entity_type"])
        rec = Record(topic, 0, i, event["entity_id"].encode(), h.codec.encode("change_event", event))
        for o in h.pipeline.guard(rec, h.cursors):
            if o.topic == h.names.accepted:
                msg = SimpleNamespace(topic=o.topic, partition=0, offset=len(out), key=o.key, value=o.value,
                                      headers=list(o.headers))
                out.append(SimpleNamespace(message=msg))
    return out


def decide(h, table, batch):
    loop = Reconciler(h.pipeline, h.cfg, 500, 30_000)  # the worker's: its index lives in the status table
    return _decide_batch(h.pipeline, batch, lambda event, view: loop.step(_record(event), view), table)


def test_a_record_that_would_outgrow_a_changelog_record_is_a_dead_letter_and_the_batch_goes_on():
    h = InProcess(now=NOW)
    h.pipeline.max_record_bytes = LIMIT
    big = [ev.change_event("customer", "big", 1, ev.customer("Big Co", account="acct_big"), "big", at=NOW)]
    big += [ev.change_event("deal", f"big-d{n}", 1, ev.deal("closed_lost", MANY_LINES), "big", at=NOW + n)
            for n in range(60)]
    small = ev.change_event("customer", "small", 1, ev.customer("Small Co", account="acct_s"), "small", at=NOW)
    batch = accepted(h, [*big, small])
    table: dict = {}

    view, outs, values = decide(h, table, batch)

    letters = [o.dead_letter for o in outs if o.dead_letter is not None]
    assert letters, "the status outgrew the limit: some deal must have been dead-lettered"
    kept = {e.message.value for e in batch} - {dl.value for dl in letters}
    for dl in letters:
        assert dl.processor == "decide_changes" and dl.stage == "process"
        assert f"over the {LIMIT}-byte limit" in dl.error and "'big'" in dl.error
        assert dl.value in {e.message.value for e in batch} and not dl.truncated  # its original bytes, whole
    assert small in [h.codec.decode(v)[1] for v in kept]  # the other customer, after them, was decided
    assert all(len(v) <= LIMIT for v in values.values())
    status = view.touched[b"big"][0]
    assert orjson.loads(values[b"big"]) == orjson.loads(orjson.dumps(status, option=orjson.OPT_NON_STR_KEYS))
    applied = {f"big-d{n}" for n in range(60)} - {h.codec.decode(dl.value)[1]["entity_id"] for dl in letters}
    assert set(status["deals"]) == applied  # what was dead-lettered changed nothing
    assert b"small" in view.touched and not table  # the table itself is written by the worker, after


def test_a_batch_that_fits_is_decided_once_and_keeps_its_writes():
    h = InProcess(now=NOW)
    events = [ev.change_event("customer", "c", 1, ev.customer("C Co", account="acct_c"), "c", at=NOW)]
    events += [ev.change_event("deal", f"c-d{n}", 1, ev.deal("closed_won", MANY_LINES[:1]), "c", at=NOW + n)
               for n in range(5)]
    table: dict = {}

    view, outs, values = decide(h, table, accepted(h, events))

    assert not [o for o in outs if o.dead_letter is not None]
    invoices = [c for c in (h.codec.decode(o.value)[1] for o in outs if o.topic == topics.commands_topic("billing"))
                if c["type"] == "create_invoice"]
    assert sorted(c["entity_id"] for c in invoices) == [f"c-d{n}" for n in range(5)]
    assert set(values) == set(view.touched)
    index_keys = [k for k in view.touched if is_index_key(k)]
    assert index_keys, "the customer was scheduled for its check in the batch's own index entries"
    assert orjson.loads(values[b"c"])["deals"].keys() == {f"c-d{n}" for n in range(5)}


def test_a_batch_changes_no_index_entry_the_table_holds():
    h = InProcess(now=NOW)
    events = [ev.change_event("customer", f"c{n}", 1, ev.customer(f"C{n}", account=f"a{n}"), f"c{n}", at=NOW)
              for n in range(4)]
    table: dict = {}
    view, _, _ = decide(h, table, accepted(h, events[:2]))
    table.update({k: v for k, (v, _) in view.touched.items()})
    held = orjson.dumps({k.decode(): v for k, v in table.items()}, option=orjson.OPT_NON_STR_KEYS)

    decide(h, table, accepted(h, events[2:]))  # a later batch, never written back (given up, say)

    assert orjson.dumps({k.decode(): v for k, v in table.items()}, option=orjson.OPT_NON_STR_KEYS) == held


def customers(n):
    return [ev.change_event("customer", f"c{i}", 1, ev.customer(f"C{i}", account=f"a{i}"), f"c{i}", at=NOW)
            for i in range(n)]


def test_the_customers_due_in_one_minute_are_spread_over_the_shards_of_the_index():
    h = InProcess(now=NOW)
    h.pipeline.max_record_bytes = 10_000  # 1,000 customers due in one minute are 25 KB of index in one bucket
    view, outs, values = decide(h, {}, accepted(h, customers(1_000)))
    assert not [o for o in outs if o.dead_letter is not None]
    buckets = [orjson.loads(v) for k, v in values.items() if is_index_key(k) and b":d" not in k]
    assert sum(len(b) for b in buckets) == 1_000 and len(buckets) == SHARDS


def test_a_deadline_index_entry_over_the_limit_stops_the_stage_as_no_record_is_at_fault():
    h = InProcess(now=NOW)
    h.pipeline.max_record_bytes = 3_000  # above any one customer's status, below their shard's minute
    with pytest.raises(RuntimeError, match=r"deadline index entry .* over the 3000-byte record limit"):
        decide(h, {}, accepted(h, customers(4_000)))
