"""The status table on faust's RocksDB store (CONCORD_STORE=rocksdb://), for tables larger than memory."""

import json
import urllib.request
import uuid

import pytest
from kafka_helpers import end_offsets, read_until, start_deployment_at_end
from test_worker import LINES, NOW, publish

from concord.contracts import events as ev
from concord.runtime.broker import free_port
from concord.tools.demo import worker_process

pytestmark = pytest.mark.broker


def test_worker_keeps_its_tables_in_rocksdb(broker, tmp_path):
    uid = uuid.uuid4().hex[:8]
    port = free_port()
    env = {"CONCORD_STORE": "rocksdb://", "CONCORD_DATA_DIR": str(tmp_path)}
    cid = f"rk-{uid}"
    start_deployment_at_end(broker.bootstrap_servers, f"concord-rocks-{uid}")
    with worker_process(broker.bootstrap_servers, port, f"concord-rocks-{uid}", tmp_path / "worker.log", env):
        since = end_offsets(broker.bootstrap_servers, ["commands.billing"])
        publish(broker.bootstrap_servers,
                ev.change_event("customer", cid, 1, ev.customer("Rocks Co", account="acct_r"), cid, at=NOW),
                ev.change_event("deal", f"rkd-{uid}", 1, ev.deal("closed_won", LINES), cid, at=NOW))
        read_until(broker.bootstrap_servers, since, lambda got: any(
            g.record and g.record["type"] == "create_invoice" and g.record["entity_id"] == f"rkd-{uid}" for g in got))
        status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/customers/{cid}", timeout=10))
        assert status["deals"][f"rkd-{uid}"]["position"] == "sold"
    stores = list(tmp_path.rglob("*customer_to_status*"))
    assert stores and any(p.is_dir() and any(p.rglob("*.sst")) or any(p.rglob("CURRENT")) for p in stores), stores
