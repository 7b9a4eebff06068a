"""``make stack``: the durable deployment of docker-compose.yml without Docker, every process on loopback.

Started in order, each waited for until healthy: Apache Kafka (KRaft, from the Maven cache) and a PostgreSQL
cluster standing in for the dispatch system (wal_level=logical, the jobs table of ops/connect/dispatch-jobs.sql);
Kafka Connect running the Debezium connector of ops/connect; then the relay (Debezium topic → changes.dispatch.job),
two workers, the webhook receiver and the sandbox adapters; last Prometheus, with ops/prometheus/prometheus.yml's
scrape jobs pointed at those processes and its rule files. Settings come from ops/stack/stack.env, the values
docker-compose.yml uses. Ctrl-C (or SIGTERM) stops everything, newest first.

State (Kafka's log, the databases, the workers' tables, Connect's offsets, generated secrets) is kept in the
state directory, so a second ``make stack`` carries on where the first stopped; ``--fresh`` starts empty.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from concord.contracts.topics import OWNERS
from concord.exceptions import ConcordError
from concord.runtime.broker import CONNECT_DIR, ensure_topics, free_port, start_connect, start_kafka
from concord.tools.demo import stop_process, wait_for_http
from concord.tools.pgcluster import start_postgres

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ROOT / "ops" / "stack" / "stack.env"
PROMETHEUS_CONFIG = ROOT / "ops" / "prometheus" / "prometheus.yml"
# the processes that listen, by their docker-compose.yml service names; each has <NAME>_PORT in the settings
SERVICES = ("worker-1", "worker-2", "webhooks", "adapters", "relay", "connect", "prometheus")
WEBHOOK_SECRETS = ("STRIPE_WEBHOOK_SECRET", "HUBSPOT_CLIENT_SECRET", "JOBBER_WEBHOOK_SECRET",
                   "SALESFORCE_WEBHOOK_TOKEN")


class StackError(ConcordError):
    """A part of the stack could not start or stopped being healthy."""


def load_settings(path: Path = SETTINGS) -> dict[str, str]:
    """``KEY=value`` lines of the settings file (comments and blank lines skipped); a bad line is an error."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if not m:
            raise StackError(f"{path}:{n}: expected KEY=value, got {line!r}")
        out[m[1]] = m[2]
    return out


def port_key(service: str) -> str:
    """The settings key of a service's port: worker-1 → WORKER_1_PORT."""
    return service.upper().replace("-", "_") + "_PORT"


def ports_of(settings: dict[str, str], free: bool = False) -> dict[str, int]:
    """Every service's port from the settings, or free loopback ports instead (tests, a second stack)."""
    missing = [port_key(s) for s in SERVICES if port_key(s) not in settings]
    if missing:
        raise StackError(f"{SETTINGS}: missing {', '.join(missing)}")
    return {s: free_port() if free else int(settings[port_key(s)]) for s in SERVICES}


def prometheus_config(ports: dict[str, int], scrape_interval: str | None = None,
                      source: Path = PROMETHEUS_CONFIG) -> dict[str, Any]:
    """The deployment's Prometheus configuration with compose's ``service:port`` targets on loopback."""
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    config["rule_files"] = [str((source.parent / f).resolve()) for f in config.get("rule_files", [])]
    if scrape_interval:
        config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval,
                                scrape_timeout=scrape_interval)
    for job in config["scrape_configs"]:
        for sc in job.get("static_configs", []):
            targets = []
            for target in sc["targets"]:
                host = target.rsplit(":", 1)[0]
                service = "prometheus" if host == "localhost" else host
                if service not in ports:
                    raise StackError(f"{source}: target {target} is not a service make stack runs ({SERVICES})")
                targets.append(f"127.0.0.1:{ports[service]}")
            sc["targets"] = targets
    return config


def _secrets(state: Path) -> dict[str, str]:
    """Webhook secrets and owner tokens: the environment's, else generated once into the state dir (mode 600)."""
    path = state / "secrets.env"
    kept = load_settings(path) if path.exists() else {}
    wanted = {k: os.environ.get(k) or kept.get(k) or secrets.token_hex(24) for k in WEBHOOK_SECRETS}
    wanted["CONCORD_OWNER_TOKENS"] = os.environ.get("CONCORD_OWNER_TOKENS") or kept.get("CONCORD_OWNER_TOKENS") or \
        ",".join(f"{team}={secrets.token_hex(16)}" for team in OWNERS)
    if wanted != kept:
        path.touch(mode=0o600)
        path.write_text("".join(f"{k}={v}\n" for k, v in wanted.items()), encoding="utf-8")
    return wanted


@dataclass
class Service:
    """One running part: where it answers and how to stop it."""

    name: str
    url: str
    stop: Callable[[], None]
    health: str = ""  # the URL polled for health; empty: its start already proved it
    proc: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class Stack:
    """The running deployment; ``stop()`` ends every part, newest first."""

    state: Path
    bootstrap: str = ""
    services: list[Service] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)
    dispatch_dsn: str = ""

    def url(self, name: str) -> str:
        """Where the named part answers."""
        return next(s.url for s in self.services if s.name == name)

    def dead(self) -> list[Service]:
        """The parts whose process has exited."""
        return [s for s in self.services if s.proc is not None and s.proc.poll() is not None]

    def stop(self) -> None:
        """Stop every part, newest first; a part that fails to stop does not keep the others running."""
        while self.services:
            s = self.services.pop()
            try:
                s.stop()
            except Exception as exc:  # noqa: BLE001 - the rest must still stop
                print(f"stack: stopping {s.name}: {exc}", file=sys.stderr)

    def describe(self) -> dict[str, Any]:
        """Every part's URL, the bootstrap servers and the state directory, as the ready file holds them."""
        return {"bootstrap": self.bootstrap, "state": str(self.state),
                "urls": {s.name: s.url for s in self.services}, "secrets_file": str(self.state / "secrets.env"),
                "dispatch_dsn": self.dispatch_dsn}


def _spawn(stack: Stack, name: str, argv: list[str], env: dict[str, str], url: str, health: str) -> Service:
    log = stack.state / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    svc = Service(name, url, lambda: stop_process(proc), health, proc, log)
    stack.services.append(svc)
    return svc


def _healthy(svc: Service, timeout: float) -> None:
    try:
        wait_for_http(svc.health, svc.proc, timeout=timeout)
    except ConcordError as exc:
        tail = svc.log.read_text(errors="replace")[-2000:] if svc.log and svc.log.exists() else ""
        raise StackError(f"{svc.name} is not healthy: {exc}\n--- {svc.log}:\n{tail}") from exc


def say(msg: str) -> None:
    """Progress on stderr."""
    print(f"stack: {msg}", file=sys.stderr, flush=True)


def start_stack(state: Path, *, free_ports: bool = False, scrape_interval: str | None = None,
                settings_path: Path = SETTINGS, timeout: float = 120.0) -> Stack:
    """Start every part of the deployment and wait until each is healthy; on any failure stop what started."""
    settings = load_settings(settings_path)
    ports = ports_of(settings, free_ports)
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise StackError("prometheus is not on PATH: `make system-packages` installs Debian's prometheus package")
    state.mkdir(parents=True, exist_ok=True)
    stack = Stack(state, secrets=_secrets(state))
    t0 = time.monotonic()
    try:
        pg_box: dict[str, Any] = {}

        def pg() -> None:  # the database starts while the broker's JVM does
            try:
                pg_box["pg"] = start_postgres(state / "dispatch-db", logical=True)
            except Exception as exc:  # noqa: BLE001 - raised in the main thread below
                pg_box["error"] = exc

        pg_thread = threading.Thread(target=pg, daemon=True)
        pg_thread.start()
        try:
            kafka = start_kafka(1, state / "kafka", log=sys.stderr)
        finally:
            pg_thread.join()
            if "pg" in pg_box:
                db = pg_box["pg"]
                stack.services.append(Service("dispatch-db", f"postgresql://{db.user}@127.0.0.1:{db.port}/"
                                              f"{settings['DISPATCH_DB_NAME']}", db.stop))
        stack.bootstrap = kafka.bootstrap_servers
        stack.services.insert(0, Service("kafka", kafka.bootstrap_servers, kafka.stop))
        if "error" in pg_box:
            raise StackError(f"the dispatch database did not start: {pg_box['error']}")
        db = pg_box["pg"]
        dbname = settings["DISPATCH_DB_NAME"]
        if not db.psql(f"SELECT 1 FROM pg_database WHERE datname = '{dbname}'").strip():
            db.psql(f"CREATE DATABASE {dbname}")
        db.psql((CONNECT_DIR / "dispatch-jobs.sql").read_text(encoding="utf-8"), dbname)
        stack.dispatch_dsn = db.dsn(dbname)
        ensure_topics(stack.bootstrap)
        say(f"kafka {stack.bootstrap} and the dispatch database up in {time.monotonic() - t0:.1f}s")

        connect = start_connect(stack.bootstrap, {
            "DISPATCH_DB_HOST": "127.0.0.1", "DISPATCH_DB_PORT": str(db.port), "DISPATCH_DB_NAME": dbname,
            "DISPATCH_DB_USER": settings["DISPATCH_DB_USER"], "DISPATCH_DB_PASSWORD": ""},
            [CONNECT_DIR / "dispatch-jobs.properties"], workdir=state / "connect", rest_port=ports["connect"],
            log=sys.stderr)
        stack.services.append(Service("connect", connect.rest_url, connect.stop, proc=connect.proc,
                                      log=connect.log_path))
        connect.wait_running("dispatch-jobs", timeout=timeout)
        say(f"kafka connect running debezium's dispatch-jobs connector ({time.monotonic() - t0:.1f}s)")

        base = {"KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap, "CONCORD_LOG_LEVEL": settings["CONCORD_LOG_LEVEL"],
                "CONCORD_APP_ID": settings["CONCORD_APP_ID"]}
        py = sys.executable
        started = [
            _spawn(stack, "relay", [py, "-m", "connectors.inbound.relay", "--source", "debezium",
                                    "--topics", settings["CONCORD_RELAY_TOPICS"],
                                    "--identity", str(state / "relay-identity.json"),
                                    "--metrics-port", str(ports["relay"])],
                   base, f"http://127.0.0.1:{ports['relay']}/metrics", f"http://127.0.0.1:{ports['relay']}/metrics"),
        ]
        for name in ("worker-1", "worker-2"):
            p = ports[name]
            argv = [py, "-m", "concord", "run", "--web-port", str(p), "--app-id", settings["CONCORD_APP_ID"],
                    "--log-level", settings["CONCORD_LOG_LEVEL"]]
            started.append(_spawn(stack, name, argv,
                                  {**base, "CONCORD_DATA_DIR": str(state / name), "CONCORD_WEB_HOST": "127.0.0.1",
                                   "CONCORD_ADVERTISED_URL": f"http://127.0.0.1:{p}",
                                   "CONCORD_OWNER_TOKENS": stack.secrets["CONCORD_OWNER_TOKENS"]},
                                  f"http://127.0.0.1:{p}", f"http://127.0.0.1:{p}/healthz"))
        p = ports["webhooks"]
        started.append(_spawn(stack, "webhooks", [py, "-m", "concord", "webhooks", "--host", "127.0.0.1", "--port",
                                                  str(p), "--identity", str(state / "identity.json"),
                                                  "--dedupe-file", str(state / "webhooks-dedupe")],
                              {**base, **{k: stack.secrets[k] for k in WEBHOOK_SECRETS}},
                              f"http://127.0.0.1:{p}/webhooks", f"http://127.0.0.1:{p}/healthz"))
        p = ports["adapters"]
        started.append(_spawn(stack, "adapters", [py, "-m", "concord", "adapters", "--target", "sandbox", "--db",
                                                  str(state / "sandbox.db"), "--app-id", settings["CONCORD_APP_ID"],
                                                  "--metrics-host", "127.0.0.1", "--metrics-port", str(p)],
                              base, f"http://127.0.0.1:{p}/metrics", f"http://127.0.0.1:{p}/metrics"))
        for svc in started:
            _healthy(svc, timeout)
        say(f"relay, two workers, webhook receiver and sandbox adapters healthy ({time.monotonic() - t0:.1f}s)")

        p = ports["prometheus"]
        config = state / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(ports, scrape_interval)), encoding="utf-8")
        _healthy(_spawn(stack, "prometheus", [prometheus, f"--config.file={config}",
                                              f"--storage.tsdb.path={state / 'prometheus'}",
                                              f"--web.listen-address=127.0.0.1:{p}", "--web.enable-lifecycle"],
                        {}, f"http://127.0.0.1:{p}", f"http://127.0.0.1:{p}/-/ready"), timeout)
        say(f"prometheus ready; the stack is up in {time.monotonic() - t0:.1f}s")
        return stack
    except BaseException:
        stack.stop()
        raise


def main(argv: list[str] | None = None) -> int:
    """``python -m concord.tools.stack`` (``make stack``)."""
    parser = argparse.ArgumentParser(
        prog="python -m concord.tools.stack",
        description="Run the durable deployment without Docker: Kafka, Kafka Connect with Debezium on a stand-in "
                    "dispatch database, the relay, two workers, the webhook receiver, the sandbox adapters and "
                    "Prometheus, from ops/stack/stack.env; prints their URLs once all are healthy; Ctrl-C stops.")
    parser.add_argument("--state-dir", type=Path, default=Path(".concord/stack"),
                        help="where the stack keeps its data between runs (default .concord/stack)")
    parser.add_argument("--fresh", action="store_true", help="remove the state directory first")
    parser.add_argument("--free-ports", action="store_true",
                        help="free loopback ports instead of the settings' (another stack, or a test, runs)")
    parser.add_argument("--scrape-interval", help="Prometheus scrape and evaluation interval (default: the "
                        "configuration's)")
    parser.add_argument("--ready-file", type=Path, help="write the URLs as JSON here once everything is healthy")
    args = parser.parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.state_dir, ignore_errors=True)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        stack = start_stack(args.state_dir.resolve(), free_ports=args.free_ports, scrape_interval=args.scrape_interval)
    except (ConcordError, KeyboardInterrupt) as exc:  # start_stack stopped what it had started
        print(f"stack: error: {exc}" if isinstance(exc, ConcordError) else "stack: interrupted", file=sys.stderr)
        return 1 if isinstance(exc, ConcordError) else 130
    try:
        width = max(len(s.name) for s in stack.services)
        print("\n".join(f"  {s.name:<{width}}  {s.url}" for s in stack.services), flush=True)
        print(f"  KAFKA_BOOTSTRAP_SERVERS={stack.bootstrap}; secrets and owner tokens in "
              f"{stack.state / 'secrets.env'}; logs in {stack.state / 'logs'}; Ctrl-C stops everything", flush=True)
        if args.ready_file:
            args.ready_file.write_text(json.dumps(stack.describe()), encoding="utf-8")
        while not stopping.wait(1.0):
            dead = stack.dead()
            if dead:
                print(f"stack: error: {', '.join(s.name for s in dead)} exited; see {stack.state / 'logs'}",
                      file=sys.stderr)
                return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave parts running
        say("stopping")
        stack.stop()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
