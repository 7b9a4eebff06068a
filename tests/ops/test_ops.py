"""Operations as code: Prometheus rules and their unit tests, runbooks, the Grafana dashboard, compose.

promtool comes from Debian's ``prometheus`` package (``make system-packages``); these tests fail, not
skip, without it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from concord.runtime.metrics import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
PROM = OPS / "prometheus"
PROM_CONFIG = PROM / "prometheus.yml"
RECORDING = PROM / "rules" / "recording.yml"
ALERTS = PROM / "rules" / "alerts.yml"
RULE_FILES = (RECORDING, ALERTS)
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
RUNBOOKS = OPS / "runbooks"
GRAFANA = OPS / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "concord.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "concord.yml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENVIRONMENT = OPS / "ENVIRONMENT.md"

REASON_CODES = (
    "missing_billing_account", "missing_billing_terms", "unmapped_sku", "unknown_customer", "unlinked_job",
    "sequence_gap", "stale_update", "schema_invalid", "amount_mismatch", "unbilled_work", "orphan_invoice",
    "duplicate_invoice", "payment_without_invoice", "command_rejected", "payment_failed", "command_unconfirmed",
    "won_not_billed", "billing_drift", "customer_drift", "overdue_invoice",
)
EXPECTED_ALERTS = {
    "ConcordSLABreach", "ConcordExceptionRateSpike", "ConcordConsumerLagGrowing", "ConcordWorkerDown",
    "ConcordDeadLetters", "ConcordCanaryFailing", "ConcordUnbilledRevenueGrowing", "ConcordMTTRAboveSLA",
}
DASHBOARD_ROWS = (
    "Is the flow healthy?",
    "Where are exceptions piling up, and whose?",
    "How long does it take to resolve?",
    "Are invoices going out on time?",
    "Is the pipeline keeping up?",
    "Did the systems agree, and what money is at risk?",
)
RAW_METRIC = re.compile(r"\bconcord_[a-z0-9_]+")
RECORDED = re.compile(r"\bconcord:[a-z0-9_:]+")


# --- helpers ---------------------------------------------------------------------------------------------

def promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is not on PATH: `make system-packages` installs Debian's prometheus package"
    return subprocess.run([exe, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def recording_names() -> set[str]:
    return {r["record"] for r in rules(RECORDING)}


def alert_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules(ALERTS)}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard()["annotations"]["list"] if "expr" in a]
    return exprs


def exported_series_names() -> set[str]:
    """Every series name a scrape of a Concord process can expose, from the metric families in the code."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def interpolate_defaults(text: str) -> str:
    """Compose-style interpolation with each variable's default (``${V:-d}`` → d, others → ``V``)."""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?[^}]*\}",
                  lambda m: m.group(2) if m.group(2) is not None else m.group(1), text)


def documented_env_vars() -> set[str]:
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", ENVIRONMENT.read_text(encoding="utf-8"), re.M))


# --- (1), (2), (7) promtool -------------------------------------------------------------------------------

def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", *RULE_FILES)
    assert proc.returncode == 0, output(proc)


def test_rule_unit_test_files_exist() -> None:
    assert RULE_TESTS, "no promtool unit tests in ops/prometheus/tests"


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_test_rules(test_file: Path) -> None:
    proc = promtool("test", "rules", test_file)
    assert proc.returncode == 0, output(proc)
    assert "SUCCESS" in proc.stdout, output(proc)


def test_promtool_check_config_as_mounted_in_compose(tmp_path: Path) -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prometheus["volumes"] if v.startswith("."))
    assert mounts.get("./ops/prometheus") == "/etc/prometheus", prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    # the container's view: ops/prometheus copied where the mount puts it, nothing else around it
    etc = tmp_path / "etc" / "prometheus"
    shutil.copytree(PROM, etc)
    proc = promtool("check", "config", etc / "prometheus.yml", cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    # and from the repository, as the README's developer would run it
    proc = promtool("check", "config", PROM_CONFIG)
    assert proc.returncode == 0, output(proc)
    config = load_yaml(PROM_CONFIG)
    for rule_file in config["rule_files"]:
        assert not Path(rule_file).is_absolute(), f"{rule_file}: rule paths must be relative to the config"
        assert (PROM / rule_file).resolve() in {p.resolve() for p in RULE_FILES}


def test_scrape_targets_match_compose_services() -> None:
    services = compose()["services"]
    jobs = {j["job_name"]: j for j in load_yaml(PROM_CONFIG)["scrape_configs"]}
    assert {"concord", "concord-webhooks"} <= set(jobs)
    targets = {job: [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]
               for job in ("concord", "concord-webhooks")}
    assert targets["concord"] == ["worker-1:6066", "worker-2:6066"]
    assert targets["concord-webhooks"] == ["webhooks:6067"]
    for job in ("concord", "concord-webhooks"):
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
    for name in ("worker-1", "worker-2"):
        assert services[name]["environment"]["CONCORD_WEB_PORT"] == "6066"
        assert services[name]["command"] == ["concord", "run"]
    assert services["webhooks"]["command"] == ["concord", "webhooks", "--host", "0.0.0.0", "--port", "6067"]


# --- (3) every rule is unit-tested ------------------------------------------------------------------------

def rule_tests() -> list[dict[str, Any]]:
    return [case for path in RULE_TESTS for case in load_yaml(path)["tests"]]


def test_every_alert_fires_in_a_test_and_stays_quiet_in_another() -> None:
    assert set(alert_rules()) == EXPECTED_ALERTS
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in rule_tests():
        for check in case.get("alert_rule_test") or []:
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert not set(alert_rules()) - fired, f"alerts no test fires: {sorted(set(alert_rules()) - fired)}"
    assert not set(alert_rules()) - quiet, f"alerts with no must-not-fire case: {sorted(set(alert_rules()) - quiet)}"


def test_every_recording_rule_has_an_expression_test() -> None:
    tested: set[str] = set()
    for case in rule_tests():
        for check in case.get("promql_expr_test") or []:
            tested.update(RECORDED.findall(check["expr"]))
    missing = recording_names() - tested
    assert not missing, f"recording rules no promql_expr_test evaluates: {sorted(missing)}"
    assert all(name.startswith("concord:") for name in recording_names())


# --- (4) runbooks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_alert_has_labels_annotations_and_runbook(name: str) -> None:
    rule = alert_rules()[name]
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    annotations = rule["annotations"]
    assert annotations.get("summary") and annotations.get("description")
    assert annotations["runbook_url"] == f"ops/runbooks/{name}.md"
    runbook = ROOT / annotations["runbook_url"]
    assert runbook.is_file(), runbook
    assert runbook.read_text(encoding="utf-8").startswith(f"# {name}")


@pytest.mark.parametrize("code", REASON_CODES)
def test_reason_code_has_runbook(code: str) -> None:
    page = RUNBOOKS / "reasons" / f"{code}.md"
    assert page.is_file(), page
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {code}")
    for section in ("## What it means", "## What to check", "## How to resolve"):
        assert section in text, f"{page}: no {section!r}"
    assert "concord exceptions" in text


def test_every_routed_reason_has_a_runbook() -> None:
    routing = ROOT / "concord" / "config" / "routing.yaml"
    missing = [code for code in load_yaml(routing)["reasons"] if not (RUNBOOKS / "reasons" / f"{code}.md").is_file()]
    assert not missing, f"reason codes in {routing.name} without ops/runbooks/reasons/<code>.md: {missing}"


def test_runbook_index_links_every_page() -> None:
    index = (RUNBOOKS / "README.md").read_text(encoding="utf-8")
    pages = {p.relative_to(RUNBOOKS).as_posix() for p in RUNBOOKS.rglob("*.md")} - {"README.md"}
    linked = set(re.findall(r"\]\(([^)]+\.md)\)", index))
    assert pages == linked, f"not indexed: {sorted(pages - linked)}; dangling: {sorted(linked - pages)}"


# --- (5) names used by rules, alerts, dashboard and runbooks exist ------------------------------------------

def used_names() -> dict[str, set[str]]:
    """Raw metric names and recording-rule names, by where they are used."""
    sources = {
        "recording rules": [r["expr"] for r in rules(RECORDING)],
        "alerts": [r["expr"] for r in rules(ALERTS)],
        "dashboard": dashboard_exprs(),
        "runbooks": [p.read_text(encoding="utf-8") for p in RUNBOOKS.rglob("*.md")],
    }
    return {where: set(RAW_METRIC.findall("\n".join(texts))) | set(RECORDED.findall("\n".join(texts)))
            for where, texts in sources.items()}


def test_every_metric_used_is_exported_by_the_code() -> None:
    exported = exported_series_names()
    assert {"concord_events_total", "concord_exception_resolution_seconds_bucket", "concord_consumer_lag"} <= exported
    for where, names in used_names().items():
        unknown = {n for n in names if n.startswith("concord_")} - exported
        assert not unknown, f"{where} use metrics concord/runtime/metrics.py does not export: {sorted(unknown)}"


def test_every_recording_name_used_is_defined() -> None:
    defined = recording_names()
    for where, names in used_names().items():
        undefined = {n for n in names if n.startswith("concord:")} - defined
        assert not undefined, f"{where} use recording rules that are not defined: {sorted(undefined)}"


# --- dashboard and its provisioning ---------------------------------------------------------------------------

def test_dashboard_rows_answer_the_questions_in_order() -> None:
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert rows == list(DASHBOARD_ROWS)
    # every row has panels under it
    kinds = [p["type"] == "row" for p in dashboard()["panels"]]
    assert kinds[0] and all(not (a and b) for a, b in zip(kinds, kinds[1:], strict=False)) and not kinds[-1]


def test_dashboard_panels_query_the_provisioned_datasource() -> None:
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_uses_recording_rules_where_one_exists() -> None:
    recorded_inputs = set(RAW_METRIC.findall("\n".join(r["expr"] for r in rules(RECORDING))))
    for expr in dashboard_exprs():
        raw = set(RAW_METRIC.findall(expr)) & recorded_inputs
        assert not raw, f"{expr!r} reads {sorted(raw)} directly; use the recording rule"


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    # promtool parses PromQL when it checks rules: wrap every dashboard query in a recording rule
    exprs = sorted(set(dashboard_exprs()))
    group = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(group), encoding="utf-8")
    proc = promtool("check", "rules", path)
    assert proc.returncode == 0, output(proc)


def test_grafana_provisioning_matches_compose() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["uid"] == "prometheus" and datasource["type"] == "prometheus"
    host = re.match(r"https?://([^:/]+):(\d+)", datasource["url"])
    assert host and host.group(1) in compose()["services"], datasource["url"]


# --- (6) docker-compose.yml and the Dockerfile ----------------------------------------------------------------

def pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in {"", "latest"}


def test_every_image_is_pinned() -> None:
    for name, service in compose()["services"].items():
        assert "image" in service or "build" in service, name
        if "image" in service:
            assert pinned(service["image"]), f"{name}: image {service['image']!r} is not pinned to a tag"
    bases = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    assert bases and all(pinned(b) for b in bases), bases


def test_services_built_from_the_dockerfile() -> None:
    services = compose()["services"]
    built = {name for name, s in services.items() if "build" in s}
    assert built == {"worker-1", "worker-2", "webhooks", "relay", "adapters", "connect"}
    assert services["connect"]["build"]["dockerfile"] == "ops/connect/Dockerfile"  # Java: Connect and Debezium
    for name in built - {"connect"}:
        assert (ROOT / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]) == DOCKERFILE
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["CONCORD_STORE"] == "memory://"
        assert env["CONCORD_WEB_HOST"] == "0.0.0.0"
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "healthcheck" in kafka


def test_mounted_host_paths_exist_and_named_volumes_are_declared() -> None:
    doc = compose()
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: mounts {source}, which is not in the repository"
            else:
                assert source in (doc.get("volumes") or {}), f"{name}: volume {source!r} is not declared"


def test_every_variable_is_documented() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    documented = documented_env_vars()
    assert {"STRIPE_WEBHOOK_SECRET", "HUBSPOT_CLIENT_SECRET", "JOBBER_WEBHOOK_SECRET"} <= used
    assert not used - documented, f"not in ops/ENVIRONMENT.md: {sorted(used - documented)}"
    assert not documented - used, f"documented but unused: {sorted(documented - used)}"


def test_no_literal_secrets() -> None:
    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use a mapping for environment"
        for key, value in env.items():
            if re.search(r"SECRET|PASSWORD|TOKEN|API_KEY", key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}", str(value)), f"{name}: {key} is a literal"


def test_host_ports_are_unique() -> None:
    seen: dict[str, str] = {}
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            parts = interpolate_defaults(str(port)).split(":")
            assert len(parts) in (2, 3), f"{name}: publish ports explicitly, got {port!r}"
            host = parts[-2]
            assert host not in seen, f"host port {host} used by {seen[host]} and {name}"
            seen[host] = name


def test_services_depend_on_kafka() -> None:
    services = compose()["services"]

    def deps(name: str) -> set[str]:
        direct = services[name].get("depends_on") or []
        return set(direct)  # list or mapping: its keys/items are the service names

    for name in services:
        if name == "kafka":
            continue
        reach, todo = set(), [name]
        while todo:
            for dep in deps(todo.pop()) - reach:
                assert dep in services, f"{name} depends on unknown service {dep}"
                reach.add(dep)
                todo.append(dep)
        assert "kafka" in reach, f"{name} does not depend on kafka"
    for name in ("worker-1", "worker-2", "webhooks"):
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy", name
