"""The open-exception gauges and the owners' queues come from the same table state, through escalations,
a restart and two workers sharing the partitions."""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid

import pytest
from kafka_helpers import end_offsets, read_until, start_deployment_at_end
from test_worker import LINES, NOW, SHARED, TOKENS, publish

from concord.contracts import events as ev
from concord.runtime.broker import free_port
from concord.tools.demo import worker_process

pytestmark = pytest.mark.broker
GAUGE = re.compile(r'^concord_exceptions_open\{owner="([^"]+)",reason="([^"]+)"\} ([0-9.e+]+)$', re.M)


def _get(url: str, token: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=20) as resp:
        return resp.read()


def _gauges(port: int) -> dict[str, float]:
    by_owner: dict[str, float] = {}
    for owner, _, value in GAUGE.findall(_get(f"http://127.0.0.1:{port}/metrics").decode()):
        by_owner[owner] = by_owner.get(owner, 0.0) + float(value)
    return by_owner


def _queues(port: int) -> dict[str, int]:
    return {team: len(json.loads(_get(f"http://127.0.0.1:{port}/exceptions", token))) for team, token in
            TOKENS.items()}


def test_queue_lengths_sum_to_the_gauges_after_escalation_restart_and_with_two_workers(broker, tmp_path):
    bs = broker.bootstrap_servers
    uid = uuid.uuid4().hex[:8]
    app_id = f"concord-gauges-{uid}"
    env = {"CONCORD_SLA_SCALE": "0.0005", "CONCORD_SLA_CHECK_INTERVAL_S": "0.5", "CONCORD_CANARY_INTERVAL_S": "0",
           "CONCORD_GAUGE_INTERVAL_S": "0.5",
           "CONCORD_OWNER_TOKENS": ",".join(f"{team}={token}" for team, token in TOKENS.items())}
    names = start_deployment_at_end(bs, app_id)
    since = end_offsets(bs, [*SHARED, *names.exception_queues])
    ports = [free_port(), free_port()]
    customers = [f"gq-{uid}-{i}" for i in range(8)]
    with worker_process(bs, ports[0], app_id, tmp_path / "w1.log", {**env, "CONCORD_DATA_DIR": str(tmp_path / "1")}):
        with worker_process(bs, ports[1], app_id, tmp_path / "w2.log",
                            {**env, "CONCORD_DATA_DIR": str(tmp_path / "2")}):
            for cid in customers:
                publish(bs, ev.change_event("customer", cid, 1, ev.customer("No Account", account=None), cid, at=NOW),
                        ev.change_event("deal", f"{cid}-d", 1, ev.deal("closed_won", LINES), cid, at=NOW))
            read_until(bs, since, lambda got: sum(1 for g in got if g.topic == names.exceptions("finance")
                                                  and (g.record or {}).get("state") == "escalated"
                                                  and (g.record["customer_id"] or "").startswith(f"gq-{uid}-"))
                       == len(customers), timeout=120)  # every SLA ran out: all escalated to finance
        # the second worker stopped; the first takes over its partitions, then a fresh second one joins
        with worker_process(bs, ports[1], app_id, tmp_path / "w2b.log",
                            {**env, "CONCORD_DATA_DIR": str(tmp_path / "2b")}):
            deadline = time.monotonic() + 120
            while True:
                gauges = [_gauges(p) for p in ports]
                summed = {o: sum(g.get(o, 0.0) for g in gauges) for o in TOKENS}
                queues = _queues(ports[0])
                if queues["finance"] >= len(customers) and all(summed[o] == queues[o] for o in TOKENS):
                    break
                assert time.monotonic() < deadline, f"gauges {summed} never matched the queues {queues}"
                time.sleep(0.5)
    assert summed["finance"] == queues["finance"] >= len(customers)
