"""The incremental hot path decides exactly as a full recompute of every record would (hypothesis, no broker).

Each history is decided twice, event by event: once as the pipeline does (the status index says which records
an event concerns) and once from a status stripped of its index, which ``decide`` treats as written before the
index existed and looks at in full. Outcomes and statuses, index included, must be equal at every step.
"""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concord.contracts import events as ev
from concord.domain.flow_config import load_flow_config
from concord.domain.rules import act, decide
from concord.domain.status import INDEX_VERSION, build_index, clone, index_valid
from concord.tools.simulator import business

CFG = load_flow_config()
START = 1_767_225_600_000
SKUS = ("SVC-INSTALL", "SVC-REPAIR", "HW-PUMP", "SVC-INSTAL")  # the last one is not in the catalog
CID = "cust-1"


def _ids(prefix, n):
    return [f"{prefix}{i}" for i in range(n)] + [None]


def _lines(rng):
    return [ev.line(rng.choice(SKUS), rng.randint(1, 2), rng.choice((10_000, 25_000)))
            for _ in range(rng.randint(0, 2))]


def random_history(rng, n):
    """Events of one customer whose records keep changing what they name: deals, jobs, invoices, payments linked
    and relinked at random, deleted, cancelled, paid and failed, with the customer's billing setup changing."""
    deals, jobs, invs, pays = _ids("d", 3), _ids("j", 3), _ids("i", 3), _ids("p", 2)
    seqs = {}
    whole = set()
    out = []
    for k in range(n):
        at = START + k * 60_000
        kind = rng.choice(("customer", "deal", "deal", "job", "job", "invoice", "invoice", "payment"))
        if kind == "customer":
            entity, eid = "customer", CID
            payload = ev.customer("Acme", email="ap@acme.example", account=rng.choice(("acct_1", None)),
                                  terms=rng.choice(("net_30", None)),
                                  policy=rng.choice(("on_close", "on_completion", None)))
        elif kind == "deal":
            entity, eid = "deal", rng.choice(deals[:-1])
            payload = ev.deal(rng.choice(("open", "closed_won", "closed_lost")), _lines(rng),
                              billing_status=rng.choice((None, "invoiced", "paid")))
        elif kind == "job":
            entity, eid = "job", rng.choice(jobs[:-1])
            status = rng.choice(("scheduled", "dispatched", "completed", "cancelled"))
            payload = ev.job(status, _lines(rng), deal_id=rng.choice(deals),
                             completed_at=at if status == "completed" and rng.random() < 0.5 else None)
        elif kind == "invoice":
            entity, eid = "invoice", rng.choice(invs[:-1])
            status = rng.choice(("draft", "open", "paid", "void", "uncollectible"))
            payload = ev.invoice(status, _lines(rng), deal_id=rng.choice(deals), job_id=rng.choice(jobs),
                                 amount_due_cents=rng.choice((None, 10_000, 99)),
                                 issued_at=at if status != "draft" and rng.random() < 0.5 else None)
        else:
            entity, eid = "payment", rng.choice(pays[:-1])
            status = rng.choice(("succeeded", "failed", "pending"))
            payload = ev.payment(status, rng.choice(invs), 10_000, failure_reason="card declined" if status == "failed"
                                 else None)
        seq = seqs[eid] = seqs.get(eid, 0) + 1
        op = "delete" if entity != "customer" and rng.random() < 0.08 else "update"
        # a partial update (only changed_fields are news) of a record whose every field is known
        changed = rng.sample(sorted(payload), rng.randint(1, 3)) if eid in whole and rng.random() < 0.2 else None
        (whole.discard if op == "delete" else whole.add)(eid)
        e = ev.change_event(entity, eid, seq, None if op == "delete" else payload, CID, at=at, op=op,
                            changed=changed, event_id=f"e{k}")
        if rng.random() < 0.05:
            e["caused_by_command_id"] = "cmd_" + "0" * 32
        out.append(e)
    return out


def owner_action(rng, status, k):
    """An owner acknowledging, discarding or resolving (with one of its suggestions) an open exception."""
    open_now = sorted(status["exceptions"])
    if not open_now:
        return None
    eid = rng.choice(open_now)
    kind = rng.choice(("acknowledge", "discard", "resolve", "resolve"))
    patch = {}
    if kind == "resolve":
        entry = status["exceptions"][eid]
        field = {"unlinked_job": "deal_id", "orphan_invoice": "deal_id", "payment_without_invoice": "invoice_id",
                 "missing_billing_account": "billing_account_id", "missing_billing_terms": "billing_terms",
                 "amount_mismatch": "amount_due_cents"}.get(entry["reason_code"])
        if field is None:
            return None
        value = {"deal_id": rng.choice(("d0", "d1", "d2")), "invoice_id": rng.choice(("i0", "i1")),
                 "billing_account_id": "acct_9", "billing_terms": "net_15", "amount_due_cents": "10000"}[field]
        patch = {field: value}
    return {"action_id": f"a{k}", "exception_id": eid, "action": kind, "patch": patch, "by": "owner", "note": ""}


def _full(status):
    """The status as one written before the index existed: decide looks at every record."""
    if status is None:
        return None
    return {k: v for k, v in status.items() if k != "index"}


def _same(a, b):
    assert a.commands == b.commands
    assert a.exceptions == b.exceptions
    assert a.resolved == b.resolved
    assert a.updated == b.updated
    assert a.facts == b.facts
    assert a.status == b.status


def replay(events, rng=None):
    status = None
    looked = 0
    for k, e in enumerate(events):
        before = clone(status)
        fast = decide(status, e, CFG, e["occurred_at"])
        assert status == before, "decide must not change the status it was given"
        _same(fast, decide(_full(status), e, CFG, e["occurred_at"]))
        status = fast.status
        looked += 1
        action = owner_action(rng, status, k) if rng is not None and rng.random() < 0.15 else None
        if action:
            try:
                done = act(status, action, CFG, e["occurred_at"])
            except Exception as exc:  # a patch that does not fix it changes nothing
                assert type(exc).__name__ == "ValidationError"
                continue
            assert index_valid(done.status) and done.status["index"] == build_index(clone(done.status))
            status = done.status
    assert index_valid(status)
    return status, looked


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000), n=st.integers(5, 70))
def test_incremental_decisions_equal_a_full_recompute_on_random_histories(seed, n):
    rng = random.Random(seed)
    replay(random_history(rng, n), rng)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), shuffle=st.integers(0, 10_000))
def test_incremental_decisions_equal_a_full_recompute_on_simulated_businesses(seed, shuffle):
    faults = {"missing_billing_account": 0.2, "unmapped_sku": 0.2}
    history = business(random.Random(seed), 2, 20, START, faults=faults)
    by_customer = {}
    for e in history:
        by_customer.setdefault(e["customer_id"], []).append(e)
    rng = random.Random(shuffle)
    for events in by_customer.values():
        by_entity = {}
        for e in events:
            by_entity.setdefault(e["entity_id"], []).append(e)
        shuffled = sorted(events, key=lambda e: rng.random())  # any cross-entity order...
        # ...with each entity's own events in order (the guard sees to that)
        replay([by_entity[e["entity_id"]].pop(0) for e in shuffled])


def test_a_status_written_before_the_index_is_read_and_gets_one():
    events = random_history(random.Random(7), 40)
    status = None
    for e in events:
        status = decide(_full(status), e, CFG, e["occurred_at"]).status  # every step as an old status
    assert index_valid(status) and status["index"]["v"] == INDEX_VERSION
    assert status["index"] == build_index(clone(status))
    stale = {**status, "index": {**status["index"], "v": INDEX_VERSION - 1}}  # another version: redone in full
    nxt = ev.change_event("deal", "d9", 1, ev.deal("closed_won", [ev.line("SVC-INSTALL")]), CID, at=START)
    out = decide(stale, nxt, CFG, START)
    assert out.status["index"]["v"] == INDEX_VERSION and "d9" in out.status["index"]["won"]
    _same(out, decide(_full(status), nxt, CFG, START))
