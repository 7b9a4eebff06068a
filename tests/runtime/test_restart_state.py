"""What a stage waits on survives a SIGKILL: parked gaps still raise sequence_gap, due SLAs still escalate."""

from __future__ import annotations

import os
import signal
import uuid

import pytest
from kafka_helpers import end_offsets, read_until, start_deployment_at_end
from test_worker import LINES, NOW, SHARED, TOKENS, publish

from concord.contracts import events as ev
from concord.contracts import topics
from concord.runtime.broker import free_port
from concord.tools.demo import worker_process

pytestmark = pytest.mark.broker


def test_a_killed_worker_raises_its_parked_gap_and_escalates_its_due_sla_after_restart(broker, tmp_path):
    bs = broker.bootstrap_servers
    uid = uuid.uuid4().hex[:8]
    app_id = f"concord-restart-{uid}"
    env = {"CONCORD_GAP_WAIT_S": "6", "CONCORD_SLA_SCALE": "0.001", "CONCORD_SLA_CHECK_INTERVAL_S": "0.5",
           "CONCORD_CANARY_INTERVAL_S": "0",
           "CONCORD_OWNER_TOKENS": ",".join(f"{team}={token}" for team, token in TOKENS.items())}
    names = start_deployment_at_end(bs, app_id)
    cid, deal, gapped = f"rs-{uid}", f"rsd-{uid}", f"rsg-{uid}"
    since = end_offsets(bs, [*SHARED, *names.exception_queues])
    revenue_ops = names.exceptions("revenue-ops")
    with worker_process(bs, free_port(), app_id, tmp_path / "first.log",
                        {**env, "CONCORD_DATA_DIR": str(tmp_path / "first")}) as first:
        publish(bs, ev.change_event("customer", cid, 1, ev.customer("Restart Co", account=None), cid, at=NOW),
                ev.change_event("deal", deal, 1, ev.deal("closed_won", LINES), cid, at=NOW),
                ev.change_event("deal", gapped, 1, ev.deal("open", LINES), cid, at=NOW),
                ev.change_event("deal", gapped, 3, ev.deal("open", LINES, name="after the gap"), cid, at=NOW))
        got = read_until(bs, since, lambda got: any(g.topic == topics.AUDIT.name and g.record["outcome"] == "parked"
                                                    and g.record["entity_id"] == gapped for g in got)
                         and any(g.topic == revenue_ops and g.record["entity_id"] == deal for g in got))
        opened = next(g.record for g in got if g.topic == revenue_ops and g.record["entity_id"] == deal)
        assert not any(g.record and g.record.get("reason_code") == "sequence_gap" for g in got)  # not yet due
        os.killpg(first.pid, signal.SIGKILL)  # gap parked, SLA running: both only in the tables now
        first.wait(30)
    with worker_process(bs, free_port(), app_id, tmp_path / "second.log",
                        {**env, "CONCORD_DATA_DIR": str(tmp_path / "second")}):
        got = read_until(bs, since, lambda got: any(
            g.topic in names.exception_queues and g.record["reason_code"] == "sequence_gap"
            and g.record["entity_id"] == gapped for g in got) and any(
            g.topic == names.exceptions("finance") and g.key == opened["exception_id"].encode()
            and g.record["state"] == "escalated" for g in got), timeout=120)
    [escalated] = [g.record for g in got if g.topic == names.exceptions("finance")
                   and g.key == opened["exception_id"].encode() and g.record["state"] == "escalated"]
    assert escalated["updated_at"] >= opened["sla_deadline"]  # escalated once due, not before
