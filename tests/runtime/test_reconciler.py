"""The reconciliation timer in process: bounded work per tick, resuming where it left off, visiting only the due."""

from concord.contracts import events as ev
from concord.runtime.harness import InProcess
from concord.runtime.metrics import REGISTRY
from concord.runtime.reconciler import SHARDS, bucket_key, directory_key, shard_of, slot_of

T = 1_767_225_600_000
LINES = [ev.line("SVC-INSTALL", 1, 25_000)]


def checks():
    return REGISTRY.get_sample_value("concord_reconcile_checks_total") or 0


def unconfirmed(h):
    return {e["customer_id"] for e in h.exceptions() if e["reason_code"] == "command_unconfirmed"}


def won_deals(h, n):
    """Customers c0..c<n-1>, each billed on close, with one closed-won deal d<i>."""
    for i in range(n):
        cid = f"c{i}"
        h.feed_event(ev.change_event("customer", cid, 1, ev.customer(cid, account=f"a{i}", policy="on_close"), cid,
                                     at=T))
        h.feed_event(ev.change_event("deal", f"d{i}", 1, ev.deal("closed_won", LINES, closed_at=T), cid, at=T))


def test_each_tick_checks_at_most_the_budget_earliest_first_and_the_next_tick_resumes():
    h = InProcess(now=T, budget=3)
    won_deals(h, 8)
    h.reconcile()  # everyone changed just now: each is looked at once, three per tick
    seen = [checks()]
    for _ in range(3):
        h.reconcile()
        seen.append(checks())
    assert [b - a for a, b in zip(seen, seen[1:], strict=False)] == [3, 2, 0]
    assert unconfirmed(h) == set(), "nothing is late yet"
    h.clock["now"] = T + 3_600_000  # the create_invoice deadlines pass
    before = checks()
    h.reconcile()
    assert checks() - before == 3 and len(unconfirmed(h)) == 3
    h.reconcile()
    h.reconcile()
    assert unconfirmed(h) == {f"c{i}" for i in range(8)}
    before = checks()
    h.reconcile()
    assert checks() == before, "no customer is due again until its next deadline: a tick visits nobody"


def test_the_index_holds_only_customers_with_a_pending_deadline():
    h = InProcess(now=T)
    h.feed_event(ev.change_event("customer", "c1", 1, ev.customer("c1", account="a1"), "c1", at=T))
    h.reconcile()
    # a customer with nothing that could fall due leaves the index once looked at
    assert all(not v for k, v in h.deadlines.items() if k.startswith(b"\x00deadlines:0:"))
    assert all(h.deadlines.get(directory_key(0, shard)) in (None, {}) for shard in (None, *range(SHARDS)))
    assert any(directory_key(0, shard) in h.deadlines for shard in range(SHARDS)), "it was in the index"
    assert set(h.statuses) == {b"c1"}, "the harness keeps the index apart from the statuses"


def test_the_timer_raises_customer_drift_on_the_owners_queue_and_an_invoice_under_the_crms_details_closes_it():
    cfg_sync = 3_600_000
    h = InProcess(now=T)
    moved_at = T + 60_000
    billed = {"name": "Acme", "email": "ap@acme.example", "address": "1 Main St"}

    def invoice(inv_id, at, to):
        h.feed_event(ev.change_event("invoice", inv_id, 1, ev.invoice("open", LINES, deal_id="d1", issued_at=at,
                                                                       billed_to=to), "c1", at=at))

    h.feed_event(ev.change_event("customer", "c1", 1, ev.customer("Acme", email="ap@acme.example", account="a1"),
                                 "c1", at=T))
    h.feed_event(ev.change_event("customer", "c1", 2, ev.customer("Acme", email="new@acme.example", account="a1"),
                                 "c1", at=moved_at))
    invoice("inv1", moved_at + cfg_sync, billed)  # carried through the codec: the schema holds billing's fields
    h.reconcile()
    assert not [e for e in h.exceptions() if e["reason_code"] == "customer_drift"], "billing has time until then"
    h.clock["now"] = moved_at + cfg_sync
    h.reconcile()
    [raised] = [e for e in h.exceptions() if e["reason_code"] == "customer_drift"]
    assert (raised["owner"], raised["state"], raised["amount_at_risk_cents"]) == ("revenue-ops", "open", 25_000)
    assert raised["sla_deadline"] - raised["opened_at"] == 24 * 3_600_000  # routing.yaml: 1d
    invoice("inv2", moved_at + 2 * cfg_sync, {**billed, "email": "new@acme.example"})
    h.reconcile()
    states = [e["state"] for e in h.exceptions() if e["reason_code"] == "customer_drift"]
    assert states == ["open", "resolved"]


def too_large():
    return REGISTRY.get_sample_value("concord_statuses_too_large_total") or 0


def test_a_customer_whose_check_would_outgrow_its_record_is_left_alone_and_the_others_are_still_checked():
    h = InProcess(now=T, budget=10)
    won_deals(h, 3)
    h.loop.fits = lambda status: status.get("customer_id") != "c0"  # c0's status is at the record limit
    h.clock["now"] = T + 3_600_000  # the create_invoice deadlines pass
    before = too_large()
    h.reconcile()
    assert unconfirmed(h) == {"c1", "c2"}, "c0's check was not applied; it held no one else back"
    assert too_large() == before + 1
    assert h.statuses[b"c0"]["next_check"] is None
    h.clock["now"] += 3_600_000
    h.reconcile()
    assert too_large() == before + 1, "the timer does not come back to c0 on every tick"


def test_an_index_written_before_it_was_sharded_is_still_read_and_empties_as_its_customers_move():
    h = InProcess(now=T)
    h.feed_event(ev.change_event("customer", "c1", 1, ev.customer("c1", account="a1", policy="on_close"), "c1", at=T))
    h.feed_event(ev.change_event("deal", "d1", 1, ev.deal("closed_won", LINES, closed_at=T), "c1", at=T))
    at = h.statuses[b"c1"]["next_check"]
    slot, shard = slot_of(at), shard_of("c1")
    assert h.deadlines.pop(bucket_key(0, slot, shard)) == {"c1": at}
    del h.deadlines[directory_key(0, shard)]
    h.deadlines[bucket_key(0, slot, None)] = {"c1": at}  # where a worker before the shards kept it
    h.deadlines[directory_key(0, None)] = {str(slot): at}
    before = checks()
    h.reconcile()
    assert checks() == before + 1, "the unsharded entry was due and read"
    assert h.deadlines[bucket_key(0, slot, None)] == {} and h.deadlines[directory_key(0, None)] == {}
    assert h.statuses[b"c1"]["next_check"] > at
    nxt = h.statuses[b"c1"]["next_check"]
    assert h.deadlines[bucket_key(0, slot_of(nxt), shard)] == {"c1": nxt}  # it moved to its shard
