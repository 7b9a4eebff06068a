"""`make stack`: the deployment of docker-compose.yml on this machine, from the same settings, seen by Prometheus.

The settings check needs nothing running: ops/stack/stack.env, docker-compose.yml and ops/prometheus/prometheus.yml
must name the same ports, commands and defaults. The live check runs `python -m concord.tools.stack` (what `make
stack` runs) on free ports, feeds it two rounds of a simulated month (and jobs through the dispatch database, so the
relay ingests), and asks Prometheus, through test_ops_live's helpers, that every target is up and every recording
rule evaluates and returns data; then Ctrl-C must stop every process it started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml
from kafka_helpers import end_offsets, read_until
from test_ops_live import Live, dead_letter_labels, recording_rules, resolve_one, rules_of, wait_for_decisions

from concord.contracts import topics
from concord.tools.simulator import Simulator
from concord.tools.stack import PROMETHEUS_CONFIG, SERVICES, load_settings, port_key, ports_of, prometheus_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ALERTS = ROOT / "ops" / "prometheus" / "rules" / "alerts.yml"
CONTAINER_PORT = {"worker-1": 6066, "worker-2": 6066, "webhooks": 6067, "adapters": 6069, "relay": 6070,
                  "connect": 8083, "prometheus": 9090}


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]


def default_of(value: str) -> str:
    """``${V:-d}`` → d; a literal stays itself."""
    m = re.fullmatch(r"\$\{[A-Z0-9_]+:-([^}]*)\}", value)
    return m[1] if m else value


def test_compose_and_make_stack_read_the_same_settings():
    settings, services = load_settings(), compose_services()
    assert set(SERVICES) <= set(services), f"make stack runs parts compose lacks: {set(SERVICES) - set(services)}"
    for name in SERVICES:  # the host port make stack listens on is the one compose publishes
        host, container = int(settings[port_key(name)]), CONTAINER_PORT[name]
        published = [str(p).rsplit(":", 2)[-2:] for p in services[name].get("ports", [])]
        assert [str(host), str(container)] in published, f"{name}: compose publishes {published}, settings {host}"
    for name in ("worker-1", "worker-2", "webhooks", "adapters", "relay"):
        env = services[name]["environment"]
        assert default_of(env["CONCORD_APP_ID"]) == settings["CONCORD_APP_ID"], name
        assert default_of(env["CONCORD_LOG_LEVEL"]) == settings["CONCORD_LOG_LEVEL"], name
    relay = services["relay"]
    assert relay["command"][:3] == ["python", "-m", "connectors.inbound.relay"]
    assert default_of(relay["environment"]["CONCORD_RELAY_TOPICS"]) == settings["CONCORD_RELAY_TOPICS"]
    assert relay["environment"]["CONCORD_RELAY_METRICS_PORT"] == str(CONTAINER_PORT["relay"])
    adapters = services["adapters"]["command"]
    assert adapters[:4] == ["concord", "adapters", "--target", "sandbox"]
    assert adapters[adapters.index("--metrics-port") + 1] == str(CONTAINER_PORT["adapters"])
    connect = services["connect"]
    assert connect["environment"]["CONNECT_REST_PORT"] == str(CONTAINER_PORT["connect"])
    assert default_of(connect["environment"]["DISPATCH_DB_NAME"]) == settings["DISPATCH_DB_NAME"]
    assert connect["command"][-2:] == ["/etc/concord/connect/connect-standalone.properties",
                                       "/etc/concord/connect/dispatch-jobs.properties"]
    assert "./ops/connect:/etc/concord/connect:ro" in connect["volumes"]
    # every scrape target is a compose service on its container port, and make stack points each at its process
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))["scrape_configs"]
    for job in scrape:
        for target in (t for sc in job["static_configs"] for t in sc["targets"]):
            host, port = target.rsplit(":", 1)
            service = "prometheus" if host == "localhost" else host
            assert int(port) == CONTAINER_PORT[service], target
    ports = ports_of(settings)
    local = prometheus_config(ports)
    targets = {t for job in local["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"127.0.0.1:{ports[s]}" for s in ("worker-1", "worker-2", "webhooks", "adapters", "relay",
                                                         "prometheus")}
    assert all(Path(f).is_absolute() and Path(f).exists() for f in local["rule_files"])


def scalar(live: Live, expr: str) -> float:
    got = live.query(expr)
    return float(got[0]["value"][1]) if got else 0.0


def worker_errors(live: Live) -> str:
    """The last tracebacks and errors in the stack's worker logs, for a failure's message."""
    out = []
    for log in sorted(live.worker_log.parent.glob("worker-*.log")):
        lines = log.read_text(errors="replace").splitlines()
        marks = [i for i, line in enumerate(lines) if "Traceback" in line or " ERROR " in line or "[ERROR]" in line]
        shown = lines[max(0, marks[-1] - 5):marks[-1] + 40] if marks else lines[-20:]
        out.append(f"--- {log.name}:\n" + "\n".join(shown))
    return "\n".join(out)


def replay_until_a_series_grows(live: Live, since: dict, token: str, prefix: str) -> None:
    """Resolve missing billing accounts one by one until a worker's replay counter grows while Prometheus scrapes.

    Each worker's concord_replays_total series starts at its first replay, which a rate cannot see; with two
    workers, three replays (each scraped before the next) give one worker two, so its series grows.
    """
    topic = topics.Deployment(live.app_id).exceptions("revenue-ops")  # the rounds' decisions are all made: read
    # what they opened, to its end
    start = {tp: o for tp, o in since.items() if tp[0] == topic}
    want = sum(end_offsets(live.bootstrap, [topic]).get(tp, o) - o for tp, o in start.items())
    latest: dict[str, dict] = {}
    for g in read_until(live.bootstrap, start, lambda got: len(got) >= want, timeout=60):
        r = g.record
        if r and r["reason_code"] == "missing_billing_account" and (r["customer_id"] or "").startswith(prefix):
            latest[r["exception_id"]] = r
    candidates = [r for r in latest.values() if r["state"] == "open" and r["suggestions"]]
    for rec in candidates:
        before = scalar(live, "sum(concord_replays_total)")
        query = urllib.parse.urlencode({"customer": rec["customer_id"], "choose": "1", "user": "stack-check"})
        req = urllib.request.Request(f"{live.worker_url}/exceptions/{rec['exception_id']}/resolve?{query}",
                                     method="POST", data=b"", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 202
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"resolving {rec['exception_id']} (customer {rec['customer_id']}): {exc.code} "
                                 f"{exc.read()[:2000]!r}\n{worker_errors(live)}") from exc
        live.wait(f"Prometheus scrapes the replay of {rec['exception_id']}",
                  lambda b=before: scalar(live, "sum(concord_replays_total)") > b)
        if live.query("changes(concord_replays_total[15m]) > 0"):
            return
    raise AssertionError(f"{len(candidates)} more resolutions and no worker's replay counter grew while scraped")


@pytest.mark.broker
@pytest.mark.slow
def test_make_stack_runs_the_deployment_and_prometheus_sees_all_of_it(figure):
    # not pytest's tmp_path (mode 700): as root, PostgreSQL runs as the postgres user, who must reach its directory
    tmp_path = Path(tempfile.mkdtemp(prefix="concord-stack-test-"))
    tmp_path.chmod(0o755)
    ready = tmp_path / "ready.json"
    env = dict(os.environ, CONCORD_GAP_WAIT_S="1", CONCORD_SLA_SCALE="0.0002", CONCORD_CANARY_INTERVAL_S="1")
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    log = tmp_path / "stack.log"
    t0, passed = time.monotonic(), False
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "concord.tools.stack", "--state-dir", str(tmp_path / "state"),
                                 "--free-ports", "--scrape-interval", "1s", "--ready-file", str(ready)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        while not ready.exists():
            assert proc.poll() is None, f"make stack exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() - t0 < 240, f"make stack not ready in 240s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        up = time.monotonic() - t0
        info = json.loads(ready.read_text())
        urls = info["urls"]
        assert set(urls) == {"kafka", "dispatch-db", "connect", *SERVICES}
        printed = log.read_text()
        assert all(url in printed for url in urls.values()), "make stack prints every URL"
        secrets = load_settings(Path(info["secrets_file"]))
        token = dict(t.split("=", 1) for t in secrets["CONCORD_OWNER_TOKENS"].split(","))["revenue-ops"]
        bs = info["bootstrap"]
        state = Path(info["state"])
        live = Live(bs, urls["worker-1"], state / "logs" / "worker-1.log", urls["prometheus"],
                    state / "logs" / "prometheus.log", load_settings()["CONCORD_APP_ID"], "", set())
        queue = topics.Deployment(live.app_id).exceptions("revenue-ops")  # the stack's workers' queue
        # what Prometheus should scrape: every job of ops/prometheus/prometheus.yml, each target up
        want_jobs = {j["job_name"]: sum(len(sc["targets"]) for sc in j["static_configs"])
                     for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}

        def all_up() -> bool:
            active = live.api("/api/v1/targets")["activeTargets"]
            got: dict[str, int] = {}
            for t in active:
                if t["health"] == "up":
                    got[t["labels"]["job"]] = got.get(t["labels"]["job"], 0) + 1
            return got == want_jobs

        live.wait(lambda: f"every target up: {want_jobs}", all_up)
        dsn = info["dispatch_dsn"]
        uid = uuid.uuid4().hex[:8]
        # a quarter of the customers lack a billing account: enough exceptions to replay (see replay_until_...)
        sims = [Simulator(customers=40, days=10, seed=3, prefix=f"{uid}-{n}-", faults={"missing_billing_account": 0.25})
                for n in (1, 2)]
        rounds = [list(sim.records()) for sim in sims]
        assert dead_letter_labels(rounds[0])
        first = end_offsets(bs, [queue])
        for n, (sim, records) in enumerate(zip(sims, rounds, strict=True)):
            since = end_offsets(bs, [topics.AUDIT.name, queue])
            published = sim.publish(bs, records)
            with psycopg.connect(dsn, autocommit=True) as db:  # the dispatch system's own rows, through Debezium
                for i in range(5):
                    db.execute("INSERT INTO jobs (id, status, lines) VALUES (%s, 'scheduled', '[]')",
                               (f"stack-{uid}-{n}-{i}",))
            wait_for_decisions(live, published, {k: v for k, v in since.items() if k[0] == topics.AUDIT.name})
            if n == 0:
                resolve_one(live, since, token, sim.prefix)
            else:
                replay_until_a_series_grows(live, first, token, uid)
        live.wait("the relay's ingestion reaches Prometheus", lambda: live.query(
            'sum(concord_ingested_total{job="concord-relay",source="debezium",outcome="published"}) >= 10'))

        loaded: dict = {}

        def evaluated() -> bool:
            loaded.clear()
            for group in live.api("/api/v1/rules")["groups"]:
                for rule in group["rules"]:
                    loaded[rule["name"]] = rule
            return bool(loaded) and all(r["health"] != "unknown" for r in loaded.values())

        live.wait("Prometheus evaluates every rule", evaluated)
        assert set(loaded) == set(recording_rules()) | {r["alert"] for r in rules_of(ALERTS)}
        unhealthy = {k: r.get("lastError") for k, r in loaded.items() if r["health"] != "ok"}
        assert not unhealthy, unhealthy
        empty: list[str] = []

        def all_have_data() -> bool:
            empty[:] = [name for name in sorted(recording_rules()) if not live.query(name)]
            return not empty

        live.wait(lambda: f"every recording rule returns a sample; still empty: {empty}", all_have_data)
        figure(f"make stack: up (9 parts healthy) in {up:.1f}s; checked in {time.monotonic() - t0:.0f}s")
        passed = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as in the terminal
        rc = proc.wait(90)
        left = subprocess.run(["pgrep", "-f", str(tmp_path / "state")], capture_output=True, text=True).stdout.split()
        text = log.read_text()
        if not left and passed:  # a failure keeps the stack's state and logs to look at
            shutil.rmtree(tmp_path, ignore_errors=True)
    assert rc == 0, text[-3000:]
    assert not left, f"processes of the stack still running after Ctrl-C: {left}"
    assert "stack: stopping" in text
