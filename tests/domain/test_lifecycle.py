"""An exception's life without a broker: park behind it, resolve with a patch, replay, discard, bad resolutions."""

import json
import uuid

from concord.contracts import events as ev
from concord.contracts import topics
from concord.runtime.harness import InProcess

T0 = 1_767_225_600_000
LINES = [ev.line("SVC-INSTALL", 1, 50_000)]


def action(h, eid, kind="resolve", patch=None, by="revenue-ops:ana", note=""):
    h.act({"action_id": uuid.uuid4().hex, "exception_id": eid, "customer_key": "c1", "action": kind,
           "patch": patch or {}, "by": by, "note": note, "at": T0})


def blocked():
    """A customer without a billing account, a won deal, and two later deal updates parked behind it."""
    h = InProcess(now=T0)
    h.feed_event(ev.change_event("customer", "c1", 1, ev.customer("Acme", account=None,
                                                                 external_ids={"stripe": "cus_1"}), "c1", at=T0))
    h.feed_event(ev.change_event("deal", "d1", 1, ev.deal("closed_won", LINES), "c1", at=T0))
    [exc] = h.exceptions()
    h.feed_event(ev.change_event("deal", "d1", 2, ev.deal("closed_won", LINES, name="renamed"), "c1", at=T0))
    h.feed_event(ev.change_event("deal", "d1", 3, ev.deal("closed_won", LINES, name="renamed again"), "c1", at=T0))
    return h, exc


def decisions(h):
    return [r for r in h.records(lambda t: t == topics.AUDIT.name)]


def test_later_events_wait_behind_the_exception_then_replay_in_order_after_resolution():
    h, exc = blocked()
    assert exc["reason_code"] == "missing_billing_account"
    assert [d["outcome"] for d in decisions(h)][-2:] == ["parked", "parked"]
    assert h.statuses[b"c1"]["deals"]["d1"]["name"] == "deal", "a parked event must not be applied yet"
    action(h, exc["exception_id"], patch={"billing_account_id": "cus_1"})
    [cmd] = [c for c in h.commands() if c["type"] == "create_invoice"]
    assert json.loads(cmd["payload"])["billing_account_id"] == "cus_1"
    closed = h.exceptions()[-1]
    assert closed["state"] == "resolved" and closed["resolution"]["by"] == "revenue-ops:ana"
    assert closed["resolution"]["patch"] == {"billing_account_id": "cus_1"}
    released = [d for d in decisions(h) if d["reason"].startswith("released from park")]
    assert [d["offset"] for d in released] == [1, 2], "parked events replay in the order they arrived"
    assert h.statuses[b"c1"]["deals"]["d1"]["name"] == "renamed again"
    assert h.statuses[b"c1"]["parked"] == {}


def test_choose_a_suggestion_and_resolving_twice_changes_nothing():
    h, exc = blocked()
    assert exc["suggestions"][0]["value"] == "cus_1"
    action(h, exc["exception_id"], patch={"billing_account_id": exc["suggestions"][0]["value"]})
    before = (len(h.out), json.dumps(h.statuses[b"c1"], sort_keys=True), len(h.commands()))
    action(h, exc["exception_id"], patch={"billing_account_id": "cus_1"})
    assert decisions(h)[-1]["outcome"] == "ignored"
    assert json.dumps(h.statuses[b"c1"], sort_keys=True) == before[1]
    assert len(h.commands()) == before[2], "no new command"
    assert [o.topic for o in h.out[before[0]:]] == [topics.AUDIT.name]


def test_bad_resolutions_are_rejected_and_change_nothing():
    h, exc = blocked()
    state = json.dumps(h.statuses[b"c1"], sort_keys=True)
    action(h, exc["exception_id"], patch={"colour": "blue"})
    assert decisions(h)[-1]["outcome"] == "rejected" and "has no field 'colour'" in decisions(h)[-1]["reason"]
    action(h, exc["exception_id"], patch={"billing_terms": "net_15"})
    assert decisions(h)[-1]["outcome"] == "rejected" and "does not fix it" in decisions(h)[-1]["reason"]
    action(h, "no-such-exception", patch={"billing_account_id": "x"})
    assert decisions(h)[-1]["outcome"] == "ignored"
    assert json.dumps(h.statuses[b"c1"], sort_keys=True) == state
    assert not [c for c in h.commands() if c["type"] == "create_invoice"]


def test_discard_releases_the_parked_events_and_a_discarded_exception_cannot_be_resolved():
    h, exc = blocked()
    action(h, exc["exception_id"], kind="discard", note="billed by hand")
    assert h.exceptions()[-1]["state"] == "discarded" and h.exceptions()[-1]["resolution"]["note"] == "billed by hand"
    assert h.statuses[b"c1"]["deals"]["d1"]["name"] == "renamed again"
    assert exc["exception_id"] in h.statuses[b"c1"]["discarded"]
    n = len(h.exceptions())
    h.feed_event(ev.change_event("deal", "d1", 4, ev.deal("closed_won", LINES, name="v4"), "c1", at=T0))
    assert len(h.exceptions()) == n, "a discarded exception is not raised again"
    action(h, exc["exception_id"], patch={"billing_account_id": "cus_1"})
    assert decisions(h)[-1]["outcome"] == "ignored"


def test_a_replay_that_fails_again_opens_the_new_reason():
    h = InProcess(now=T0)
    h.feed_event(ev.change_event("deal", "d1", 1, ev.deal("closed_won", LINES), "c1", at=T0))  # no CRM account yet
    [exc] = h.exceptions()
    assert "no CRM account record" in exc["message"]
    action(h, exc["exception_id"], patch={"billing_account_id": "acct_9"})
    new = h.exceptions()[-1]
    assert new["reason_code"] == "missing_billing_terms" and new["state"] == "open" and new["attempts"] == 2
    assert new["message"].startswith("replay after resolving missing_billing_account failed")
    assert h.exceptions()[-2]["state"] == "resolved"
    action(h, new["exception_id"], patch={"billing_terms": "net_30"})
    assert [c["type"] for c in h.commands() if c["type"] == "create_invoice"] == ["create_invoice"]


def test_acknowledge_keeps_it_open():
    h, exc = blocked()
    action(h, exc["exception_id"], kind="acknowledge")
    assert h.exceptions()[-1]["state"] == "acknowledged"
    assert h.statuses[b"c1"]["exceptions"][exc["exception_id"]]["state"] == "acknowledged"


def test_a_restart_delivering_the_customer_again_parks_nothing_twice_and_nothing_already_decided():
    # at-least-once: after a kill, stage two reads accepted.changes again from its committed offset
    h, exc = blocked()
    before = json.dumps(h.statuses[b"c1"], sort_keys=True)
    h.redeliver_accepted()
    status = h.statuses[b"c1"]
    assert [len(q) for q in status["parked"].values()] == [2], "each parked event waits once"
    assert json.dumps(status, sort_keys=True) == before
    action(h, exc["exception_id"], patch={"billing_account_id": "cus_1"})
    assert h.statuses[b"c1"]["deals"]["d1"]["name"] == "renamed again" and not h.statuses[b"c1"]["parked"]


def test_an_event_decided_before_its_entity_was_blocked_is_not_parked_when_delivered_again():
    h = InProcess(now=T0)
    h.feed_event(ev.change_event("customer", "c1", 1, ev.customer("Acme", account="acct_1"), "c1", at=T0))
    h.feed_event(ev.change_event("deal", "d1", 1, ev.deal("open", LINES), "c1", at=T0))
    first_accepted = len(h.accepted)
    # the customer loses its billing account: the deal's closing is blocked from here on
    h.feed_event(ev.change_event("customer", "c1", 2, ev.customer("Acme", account=None), "c1", at=T0))
    h.feed_event(ev.change_event("deal", "d1", 2, ev.deal("closed_won", LINES), "c1", at=T0))
    assert h.exceptions(), "the won deal without a billing account is raised"
    parked = json.dumps(h.statuses[b"c1"]["parked"], sort_keys=True)
    h.redeliver_accepted()
    assert json.dumps(h.statuses[b"c1"]["parked"], sort_keys=True) == parked, "nothing decided before is parked"
    assert first_accepted == 2 and [d["outcome"] for d in decisions(h)].count("parked") == 0


def holds(h):
    return [c["type"] for c in h.commands() if c["type"] in ("hold_billing", "release_billing_hold")]


def test_the_sla_check_escalates_once_and_holds_billing_until_the_owner_resolves():
    h, exc = blocked()
    key = exc["exception_id"].encode()
    h.clock["now"] = exc["sla_deadline"] - 1
    h.escalate()
    assert [e["state"] for e in h.exceptions()] == ["open"] and holds(h) == []
    h.clock["now"] = exc["sla_deadline"]
    h.escalate()
    h.escalate()  # the tracker has it escalated: nothing is due twice
    escalated = [e for e in h.exceptions() if e["state"] == "escalated"]
    assert [(e["owner"], e["backup_owner"]) for e in escalated] == [("finance", "revenue-ops")]
    assert h.exception_records[key]["state"] == "escalated" and holds(h) == ["hold_billing"]
    action(h, exc["exception_id"], patch={"billing_account_id": "cus_1"})
    assert h.exception_records[key]["state"] == "resolved"
    assert holds(h) == ["hold_billing", "release_billing_hold"]
    h.clock["now"] = exc["sla_deadline"] * 2
    h.escalate()
    assert h.exceptions()[-1]["state"] == "resolved", "a closed exception is never escalated"
