"""Two deployments (app ids) on one broker: each decides the shared changes into its own internal topics and
reads none of the other's."""

import time

import pytest
from kafka_helpers import CODEC, committed, end_offsets, produce, read_until, start_deployment_at_end

from concord.contracts import events as ev
from concord.contracts import topics
from concord.runtime.broker import free_port
from concord.tools.demo import worker_process

pytestmark = pytest.mark.broker
NOW = 1_767_225_600_000


def _wait(what: str, check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout  # a condition, not a timing: the suite runs in parallel
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.3)
    return result


def test_two_deployments_keep_to_their_own_internal_topics(broker, tmp_path, uid):
    bs = broker.bootstrap_servers
    app_ids = [f"concord-dep-{uid}-a", f"concord-dep-{uid}-b"]
    names = [start_deployment_at_end(bs, a) for a in app_ids]
    queues = [n.exceptions("revenue-ops") for n in names]
    assert not set(names[0].worker_inputs) & {t.name for t in names[1].specs}
    deal_topic = topics.changes_topic("crm", "deal")
    since = end_offsets(bs, queues)
    cid, deal = f"nb-{uid}", f"x-{uid}"
    events = [ev.change_event("customer", cid, 1, ev.customer("No Account Co", account=None,
                                                              external_ids={"stripe": "cus_x"}), cid, at=NOW),
              ev.change_event("deal", deal, 1, ev.deal("closed_won", [ev.line("SVC-INSTALL", 1, 50_000)]), cid,
                              at=NOW)]
    env = {"CONCORD_CANARY_INTERVAL_S": "0"}
    with worker_process(bs, free_port(), app_ids[0], tmp_path / "a.log", {**env, "CONCORD_DATA_DIR": str(
            tmp_path / "a")}), \
            worker_process(bs, free_port(), app_ids[1], tmp_path / "b.log", {**env, "CONCORD_DATA_DIR": str(
                tmp_path / "b")}):
        produce(bs, [(topics.changes_topic(e["source_system"], e["entity_type"]), e["entity_id"].encode(),
                      CODEC.encode("change_event", e)) for e in events])
        upto = end_offsets(bs, [deal_topic])

        def decided(group: str) -> bool:
            got = committed(bs, group, [deal_topic])
            return all(got[tp] >= offset for tp, offset in upto.items())

        for group in app_ids:  # a worker commits an input only once its outputs are acknowledged
            _wait(f"{group} never committed past the deal", lambda group=group: decided(group))
        for mine, theirs in ((app_ids[0], names[1]), (app_ids[1], names[0])):
            other = committed(bs, mine, [t.name for t in theirs.specs])
            assert all(offset < 0 for offset in other.values()), f"{mine} read another deployment's topics: {other}"

        opened = read_until(bs, since, lambda got: all(
            any(g.topic == q and g.record and g.record["entity_id"] == deal for g in got) for q in queues))
    firsts = {q: next(g for g in opened if g.topic == q and g.record and g.record["entity_id"] == deal)
              for q in queues}
    assert {g.record["reason_code"] for g in firsts.values()} == {"missing_billing_account"}
