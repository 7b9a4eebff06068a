"""Two workers share the partitions: any of them answers for any customer and lists a team's whole queue."""

import json
import urllib.request
import uuid

import pytest
from kafka_helpers import start_deployment_at_end
from test_worker import LINES, NOW, TOKENS, publish

from concord.contracts import events as ev
from concord.runtime.broker import free_port
from concord.tools.demo import wait_for_http, worker_process

pytestmark = pytest.mark.broker


def get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=15) as resp:
        return json.load(resp)


def test_two_workers_route_status_and_merge_a_teams_queue(broker, tmp_path):
    import time

    uid = uuid.uuid4().hex[:8]
    app_id = f"concord-pair-{uid}"
    env = {"CONCORD_DATA_DIR": str(tmp_path), "CONCORD_CANARY_INTERVAL_S": "0",
           "CONCORD_OWNER_TOKENS": ",".join(f"{t}={k}" for t, k in TOKENS.items())}
    start_deployment_at_end(broker.bootstrap_servers, app_id)
    ports = [free_port(), free_port()]
    with worker_process(broker.bootstrap_servers, ports[0], app_id, tmp_path / "w1.log", env), \
            worker_process(broker.bootstrap_servers, ports[1], app_id, tmp_path / "w2.log", env):
        customers = [f"pair-{uid}-{i}" for i in range(8)]  # spread over the 4 partitions
        for cid in customers:
            publish(broker.bootstrap_servers,
                    ev.change_event("customer", cid, 1, ev.customer("No Account", account=None), cid, at=NOW),
                    ev.change_event("deal", f"{cid}-d", 1, ev.deal("closed_won", LINES), cid, at=NOW))
        deadline = time.monotonic() + 90
        while True:  # until both workers hold partitions and every exception is listed from either one
            lists = [get(f"http://127.0.0.1:{p}/exceptions?reason=missing_billing_account", TOKENS["revenue-ops"])
                     for p in ports]
            mine = [{r["customer_id"] for r in got if (r["customer_id"] or "").startswith(f"pair-{uid}-")}
                    for got in lists]
            if mine[0] == mine[1] == set(customers):
                break
            assert time.monotonic() < deadline, f"lists never complete: {[len(m) for m in mine]}"
            time.sleep(0.5)
        for cid in customers:  # any worker answers for any customer (routed to the owner)
            for p in ports:
                status = json.loads(wait_for_http(f"http://127.0.0.1:{p}/customers/{cid}", timeout=30))
                assert status["customer_id"] == cid and f"{cid}-d" in status["deals"]


def test_a_new_worker_rebuilds_the_status_table_from_its_changelog(broker, tmp_path):
    uid = uuid.uuid4().hex[:8]
    app_id = f"concord-rebuild-{uid}"
    env = {"CONCORD_CANARY_INTERVAL_S": "0"}
    start_deployment_at_end(broker.bootstrap_servers, app_id)
    cid = f"rb-{uid}"
    port = free_port()
    with worker_process(broker.bootstrap_servers, port, app_id, tmp_path / "first.log",
                        {**env, "CONCORD_DATA_DIR": str(tmp_path / "first")}):
        publish(broker.bootstrap_servers,
                ev.change_event("customer", cid, 1, ev.customer("Rebuilt Co", account="acct_rb"), cid, at=NOW),
                ev.change_event("deal", f"{cid}-d", 1, ev.deal("closed_won", LINES), cid, at=NOW))
        status = json.loads(wait_for_http(f"http://127.0.0.1:{port}/customers/{cid}", timeout=60))
        assert f"{cid}-d" in status["deals"]
    port = free_port()  # a new worker with no local state: everything comes back from the changelog
    with worker_process(broker.bootstrap_servers, port, app_id, tmp_path / "second.log",
                        {**env, "CONCORD_DATA_DIR": str(tmp_path / "second")}):
        rebuilt = json.loads(wait_for_http(f"http://127.0.0.1:{port}/customers/{cid}", timeout=60))
    assert rebuilt["deals"] == status["deals"] and rebuilt["issued"] == status["issued"]
    assert "Error in recovery" not in (tmp_path / "second.log").read_text()
