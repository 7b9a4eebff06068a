"""A real Debezium: rows of a PostgreSQL jobs table reach the worker through Kafka Connect and Concord's connector.

PostgreSQL (Debian's server binaries, wal_level=logical, a throwaway cluster on a free loopback port) stands in for
the dispatch system; Kafka Connect in standalone mode runs the Debezium PostgreSQL connector (pgoutput) with the
configuration in ops/connect; the relay (``python -m connectors.inbound.relay``) maps its change events through
connectors/config/debezium.yaml into ``changes.dispatch.job``; a worker decides. The commands and exceptions it
issues must be the ones the in-process topology issues for the same jobs published as canonical events.

Connect needs Apache Kafka (the cache of ``make kafka``; it is fetched with mvn when missing), so this module starts
its own broker whatever ``--brokers`` says; no Java, no mvn, no cached jars or no PostgreSQL is a failure with the
reason, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
import pytest
from kafka_helpers import CODEC, end_offsets, produce, read_until

from concord.contracts import events as ev
from concord.contracts import topics
from concord.exceptions import ConcordError
from concord.runtime.broker import CONNECT_DIR, ensure_topics, free_port, start_connect, start_kafka
from concord.runtime.harness import InProcess
from concord.tools.demo import stop_process, worker_process
from concord.tools.pgcluster import start_postgres

pytestmark = pytest.mark.broker

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
LINES = [ev.line("SVC-INSTALL", 1, 50_000, "Installation")]
NAMES = topics.Deployment("concord-dbz")  # the stack's worker
WATCH = [*(t.name for t in topics.COMMANDS), *NAMES.exception_queues]


def ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict]:
    """PostgreSQL with the dispatch schema, Apache Kafka, Connect running Debezium, a worker and the relay."""
    root = tmp_path_factory.mktemp("debezium")
    t0 = time.monotonic()
    with contextlib.ExitStack() as stop:
        try:
            with ThreadPoolExecutor(1) as pool:  # the database starts while the broker's JVM does
                pg_started = pool.submit(start_postgres, logical=True)
                try:
                    kafka = start_kafka(log=sys.stderr)
                    stop.callback(kafka.stop)
                finally:
                    with contextlib.suppress(Exception):  # its own failure is raised by result() below
                        stop.callback(pg_started.result().stop)
                pg = pg_started.result()
            pg.psql("CREATE DATABASE dispatch")
            pg.psql((CONNECT_DIR / "dispatch-jobs.sql").read_text(), "dispatch")
            bs = kafka.bootstrap_servers
            ensure_topics(bs, NAMES.topics)  # the shared topics and the worker's own, before anything reads them
            connect = start_connect(bs, {"DISPATCH_DB_HOST": "127.0.0.1", "DISPATCH_DB_PORT": str(pg.port),
                                         "DISPATCH_DB_USER": pg.user, "DISPATCH_DB_PASSWORD": "",
                                         "DISPATCH_DB_NAME": "dispatch"},
                                    [CONNECT_DIR / "dispatch-jobs.properties"], workdir=root / "connect",
                                    log=sys.stderr)
            stop.callback(connect.stop)
            connect.wait_running("dispatch-jobs")
        except ConcordError as exc:  # missing Java, mvn, jars or PostgreSQL: say which, as a failure
            pytest.fail(f"the Debezium stack could not start: {exc}", pytrace=False)
        up = time.monotonic() - t0
        stop.enter_context(worker_process(bs, free_port(), NAMES.app_id, root / "worker.log",
                                          {"CONCORD_DATA_DIR": str(root / "w")}))
        relay_log = stop.enter_context(open(root / "relay.log", "ab"))
        relay = subprocess.Popen(
            [sys.executable, "-m", "connectors.inbound.relay", "--source", "debezium", "--topics",
             "dispatch.public.jobs", "--identity", str(root / "identity.json")],
            env=dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bs), stdout=relay_log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        stop.callback(stop_process, relay)
        yield {"bs": bs, "dsn": pg.dsn("dispatch"), "connect": connect, "relay": relay, "root": root,
               "up": up, "all_up": time.monotonic() - t0}


def crm_events(uid: str) -> list[dict]:
    cid = f"001dbz{uid}"
    customer = ev.customer("Debezium Co", account=f"cus_{uid}", policy="on_completion")
    return [ev.change_event("customer", cid, 1, customer, cid, at=NOW - 10 * HOUR),
            ev.change_event("deal", f"006dbz{uid}", 1, ev.deal("closed_won", LINES, closed_at=NOW - 9 * HOUR), cid,
                            at=NOW - 9 * HOUR)]


def job_changes(uid: str) -> list[tuple[str, str, dict | None]]:
    """(job id, op, the row after it) in the order the dispatch system makes them."""
    deal = f"006dbz{uid}"
    j1, j2, j3 = f"job1-{uid}", f"job2-{uid}", f"job3-{uid}"
    sched = ev.job("scheduled", LINES, deal_id=deal, scheduled_for=NOW - 2 * HOUR)
    return [
        (j1, "create", sched),
        (j1, "update", ev.job("completed", LINES, deal_id=deal, scheduled_for=NOW - 2 * HOUR, completed_at=NOW)),
        (j2, "create", sched),
        (j2, "delete", None),
        # completed with no deal: nothing can be billed, an unlinked_job exception for dispatch-ops
        (j3, "create", ev.job("completed", LINES, deal_id=None, scheduled_for=NOW - HOUR, completed_at=NOW)),
    ]


def apply_to_postgres(dsn: str, uid: str) -> None:
    cid = f"001dbz{uid}"
    with psycopg.connect(dsn, autocommit=True) as db:
        for job_id, op, row in job_changes(uid):
            if op == "delete":
                db.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
                continue
            cols = (job_id, row["status"], row["deal_id"], row["scheduled_for"] and ts(row["scheduled_for"]),
                    row["completed_at"] and ts(row["completed_at"]), json.dumps(row["lines"]), cid, "Debezium Co")
            if op == "create":
                db.execute("INSERT INTO jobs (id, status, deal_id, scheduled_for, completed_at, lines, customer_id, "
                           "customer_name) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", cols)
            else:
                db.execute("UPDATE jobs SET status = %s, deal_id = %s, scheduled_for = %s, completed_at = %s, "
                           "lines = %s, customer_id = %s, customer_name = %s WHERE id = %s", (*cols[1:], job_id))


def canonical_jobs(uid: str) -> list[dict]:
    """The same job changes as canonical events, as a dispatch system publishing them directly would send."""
    cid, seqs, out = f"001dbz{uid}", {}, []
    for job_id, op, row in job_changes(uid):
        seqs[job_id] = seqs.get(job_id, 0) + 1
        out.append(ev.change_event("job", job_id, seqs[job_id], row, cid, at=NOW, op=op))
    return out


def decision(rec: dict) -> tuple:
    payload = rec["payload"]
    return (rec["command_id"], rec["type"], rec["target_system"], rec["customer_id"], rec["entity_type"],
            rec["entity_id"], json.dumps(json.loads(payload) if isinstance(payload, str) else payload, sort_keys=True))


def test_postgres_rows_through_debezium_issue_the_canonical_paths_commands(stack, uid, figure):
    bs = stack["bs"]
    figure(f"debezium: postgres + kafka + connect running the connector in {stack['up']:.1f}s, "
           f"with worker and relay {stack['all_up']:.1f}s")
    expected = InProcess(now=NOW)
    for e in [*crm_events(uid), *canonical_jobs(uid)]:
        expected.feed_event(e)
    want_cmds = {decision(c) for c in expected.commands() if uid in c["customer_id"]}
    want_excs = {(x["exception_id"], x["reason_code"], x["entity_id"]) for x in expected.exceptions()
                 if uid in (x["customer_id"] or "") and x["state"] == "open"}
    types = {c[1] for c in want_cmds}
    assert {"create_job", "create_invoice"} <= types, f"the scenario must issue both: {types}"
    assert {r for _, r, _ in want_excs} == {"unlinked_job"}

    since = end_offsets(bs, [*WATCH, "changes.dispatch.job", topics.AUDIT.name])
    # the CRM's customer, then its deal, each once the worker decided on the one before: the topics are separate,
    # and a deal seen before its customer opens a missing_billing_account the canonical run never sees
    for e in crm_events(uid):
        produce(bs, [(topics.changes_topic(e["source_system"], e["entity_type"]), e["entity_id"].encode(),
                      CODEC.encode("change_event", e))])
        read_until(bs, since, lambda got, e=e: any(g.topic == topics.AUDIT.name and g.record
                                                   and g.record["event_id"] == e["event_id"] for g in got))
    apply_to_postgres(stack["dsn"], uid)

    want_ids = {c[0] for c in want_cmds}
    want_exc_ids = {x[0] for x in want_excs}

    def done(got):
        cmds = {g.record["command_id"] for g in got if g.topic.startswith("commands.") and g.record}
        excs = {g.record["exception_id"] for g in got if g.topic in NAMES.exception_queues and g.record}
        return want_ids <= cmds and want_exc_ids <= excs

    got = read_until(bs, since, done, timeout=120)
    # the jobs arrived as Debezium change events, mapped by the connector: c, u, c, d, c in LSN order per job
    jobs = [g.record for g in got if g.topic == "changes.dispatch.job" and g.record and uid in g.record["entity_id"]]
    assert [(j["entity_id"], j["op"]) for j in jobs if j["entity_id"].startswith("job1")] == \
        [(f"job1-{uid}", "create"), (f"job1-{uid}", "update")]
    assert [j["op"] for j in jobs if j["entity_id"].startswith("job2")] == ["create", "delete"]
    assert all(j["source_vendor"] == "debezium" and j["source_system"] == "dispatch" for j in jobs)
    assert all(j["customer_id"] == f"001dbz{uid}" for j in jobs if j["op"] != "delete")
    for job_id in {j["entity_id"] for j in jobs}:  # one job's changes share a partition, in LSN order
        lsns = [j["seq"] for j in jobs if j["entity_id"] == job_id]
        assert lsns == sorted(set(lsns)), f"{job_id}: one LSN per change, increasing: {lsns}"
    assert len({j["seq"] for j in jobs}) == len(jobs) == 5
    dbz = json.loads(jobs[0]["source_payload"])  # the original bytes: Debezium's JSON with its Connect schema
    assert dbz["schema"]["name"] == "dispatch.public.jobs.Envelope" and dbz["payload"]["source"]["connector"] == \
        "postgresql"
    # the same commands as the canonical path: ids, types, targets, customers and payloads
    issued = {decision(g.record) for g in got if g.topic.startswith("commands.") and g.record
              and uid in (g.record["customer_id"] or "")}
    assert issued == want_cmds
    opened = {(g.record["exception_id"], g.record["reason_code"], g.record["entity_id"]) for g in got
              if g.topic in NAMES.exception_queues and g.record and uid in (g.record["customer_id"] or "")
              and g.record["state"] == "open"}
    assert opened == want_excs
    assert stack["relay"].poll() is None and stack["connect"].alive()


def test_a_row_the_mapping_cannot_use_is_a_dead_letter_with_debeziums_bytes(stack, uid):
    bs = stack["bs"]
    dl = topics.deadletter_topic("ingest.debezium")
    since = end_offsets(bs, [dl, "changes.dispatch.job"])
    with psycopg.connect(stack["dsn"], autocommit=True) as db:  # lines that are not JSON: the row is unusable
        db.execute("INSERT INTO jobs (id, status, lines) VALUES (%s, 'scheduled', 'not json')", (f"bad-{uid}",))
        db.execute("INSERT INTO jobs (id, status, lines) VALUES (%s, 'scheduled', '[]')", (f"good-{uid}",))
    got = read_until(bs, since, lambda got: any(g.topic == dl for g in got) and any(
        g.topic == "changes.dispatch.job" and g.record and g.record["entity_id"] == f"good-{uid}" for g in got))
    [d] = [g.record for g in got if g.topic == dl]
    original = json.loads(d["original_value"])
    assert original["payload"]["after"]["id"] == f"bad-{uid}" and original["payload"]["op"] == "c"
    assert "lines" in d["error"] and d["stage"] == "normalize"
    assert not any(g.record and g.record["entity_id"] == f"bad-{uid}" for g in got if g.topic.startswith("changes."))
    assert stack["relay"].poll() is None, "a bad row must not stop the relay"
