"""The live check of operations: a worker on the broker, Debian's Prometheus scraping it with the repository's rules.

tests/test_ops.py proves the rules with promtool's synthetic series; this module proves them against what a real
worker exports. It runs a Concord worker on the session broker, feeds it simulated traffic with faults, and starts
Debian's ``prometheus`` (scrape and evaluation every second, the rule files of ops/prometheus/rules) against it.
Through Prometheus's HTTP API it then checks that every rule loads and evaluates cleanly, that every recording
rule and every dashboard query returns data (apart from a short list of rules whose inputs no code exports yet),
and that a fault the test injects fires its alert.

Counter rates need increases Prometheus has seen: a labelled series appears on its first increment, and ratios
divide by ``rate(...) > 0``. So the traffic goes in two rounds of the same simulated month (different ids): the
first creates the series, the second increases every one of them while Prometheus scrapes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kafka_helpers import CODEC, committed, deployment, end_offsets, produce, read_until

from concord.contracts import topics
from concord.runtime.broker import free_port
from concord.tools.demo import stop_process, wait_for_http, worker_process
from concord.tools.simulator import Published, Simulator

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "ops" / "prometheus" / "rules" / "recording.yml"
ALERTS = ROOT / "ops" / "prometheus" / "rules" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "concord.json"
DEADLINE = 90.0  # seconds any one wait may take; a normal run finishes all of them in well under a minute
RAW_METRIC = re.compile(r"\bconcord_[a-z0-9_]+")
RECORDED = re.compile(r"\bconcord:[a-z0-9_:]+")
GARBAGE = b"\x00garbage: not an Avro single-object record "

# Recording rules that cannot have data from a worker fed change events, and why. Each one reads only metrics no
# code path in the worker produces (concord/runtime/metrics.py defines them; nothing in concord/ increments or sets
# them), so no traffic can give them data. test_excused_rules_still_have_no_input fails as soon as the worker exports
# one of these metrics: the rule must then leave this list and show data like the others.
EXCUSED = {
    # Counted by the connectors (`concord webhooks`, `concord ingest`), a separate process; this check scrapes
    # only the worker (job concord), as asked.
    "concord:ingested:rate1m": "concord_ingested_total is exported by the connectors, not by the worker",
}

T = TypeVar("T")


# --- helpers ------------------------------------------------------------------------------------------------

def rules_of(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [rule for group in yaml.safe_load(f)["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"] for r in rules_of(RECORDING)}


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target of the dashboard, rows' nested panels included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(p.get("title", "?"), t["expr"]) for p in walk(dashboard["panels"]) for t in p.get("targets", [])
            if t.get("expr")]


def excused_expr(expr: str) -> bool:
    """A dashboard query is excused when every recording rule it reads is excused."""
    names = set(RECORDED.findall(expr))
    return bool(names) and names <= set(EXCUSED)


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def http_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:  # Prometheus answers 400/422 with a JSON error body
        raise AssertionError(f"{url}: {exc.code} {exc.read().decode(errors='replace')}") from exc


@dataclass
class Live:
    """The running worker and Prometheus, and what the test fed the worker."""

    bootstrap: str
    worker_url: str
    worker_log: Path
    prom_url: str
    prom_log: Path
    app_id: str
    target: str  # the changes topic the alert check injects undecodable bytes into
    sim_dead_letters: set[tuple[str, str]]  # (topic, stage) the simulated traffic dead-letters in both rounds

    def logs(self) -> str:
        return (f"\n--- prometheus log ({self.prom_log}), last lines:\n{tail(self.prom_log)}"
                f"\n--- worker log ({self.worker_log}), last lines:\n{tail(self.worker_log, 30)}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.prom_url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        body = http_json(url)
        assert body.get("status") == "success", f"{url}: {body}{self.logs()}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", f"{expr!r} gave a {data['resultType']}, not a vector"
        return data["result"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("/api/v1/alerts")["alerts"]

    def worker_sum(self, prefix: str) -> float:
        """The sum of the samples on the worker's /metrics right now whose line starts with ``prefix``."""
        with urllib.request.urlopen(f"{self.worker_url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    def wait(self, what: str | Callable[[], str], check: Callable[[], T | None], timeout: float = DEADLINE) -> T:
        """Poll ``check`` until it returns something truthy; fail with ``what`` and both logs at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout:.0f}s: {what() if callable(what) else what}{self.logs()}")
            time.sleep(0.5)

    def prometheus_caught_up(self) -> None:
        """Wait until Prometheus has scraped every event the worker has counted so far."""
        counted = self.worker_sum("concord_events_total{")

        def scraped() -> bool:
            got = self.query('sum(concord_events_total{job="concord"})')
            return bool(got) and float(got[0]["value"][1]) >= counted

        self.wait(f"Prometheus scrapes concord_events_total reaching {counted:.0f}", scraped)


def resolve_one(live: Live, since: dict[tuple[str, int], int], token: str, prefix: str) -> None:
    """Act as revenue-ops: resolve one of this round's missing billing accounts with Concord's first suggestion."""
    queue = topics.Deployment(live.app_id).exceptions("revenue-ops")

    def first_open(got: list[Any]) -> Any:
        return next((g.record for g in got if g.topic == queue and g.record
                     and g.record["reason_code"] == "missing_billing_account" and g.record["suggestions"]
                     and (g.record["customer_id"] or "").startswith(prefix)), None)

    rec = first_open(read_until(live.bootstrap, since, lambda got: first_open(got) is not None, timeout=60))
    query = urllib.parse.urlencode({"customer": rec["customer_id"], "choose": "1", "user": "ops-live"})
    req = urllib.request.Request(f"{live.worker_url}/exceptions/{rec['exception_id']}/resolve?{query}",
                                 method="POST", data=b"", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202
    read_until(live.bootstrap, since, lambda got: any(
        g.record and g.key == rec["exception_id"].encode() and g.record["state"] == "resolved" for g in got),
        timeout=60)


def wait_for_decisions(live: Live, published: list[Published], since: dict[tuple[str, int], int]) -> None:
    """Read audit.decisions until every published record has one (the worker processed them all)."""
    want = {(p.topic, p.partition, p.offset) for p in published}
    seen: set[tuple[str, int, int]] = set()
    done_upto = [0]

    def done(got: list[Any]) -> bool:
        for g in got[done_upto[0]:]:
            if g.record:
                seen.add((g.record["topic"], g.record["partition"], g.record["offset"]))
        done_upto[0] = len(got)
        return want <= seen

    try:
        read_until(live.bootstrap, since, done, timeout=DEADLINE)
    except AssertionError as exc:
        missing = sorted(want - seen)
        raise AssertionError(f"{exc}; {len(missing)} of {len(want)} published records have no decision, "
                             f"e.g. {missing[:5]}{live.logs()}") from None


def wait_for_commits(live: Live, upto: dict[tuple[str, int], int]) -> None:
    """Wait until the worker's consumer group committed at least ``upto`` (so it processed what came before)."""
    names = sorted({t for t, _ in upto})

    def caught_up() -> bool:
        got = committed(live.bootstrap, live.app_id, names)
        return all(got.get(tp, -1) >= end for tp, end in upto.items() if end > 0)

    live.wait(f"the worker's group {live.app_id} commits {names} up to {upto}", caught_up)


def start_prometheus(tmp: Path, worker_port: int) -> tuple[subprocess.Popen, str, Path]:
    exe = shutil.which("prometheus")
    assert exe, "prometheus is not on PATH: `make system-packages` installs Debian's prometheus package"
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RECORDING), str(ALERTS)],
        "scrape_configs": [{"job_name": "concord", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}],
    }
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log_path = tmp / "prometheus.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [exe, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=info"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log_path


def dead_letter_labels(records: list[Any]) -> set[tuple[str, str]]:
    stage = {"undecodable": "decode", "schema_invalid": "validate"}
    return {(r.topic, stage[r.fault]) for r in records if r.fault in stage}


# --- the running system -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(broker, tmp_path_factory) -> Iterator[Live]:
    """A worker fed two rounds of simulated traffic while Debian's Prometheus scrapes it with Concord's rules."""
    bs = broker.bootstrap_servers
    uid = uuid.uuid4().hex[:10]
    tmp = tmp_path_factory.mktemp("ops-live")
    changes = [t.name for t in topics.CHANGES]
    sims = [Simulator(customers=40, days=10, seed=3, prefix=f"{uid}-{n}-") for n in (1, 2)]
    rounds = [list(sim.records()) for sim in sims]
    sim_dead_letters = dead_letter_labels(rounds[0])
    assert sim_dead_letters == dead_letter_labels(rounds[1])
    # The alert check injects undecodable bytes into a topic whose decode failures nothing else causes while
    # Prometheus watches: changes.crm.deal unless the simulated traffic already dead-letters records there.
    preference = ["changes.crm.deal", *(t for t in changes if t != "changes.crm.deal")]
    target = next(t for t in preference if (t, "decode") not in sim_dead_letters)

    history = end_offsets(bs, changes)  # what earlier tests left: a new consumer group reads it from the start
    port = free_port()
    app_id = f"concord-ops-live-{uid}"
    token = uuid.uuid4().hex
    # SLAs shrink (4 h -> 2.9 s) so some run out and escalate while Prometheus watches.
    env = {"CONCORD_DATA_DIR": str(tmp / "worker"), "CONCORD_GAP_WAIT_S": "1", "CONCORD_SLA_SCALE": "0.0002",
           "CONCORD_OWNER_TOKENS": f"revenue-ops={token}", "CONCORD_CANARY_INTERVAL_S": "1"}
    names = deployment(bs, app_id)  # the worker's own topics, there before anything reads them
    with worker_process(bs, port, app_id, tmp / "worker.log", env):
        live = Live(bs, f"http://127.0.0.1:{port}", tmp / "worker.log", "", tmp / "prometheus.log", app_id, target,
                    sim_dead_letters)
        # Prime the target's dead-letter series before Prometheus starts: Prometheus cannot see the first event
        # of a series (there is no earlier sample; alerts.yml explains), and the check wants the injected fault
        # alone to fire the alert. Waiting for the commit also makes sure the worker is done with the history.
        produce(bs, [(target, f"prime-{uid}".encode(), GARBAGE + b"prime")])
        # one adapter report on outcomes.commands, as `concord adapters` publishes them, whatever earlier tests left
        outcome = {"command_id": f"cmd_{uid}", "type": "create_invoice", "target_system": "billing",
                   "customer_id": f"ops-{uid}", "entity_type": "deal", "entity_id": f"deal-{uid}",
                   "outcome": "applied", "target_ref": f"in_{uid}", "detail": "", "adapter": "sandbox",
                   "trace_id": f"trace-{uid}", "reported_at": int(time.time() * 1000)}
        produce(bs, [(topics.COMMAND_OUTCOMES.name, f"ops-{uid}".encode(), CODEC.encode("command_outcome", outcome))])
        wait_for_commits(live, {**history, **end_offsets(bs, [target, topics.COMMAND_OUTCOMES.name])})
        live.wait(f"the worker counts the dead letter primed on {target}",
                  lambda: live.worker_sum(f'concord_deadletters_total{{stage="decode",topic="{target}"}}') >= 1)

        proc, live.prom_url, live.prom_log = start_prometheus(tmp, port)
        try:
            def ready() -> bool:
                assert proc.poll() is None, f"prometheus exited with status {proc.returncode}{live.logs()}"
                try:
                    wait_for_http(f"{live.prom_url}/-/ready", timeout=1)
                except Exception:
                    return False
                return True

            live.wait("Prometheus answers /-/ready", ready)
            live.wait("Prometheus scrapes the worker (up == 1)",
                      lambda: any(s["value"][1] == "1" for s in live.query('up{job="concord"}')))
            for sim, records in zip(sims, rounds, strict=True):
                since = end_offsets(bs, [topics.AUDIT.name, *(names.exceptions(o) for o in ("revenue-ops", "finance"))])
                published = sim.publish(bs, records)
                assert len(published) == len(records)
                wait_for_decisions(live, published, {k: v for k, v in since.items() if k[0] == topics.AUDIT.name})
                resolve_one(live, since, token, sim.prefix)  # an owner's fix and its replay, in every round
                live.prometheus_caught_up()
            yield live
        finally:
            stop_process(proc, timeout=10)


# --- the checks ---------------------------------------------------------------------------------------------

def test_prometheus_loads_and_evaluates_every_rule(live):
    loaded: dict[str, dict[str, Any]] = {}

    def evaluated() -> bool:
        loaded.clear()
        for group in live.api("/api/v1/rules")["groups"]:
            for rule in group["rules"]:
                loaded[rule["name"]] = rule
        return bool(loaded) and all(r["health"] != "unknown" for r in loaded.values())

    live.wait("Prometheus evaluates every rule once", evaluated)
    assert set(loaded) == set(recording_rules()) | {r["alert"] for r in rules_of(ALERTS)}, live.logs()
    unhealthy = {name: (r["health"], r.get("lastError")) for name, r in loaded.items() if r["health"] != "ok"}
    assert not unhealthy, f"rules that fail to evaluate: {unhealthy}{live.logs()}"
    [target] = live.api("/api/v1/targets")["activeTargets"]
    assert target["labels"]["job"] == "concord" and target["health"] == "up", target


def test_excused_rules_still_have_no_input(live):
    """The excuses hold: the worker really exports none of what the excused rules read."""
    rules = recording_rules()
    assert set(EXCUSED) <= set(rules), f"excused rules that recording.yml no longer has: {set(EXCUSED) - set(rules)}"
    for name in EXCUSED:
        for metric in set(RAW_METRIC.findall(rules[name])):
            got = live.query(f'{metric}{{job="concord"}}')
            assert not got, (f"the worker now exports {metric} ({len(got)} series): take {name} out of EXCUSED "
                             f"in {Path(__file__).name} so the live check proves it has data")


def test_every_recording_rule_returns_data(live):
    wanted = sorted(set(recording_rules()) - set(EXCUSED))
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [name for name in wanted if not live.query(name)]
        return not empty

    live.wait(lambda: f"every recording rule returns a sample; still empty: {empty}", all_have_data)


def test_mttr_is_held_against_the_slas_the_worker_exports(live):
    """The SLA rule weighs the routed SLAs (scaled as the exceptions' own) by what the owner resolved."""
    exported = {s["metric"]["reason"]: float(s["value"][1])
                for s in live.query('concord_exception_sla_seconds{job="concord",owner="revenue-ops"}')}
    assert exported["customer_drift"] == pytest.approx(86_400 * 0.0002), exported  # routing.yaml 1d, CONCORD_SLA_SCALE
    [sla] = live.wait("revenue-ops has an SLA to hold its MTTR against (resolve_one resolved one of its exceptions)",
                      lambda: live.query('concord:kpi_sla_seconds_by_owner:24h{owner="revenue-ops"}'))
    assert min(exported.values()) <= float(sla["value"][1]) <= max(exported.values()), (sla, exported)
    # one instant query: all three come from the same evaluation of the group
    [both] = live.query('concord:kpi_mttr_over_sla_ratio_by_owner:24h{owner="revenue-ops"} - on (owner) ('
                        'concord:kpi_mttr_seconds_by_owner:24h / concord:kpi_sla_seconds_by_owner:24h)')
    assert float(both["value"][1]) == pytest.approx(0.0, abs=1e-9)


def test_every_dashboard_query_returns_data(live):
    targets = dashboard_targets()
    assert len(targets) > 20, "the dashboard's panel targets were not found"
    wanted = [(title, expr) for title, expr in targets if not excused_expr(expr)]
    empty: list[tuple[str, str]] = []

    def all_have_data() -> bool:
        empty[:] = [(title, expr) for title, expr in wanted if not live.query(expr)]
        return not empty

    live.wait(lambda: f"every dashboard panel query returns data; still empty (panel, expr): {empty}", all_have_data)


def test_injected_dead_letter_fires_its_alert(live):
    """Undecodable bytes on a changes topic fire ConcordDeadLetters for that topic and stage, and nothing before."""
    labels = {"alertname": "ConcordDeadLetters", "topic": live.target, "stage": "decode"}

    def matching(alert: dict[str, Any], want: dict[str, str]) -> bool:
        return all(alert["labels"].get(k) == v for k, v in want.items())

    def series_matching(sample: dict[str, Any], want: dict[str, str]) -> bool:
        return all(sample["metric"].get(k) == v for k, v in want.items())

    # Prometheus has scraped the primed series since it started, and seen it never change
    series = live.query(f'concord_deadletters_total{{topic="{live.target}", stage="decode"}}')
    assert series and float(series[0]["value"][1]) >= 1, f"{live.target}'s dead-letter series was not scraped"
    before = [a for a in live.alerts() if matching(a, labels)]
    assert not before, f"ConcordDeadLetters is already {before[0]['state']} for {live.target} before the fault"

    produce(live.bootstrap, [(live.target, f"fault-{live.app_id}".encode(), GARBAGE + b"fault")])

    def firing() -> list[dict[str, Any]]:
        return [a for a in live.alerts() if matching(a, labels) and a["state"] == "firing"]

    [alert] = live.wait(f"ConcordDeadLetters fires for {live.target} (stage decode)", firing)
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["runbook_url"] == "ops/runbooks/ConcordDeadLetters.md"
    assert live.target in alert["annotations"]["summary"]
    # The simulated traffic's own bad records (first round: new series; second round: increases) fire it too.
    for topic, stage in sorted(live.sim_dead_letters):
        live.wait(f"ConcordDeadLetters fires for the simulated dead letters on {topic} (stage {stage})",
                  lambda t=topic, s=stage: [a for a in live.alerts() if a["state"] == "firing" and matching(
                      a, {"alertname": "ConcordDeadLetters", "topic": t, "stage": s})])
    # and the dashboard's alert annotation query shows it
    annotations = json.loads(DASHBOARD.read_text(encoding="utf-8"))["annotations"]["list"]
    [annotation] = [a["expr"] for a in annotations if a.get("expr")]
    live.wait("the dashboard's alert annotation query returns the firing alert",
              lambda: [s for s in live.query(annotation) if series_matching(s, labels)])
