"""The pipeline core without a broker: what each input turns into."""

from types import SimpleNamespace

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.runtime.pipeline import SRC_OFFSET, SRC_TOPIC, Pipeline, Record

CODEC = Codec()
DEALS = "changes.crm.deal"
NAMES = topics.Deployment("concord-test-pipeline")


def event(seq, eid=None, entity="d1", stage="open", contiguous=True, **kw):
    base = dict(event_id=eid or f"{entity}-{seq}", source_system="crm", entity_type="deal", entity_id=entity,
                customer_id="c1", seq=seq, seq_contiguous=contiguous, op="update", occurred_at=1000,
                ingested_at=1000, trace_id=f"t-{entity}", payload={"stage": stage})
    base.update(kw)
    return base


class Harness:
    """Runs records through both stages the way the worker does, with plain dicts as tables."""

    def __init__(self, now=0):
        self.clock = {"now": now}
        self.calls = []
        self.pipeline = Pipeline(CODEC, NAMES, self.decide, self.route, gap_wait_ms=1000,
                                 clock=lambda: self.clock["now"])
        self.cursors, self.statuses, self.offset = {}, {}, 0
        self.out = []

    def decide(self, status, ev, now):
        self.calls.append(ev["event_id"])
        seen = list((status or {}).get("seen", [])) + [ev["event_id"]]
        return SimpleNamespace(status={"seen": seen}, commands=[], exceptions=[])

    def route(self, draft, now):
        return {**draft, "state": "open", "owner": "revenue-ops", "backup_owner": None, "severity": "high",
                "blocks_billing": False, "opened_at": now, "sla_deadline": now + 1, "updated_at": now,
                "original": None, "resolution": None, "attempts": 1}

    def feed(self, value, topic=DEALS, key=b"d1"):
        rec = Record(topic, 0, self.offset, key, value)
        self.offset += 1
        self.run(self.pipeline.guard(rec, self.cursors))
        return rec

    def run(self, outs):
        for o in outs:
            self.out.append(o)
            if o.topic == NAMES.accepted:
                self.run(self.pipeline.decide(Record(o.topic, 0, 0, o.key, o.value, dict(o.headers)), self.statuses))

    def decisions(self):
        return [CODEC.decode(o.value)[1] for o in self.out if o.topic == topics.AUDIT.name]

    def on(self, topic):
        return [o for o in self.out if o.topic == topic]


def test_undecodable_bytes_become_a_dead_letter_with_original_bytes():
    h = Harness()
    h.feed(b"\xde\xad\xbe\xef")
    [dl] = h.on(topics.deadletter_topic(DEALS))
    _, rec = CODEC.decode(dl.value)
    assert rec["original_value"] == b"\xde\xad\xbe\xef" and rec["stage"] == "decode"
    assert dict(dl.headers)["concord-stage"] == b"decode" and dict(dl.headers)[SRC_TOPIC] == DEALS.encode()
    assert [d["outcome"] for d in h.decisions()] == ["dead_lettered"]


def test_schema_invalid_is_dead_lettered_at_validate():
    h = Harness()
    h.feed(CODEC.encode("change_event", event(1, stage="won-ish")))
    [dl] = h.on(topics.deadletter_topic(DEALS))
    assert CODEC.decode(dl.value)[1]["stage"] == "validate"
    assert "won-ish" in CODEC.decode(dl.value)[1]["error"]


def test_wrong_topic_is_invalid():
    h = Harness()
    h.feed(CODEC.encode("change_event", event(1)), topic="changes.billing.invoice")
    assert [d["outcome"] for d in h.decisions()] == ["dead_lettered"]


def test_duplicate_and_stale_are_decided_not_applied():
    h = Harness()
    h.feed(CODEC.encode("change_event", event(1, contiguous=False)))
    h.feed(CODEC.encode("change_event", event(1, contiguous=False)))
    h.feed(CODEC.encode("change_event", event(3, contiguous=False)))
    h.feed(CODEC.encode("change_event", event(2, contiguous=False)))
    assert [d["outcome"] for d in h.decisions()] == ["applied", "duplicate", "applied", "stale"]
    assert h.calls == ["d1-1", "d1-3"]


def test_gap_parks_and_releases_in_order_with_original_coordinates():
    h = Harness()
    h.feed(CODEC.encode("change_event", event(1)))
    h.feed(CODEC.encode("change_event", event(3)))
    h.feed(CODEC.encode("change_event", event(4)))
    assert h.calls == ["d1-1"]
    h.feed(CODEC.encode("change_event", event(2)))
    assert h.calls == ["d1-1", "d1-2", "d1-3", "d1-4"]
    outcomes = [(d["offset"], d["outcome"]) for d in h.decisions()]
    assert outcomes == [(0, "applied"), (1, "parked"), (2, "parked"), (3, "applied"), (1, "applied"), (2, "applied")]
    accepted = h.on(NAMES.accepted)
    assert [dict(o.headers)[SRC_OFFSET] for o in accepted] == [b"0", b"3", b"1", b"2"]
    assert all(o.key == b"c1" for o in accepted)


def test_overdue_gap_raises_one_sequence_gap_exception_and_owner_can_release():
    h = Harness(now=10_000)
    h.feed(CODEC.encode("change_event", event(1)))
    h.feed(CODEC.encode("change_event", event(4)))
    assert h.pipeline.tick(0, h.cursors) == []  # not overdue yet
    h.clock["now"] = 11_000
    h.run(h.pipeline.tick(0, h.cursors))
    h.run(h.pipeline.tick(0, h.cursors))
    [exc] = h.on(NAMES.exceptions("revenue-ops"))
    rec = CODEC.decode(exc.value)[1]
    assert rec["reason_code"] == "sequence_gap" and "[2, 3]" in rec["message"]
    assert rec["original"]["offset"] == 1
    h.run(h.pipeline.release(b"crm:deal:d1", h.cursors))
    assert h.calls == ["d1-1", "d1-4"]
    assert h.cursors[b"crm:deal:d1"]["parked"] == []


def test_a_gap_that_fills_itself_resolves_its_exception():
    h = Harness(now=10_000)
    h.feed(CODEC.encode("change_event", event(1)))
    h.feed(CODEC.encode("change_event", event(3)))
    h.clock["now"] = 11_001
    h.run(h.pipeline.tick(0, h.cursors))
    [opened] = h.on(NAMES.exceptions("revenue-ops"))
    h.clock["now"] = 15_000
    h.feed(CODEC.encode("change_event", event(2)))
    assert h.calls == ["d1-1", "d1-2", "d1-3"]
    closed = CODEC.decode(h.on(NAMES.exceptions("revenue-ops"))[-1].value)[1]
    assert closed["exception_id"] == CODEC.decode(opened.value)[1]["exception_id"]
    assert closed["state"] == "resolved" and closed["resolution"]["by"] == "concord"
    assert closed["opened_at"] == 11_001 and closed["updated_at"] == 15_000


class CountingCodec(Codec):
    def __init__(self):
        super().__init__()
        self.decoded = []

    def decode(self, data, schema=None):
        self.decoded.append(data)
        return super().decode(data, schema)


def test_the_decide_stage_reuses_what_the_guard_decoded_and_decodes_what_it_was_not_given():
    from concord.runtime.harness import InProcess
    from concord.tools.bench_core import NOW, _customer, _deal

    h = InProcess(now=NOW)
    h.codec = h.pipeline.codec = CountingCodec()
    h.feed_event(_customer("c1"))
    value = h.codec.encode("change_event", _deal("c1", 1))
    h.feed("changes.crm.deal", b"c1-d1", value)
    assert h.codec.decoded.count(value) == 1  # guard decoded it; the decide stage was handed the same event
    assert [c["type"] for c in h.commands()].count("create_invoice") == 1
    # a forwarded record this process did not guard (its guard ran in another worker) is decoded here
    other = h.codec.encode("change_event", _deal("c1", 2))
    h.feed(h.names.accepted, b"c1", other, headers={SRC_TOPIC: b"changes.crm.deal", SRC_OFFSET: b"7"})
    assert h.codec.decoded.count(other) == 1
    assert [c["type"] for c in h.commands()].count("create_invoice") == 2


def test_an_escalation_decided_before_the_close_never_reopens_it_and_its_hold_is_released():
    """The SLA check reads the table, the owner resolves meanwhile: whichever record the tracker gets first, the
    exception stays resolved, and the hold the late escalation sent is released."""
    from concord.domain.routing import load_routing

    h = Harness(now=10_000)
    opened = load_routing().route({"exception_id": "exc_1", "reason_code": "missing_billing_account",
                                   "trace_id": "t-d1", "source_system": "crm", "entity_type": "deal",
                                   "entity_id": "d1", "customer_id": "c1", "message": "no billing account",
                                   "suggestions": []}, 1_000)
    resolved = {**opened, "state": "resolved", "updated_at": 20_000,
                "resolution": {"by": "revenue-ops", "at": 20_000, "patch": {}, "note": "fixed"}}
    [hold], [escalated_out] = h.pipeline.escalation(opened, 30_000)  # decided after the close, from the stale view
    assert CODEC.decode(hold.value)[1]["type"] == "hold_billing"

    def track(table, *values):
        outs = []
        for i, value in enumerate(values):
            outs += h.pipeline.track(Record(NAMES.exceptions("finance"), 0, i, b"exc_1", value), table)
        return [CODEC.decode(o.value)[1] for o in outs if o.topic == topics.commands_topic("billing")]

    for order in ([resolved, escalated_out.value], [escalated_out.value, resolved]):
        table = {}
        values = [CODEC.encode("exception", opened)] + [v if isinstance(v, bytes) else CODEC.encode("exception", v)
                                                        for v in order]
        released = track(table, *values)
        assert table[b"exc_1"]["state"] == "resolved", order
        assert [(c["type"], c["entity_id"], c["caused_by"]) for c in released] == [
            ("release_billing_hold", "d1", ["exc_1"])], order


def test_an_escalation_dropped_as_stale_does_not_hold_back_the_next_opening_of_the_same_exception():
    from concord.domain.routing import load_routing
    from concord.runtime.pipeline import Escalations

    h = Harness(now=10_000)
    check = Escalations(h.pipeline)
    table, offsets = {}, iter(range(100))
    draft = {"exception_id": "exc_1", "reason_code": "missing_billing_account", "trace_id": "t-d1",
             "source_system": "crm", "entity_type": "deal", "entity_id": "d1", "customer_id": "c1",
             "message": "no billing account", "suggestions": []}

    def track(value):
        h.pipeline.track(Record(NAMES.exceptions("finance"), 0, next(offsets), b"exc_1", value), table)
        check.tracked(b"exc_1", table.get(b"exc_1"))

    opened = load_routing().route(draft, 1_000)
    track(CODEC.encode("exception", opened))
    [(_, [escalated])] = check.due(table, [b"exc_1"], opened["sla_deadline"])
    track(CODEC.encode("exception", {**opened, "state": "resolved", "updated_at": opened["sla_deadline"],
                                     "resolution": {"by": "revenue-ops", "at": 1, "patch": {}, "note": ""}}))
    track(escalated.value)  # stale: dropped, the table keeps it resolved
    assert table[b"exc_1"]["state"] == "resolved"
    again = load_routing().route(draft, opened["sla_deadline"] + 1)  # raised again under the same id
    track(CODEC.encode("exception", again))
    due = check.due(table, [b"exc_1"], again["sla_deadline"])
    assert [CODEC.decode(o.value)[1]["state"] for _, outs in due for o in outs] == ["escalated"]
