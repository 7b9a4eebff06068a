"""Properties of the flow engine under duplicates, reordering and interleaving (hypothesis, no broker)."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concord.domain.flow_config import load_flow_config
from concord.domain.rules import decide
from concord.domain.status import clone
from concord.runtime.harness import InProcess
from concord.tools.simulator import business

CFG = load_flow_config()
START = 1_767_225_600_000
CLEAN = {"missing_billing_account": 0.0, "missing_billing_terms": 0.0, "unmapped_sku": 0.0}


def history(seed, customers, faults=None):
    return business(random.Random(seed), customers, 20, START, faults={**CLEAN, **(faults or {})})


def deliver(events, rng, dup_rate, swap_rate):
    """Any cross-entity interleaving, with duplicates and swaps the guard can repair."""
    queues = {}
    for e in events:
        queues.setdefault(e["entity_id"], []).append(e)
    order = []
    live = sorted(queues)
    while live:
        eid = rng.choice(live)
        order.append(queues[eid].pop(0))
        if not queues[eid]:
            live.remove(eid)
    for i in range(len(order) - 1, 0, -1):  # a later change of the same entity overtakes an earlier one
        if rng.random() < swap_rate and order[i]["entity_id"] == order[i - 1]["entity_id"] and \
                order[i]["seq_contiguous"]:
            order[i], order[i - 1] = order[i - 1], order[i]
    out = []
    for e in order:
        out.append(e)
        if rng.random() < dup_rate:
            out.insert(rng.randrange(len(out) - 1, len(out) + 1), e)
    for _ in range(int(len(order) * dup_rate)):  # and redeliveries long after
        out.append(rng.choice(order))
    return out


def run(events):
    h = InProcess(now=START)
    for e in events:
        h.feed_event(e)
    return h


def outcome(h):
    """The final status table and command ids; an exception's source coordinates depend on arrival, not state."""
    statuses = {k: {**v, "exceptions": {e: {f: x for f, x in o.items() if f != "original"}
                                        for e, o in v["exceptions"].items()},
                    # which of several matching records confirmed a command depends on arrival too
                    "commands": {c: {f: x for f, x in o.items() if f != "confirmed_by"}
                                 for c, o in v.get("commands", {}).items()}} for k, v in h.statuses.items()}
    return statuses, sorted(c["command_id"] for c in h.commands())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), shuffle=st.integers(0, 10_000), customers=st.integers(1, 4),
       dup=st.floats(0, 0.3), swap=st.floats(0, 0.5), faulty=st.booleans())
def test_convergence_any_interleaving_duplicates_and_repairable_reordering(seed, shuffle, customers, dup, swap,
                                                                             faulty):
    faults = {"missing_billing_account": 0.3, "unmapped_sku": 0.2} if faulty else None
    events = history(seed, customers, faults)
    in_order = outcome(run(events))
    delivered = deliver(events, random.Random(shuffle), dup, swap)
    assert outcome(run(delivered)) == in_order


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), customers=st.integers(1, 3))
def test_idempotence_applying_any_event_twice_changes_nothing(seed, customers):
    statuses = {}
    for e in history(seed, customers, {"missing_billing_account": 0.3, "unmapped_sku": 0.2}):
        key = e["customer_id"]
        before = clone(statuses.get(key))
        once = decide(statuses.get(key), e, CFG, START)
        assert statuses.get(key) == before, "decide must not change the status it was given"
        twice = decide(once.status, e, CFG, START)
        assert twice.status == once.status
        assert twice.commands == [] and twice.exceptions == [] and twice.resolved == []
        statuses[key] = once.status


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shuffles=st.lists(st.integers(0, 10_000), min_size=2, max_size=3))
def test_no_command_id_for_two_decisions_and_no_decision_with_two_ids(seed, shuffles):
    events = history(seed, 3, {"missing_billing_account": 0.2})
    by_id, by_decision = {}, {}
    for s in [None, *shuffles]:
        h = run(events if s is None else deliver(events, random.Random(s), 0.2, 0.3))
        ids = [c["command_id"] for c in h.commands()]
        assert len(ids) == len(set(ids)), "one run issued a command id twice"
        for c in h.commands():
            decision = (c["type"], c["target_system"], c["entity_type"], c["entity_id"], _what(c))
            assert by_id.setdefault(c["command_id"], decision) == decision
            assert by_decision.setdefault(decision, c["command_id"]) == c["command_id"]


def _what(cmd):
    import json

    body = json.loads(cmd["payload"])
    if cmd["type"] == "update_customer":
        return json.dumps({k: body[k] for k in ("name", "email", "billing_address", "billing_terms",
                                                "billing_account_id")}, sort_keys=True)
    return body.get("billing_status", "") + ":" + body.get("invoice_id", "")


def test_the_history_is_not_trivial():
    h = run(history(3, 8))
    types = {c["type"] for c in h.commands()}
    assert {"create_invoice", "create_job", "update_deal_billing_status", "update_customer"} <= types
