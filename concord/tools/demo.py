"""`concord demo`: broker, worker and a simulated month of business, then a reconciliation report."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from concord.contracts.topics import OWNERS
from concord.exceptions import ConcordError
from concord.owners.cli import call_api
from concord.runtime.broker import die_with_parent, ensure_topics, free_port, open_broker, read_ends, terminate

# Reasons the demo's owners fix by taking Concord's first suggestion (or, for a gap, releasing it).
FIXABLE = ("missing_billing_account", "unmapped_sku", "sequence_gap")


def say(msg: str) -> None:
    """Progress goes to stderr, so stdout carries only the report."""
    print(f"demo: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def worker_process(bootstrap: str, web_port: int, app_id: str, log_path: Path,
                   extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run `concord run` against ``bootstrap`` in a child process; stop it (and only it) on exit."""
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, **(extra_env or {}))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "concord.tools.cli", "run", "--web-port", str(web_port), "--app-id", app_id,
             "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        try:
            wait_for_http(f"http://127.0.0.1:{web_port}/healthz", proc, timeout=60)
            yield proc
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to its process group, then SIGKILL if it will not stop."""
    terminate(proc, timeout, group=True)


def wait_for_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> bytes:
    """Poll ``url`` until it answers 200; fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConcordError(f"worker exited with status {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.read()
        except OSError:
            time.sleep(0.2)
    raise ConcordError(f"{url} did not answer within {timeout:.0f}s")


def run_demo(args: argparse.Namespace) -> int:
    """Run the whole demo; returns 0 when every published record is accounted for."""
    from concord.tools.native import DEFAULT_STACK, STACKS

    if args.stack and not args.native:
        print("concord demo: error: --stack needs --native (the stacks are the vendors' own formats)", file=sys.stderr)
        return 2
    if args.stack and args.stack not in STACKS:
        print(f"concord demo: error: unknown stack {args.stack!r}; valid stacks: {', '.join(STACKS)}",
              file=sys.stderr)
        return 2
    stack = args.stack or DEFAULT_STACK
    started = time.monotonic()
    state_dir = Path(args.state_dir)
    with open_broker() as broker:
        say(f"{broker.kind} broker at {broker.bootstrap_servers}")
        ensure_topics(broker.bootstrap_servers)
        report = _demo_on(broker, args, stack, state_dir)
        # the run's producers and consumers are gone with _demo_on's frame: none is left retrying a stopped broker
        gc.collect()
        say(f"done in {time.monotonic() - started:.1f}s; worker stopped, stopping the broker")
    return 0 if report.unaccounted == 0 else 1


def _demo_on(broker: Any, args: argparse.Namespace, stack: str, state_dir: Path) -> Any:
    """The demo on a running broker: worker, simulated business, target systems, report; returns the report."""
    from concord.tools.report import collect, end_offsets, render, start_deployment_at_end, watched_topics
    from concord.tools.simulator import LOSSES, Simulator

    port = args.web_port or free_port()
    app_id = f"concord-demo-{int(time.time())}"
    tokens = {team: secrets.token_urlsafe(24) for team in OWNERS}  # this run's owner credentials only
    flows = demo_flows(state_dir, args.confirm_within)
    env = {"CONCORD_GAP_WAIT_S": str(args.gap_wait), "CONCORD_SLA_SCALE": str(args.sla_scale),
           "CONCORD_FLOWS": str(flows), "CONCORD_RECONCILE_INTERVAL_S": "1",
           "CONCORD_RECONCILE_DELAY_S": str(args.confirm_within),
           "CONCORD_OWNER_TOKENS": ",".join(f"{t}={k}" for t, k in tokens.items()),
           "CONCORD_DATA_DIR": str(state_dir / "state"),
           "CONCORD_CANARY_INTERVAL_S": "0"}  # the report is about the simulated business alone
    # this run's records only: its own internal topics, and on a shared broker a new group would otherwise replay
    # every earlier run's changes
    names = start_deployment_at_end(broker.bootstrap_servers, app_id)
    with worker_process(broker.bootstrap_servers, port, app_id, state_dir / "worker.log", env):
        say(f"worker up (metrics on http://127.0.0.1:{port}/metrics, log {state_dir / 'worker.log'})")
        sim = Simulator(customers=args.customers, days=args.days, seed=args.seed, faults=LOSSES)
        sim.history()  # fills sim.injected: the losses the target systems will show
        feed = None
        if args.native:
            from concord.tools.native import NativeFeed

            feed = NativeFeed(sim, stack)
            native = feed.records()  # fills feed.canonical: native ids -> the simulator's
        loop = TargetSystems(broker.bootstrap_servers, state_dir, app_id, sim, args.confirm_within,
                             canonical=feed.to_canonical if feed else None)
        connector = None
        if feed is not None:  # the vendors' formats, through the real inbound connectors and the fetcher
            from concord.tools.native import VendorFakes, ingest

            s = feed.stack
            say(f"simulating {args.customers} customers over {args.days} days as {stack}: {len(native)} native "
                f"records ({s.crm}, {s.dispatch}, Stripe API {s.stripe_version})")
            # the real ends (the embedded broker reports its last batch's start): not an earlier run's records
            since = read_ends(broker.bootstrap_servers, end_offsets(broker.bootstrap_servers,
                                                                   watched_topics(names, native=True)))
            with VendorFakes(feed.stack, state_dir / f"fakes-{app_id}") as vendors:
                say(f"loopback vendor APIs serve the fetches: {', '.join(vendors.readers)}")
                connector = ingest(broker.bootstrap_servers, native, names,
                                   progress=_progress("through the connectors"), vendors=vendors)
            published = connector.published
            sample = _sample_customer(published)
        else:
            records = list(sim.records())
            say(f"simulating {args.customers} customers over {args.days} days: {len(records)} records")
            since = read_ends(broker.bootstrap_servers, end_offsets(broker.bootstrap_servers, watched_topics(names)))
            published = sim.publish(broker.bootstrap_servers, records, progress=_progress("published"))
            sample = _sample_customer(records)
        try:
            report = collect(broker.bootstrap_servers, published, since, timeout=args.timeout,
                             settle=args.gap_wait + 3, progress=_progress("accounted"), connector=connector,
                             follow=loop.followed, until=loop.settled)
            fixed = resolve_sample(port, tokens, report, args.resolve)
            if fixed:
                say(f"resolved {len(fixed)} exceptions as their owners would (through the API); counting again")
                report = collect(broker.bootstrap_servers, published, since, timeout=args.timeout, settle=2,
                                 progress=_progress("recounted"), wait_for=set(fixed), connector=connector,
                                 follow=loop.followed, until=loop.settled)
                report.owner_resolved = fixed
        finally:
            loop.stop()
        report.injected = loop.injected()
        report.faulted_flows = {j: k for k in ("unbilled_job", "late_invoice") for j in sim.injected[k]}
        report.on_time_invoicing = _on_time(port)
        if sample:
            status = _status_of(port, sample)
            say(f"concord status {sample}: {status}")
        text = render(report)
        print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else text, flush=True)
        if args.serve:
            serve(broker.bootstrap_servers, port, tokens, state_dir)
    return report


def demo_flows(state_dir: Path, confirm_within: float) -> Path:
    """flows.yaml with every confirmation deadline ``confirm_within`` seconds, so the demo sees them pass."""
    import yaml

    from concord.domain.flow_config import DEFAULT_PATH

    flows = yaml.safe_load(DEFAULT_PATH.read_text())
    flows["confirm_within_s"] = {ctype: confirm_within for ctype in flows.get("confirm_within_s") or {}}
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "flows.yaml"
    path.write_text(yaml.safe_dump(flows, sort_keys=False))
    return path


class TargetSystems:
    """The sandbox adapter as the target systems, losing what the simulator injects, echoing the CRM's feed."""

    def __init__(self, bootstrap: str, state_dir: Path, app_id: str, sim: Any, confirm_within: float,
                 canonical: Any = None) -> None:
        from concord.contracts.topics import TARGET_SYSTEMS, Deployment
        from concord.domain.flow_config import load_flow_config
        from concord.tools.simulator import Echoes, LossyTarget
        from connectors.outbound.consumer import Adapter

        self.sim = sim
        self.followed = frozenset(load_flow_config().confirm_within_s)
        self.db = state_dir / f"sandbox-{app_id}.db"  # fresh each run: the same seed issues the same command ids
        self.echoes = Echoes(bootstrap)
        self.log = open(state_dir / "adapters.log", "a")  # noqa: SIM115 - closed in stop()
        # SQLite connections stay in the thread that opened them: the target is made in the adapter's thread
        self.target = LossyTarget.__new__(LossyTarget)
        self.target.late, self.target.dropped = [], []
        made = threading.Event()

        from concord.contracts.topics import COMMANDS
        from concord.tools.report import start_group_at_end

        # the target systems apply this run's commands only, not what an earlier run left on a shared broker
        start_group_at_end(bootstrap, f"{app_id}-adapters", [t.name for t in COMMANDS])

        def run() -> None:
            self.target = LossyTarget(self.db, self.echoes, set(sim.injected["lost_invoice"]), seed=sim.seed,
                                      late_s=confirm_within * 1.5 + 2, canonical=canonical)
            self.adapter = Adapter(bootstrap, self.target, list(TARGET_SYSTEMS), Deployment(app_id),
                                   group=f"{app_id}-adapters", log=self.log)
            made.set()
            self.adapter.run()

        self.thread = threading.Thread(target=run, name="concord-demo-adapters", daemon=True)
        self.thread.start()
        if not made.wait(30):
            raise ConcordError("the demo's target systems did not start")

    def settled(self, report: Any) -> bool:
        """Every followed command confirmed or raised, and every late echo sent and seen confirmed."""
        if self.echoes.pending:
            return False
        for cid, cmd in report.followed.items():
            if cid in report.confirmed or report.loss_found("command", cid):
                continue
            if cmd["type"] == "create_invoice" and cmd["entity_type"] == "job" and report.loss_found(
                    "unbilled_job", cmd["entity_id"]):
                continue
            return False
        return all(cid in report.confirmed for cid in self.target.late)

    def injected(self) -> dict[str, list[str]]:
        """The losses put in, by kind: command ids for lost commands, invoice and job ids for the others."""
        from concord.domain.ids import command_id

        lost = [command_id("create_invoice", "billing", "deal", d) for d in self.sim.injected["lost_invoice"]]
        late = set(self.target.late)
        return {"lost_invoice": [c for c in lost if c in set(self.target.dropped)],
                "crm_dropped": sorted(set(self.target.dropped) - set(lost)), "crm_late": sorted(late),
                "amount_changed": list(self.sim.injected["amount_changed"]),
                "unbilled_job": list(self.sim.injected["unbilled_job"])}

    def stop(self) -> None:
        """Stop the adapter and the echoes; remove this run's sandbox database."""
        self.adapter.stop()
        self.thread.join(20)
        self.echoes.close()
        self.log.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.db}{suffix}").unlink(missing_ok=True)


def _on_time(port: int) -> float | None:
    """On-time invoicing as the worker counted it (concord_invoices_total), or None before any invoice."""
    try:
        text = wait_for_http(f"http://127.0.0.1:{port}/metrics", timeout=10).decode()
    except ConcordError:
        return None
    counts = {"true": 0.0, "false": 0.0}
    for line in text.splitlines():
        if line.startswith("concord_invoices_total{"):
            label = line.split('on_time="', 1)[1].split('"', 1)[0]
            counts[label] = counts.get(label, 0.0) + float(line.rsplit(" ", 1)[1])
    total = counts["true"] + counts["false"]
    return round(counts["true"] / total, 3) if total else None


def serve(bootstrap: str, port: int, tokens: dict[str, str], state_dir: Path) -> None:
    """Keep the broker and worker up, start the sandbox adapters, and print how to sign in; until Ctrl-C."""
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap)
    log_path = state_dir / "adapters.log"
    with open(log_path, "ab") as log:
        adapters = subprocess.Popen(
            [sys.executable, "-m", "concord.tools.cli", "adapters", "--target", "sandbox", "--db",
             str(state_dir / "sandbox.db")], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent)
    try:
        width = max(len(t) for t in tokens)
        lines = [f"serving: the owners' inbox is at http://127.0.0.1:{port}/inbox (reconciliation "
                 f"/inbox/reconciliation, checklist /inbox/checklist)",
                 "sign in with the credential of a team (this run's only; they end with the demo):"]
        lines += [f"  {team:<{width}}  {token}" for team, token in sorted(tokens.items())]
        lines += [f"sandbox adapters apply the commands (log {log_path}); "
                  f"`concord checklist --url http://127.0.0.1:{port} --token <credential>` works too",
                  "press Ctrl-C to stop the adapters, the worker and the broker"]
        for line in lines:
            say(line)
        told = False
        while True:
            time.sleep(1)
            if adapters.poll() is not None and not told:
                told = True
                say(f"the sandbox adapters stopped (status {adapters.returncode}; see {log_path}); the inbox stays up")
    except KeyboardInterrupt:
        say("Ctrl-C: stopping")
    finally:
        stop_process(adapters)


def resolve_sample(port: int, tokens: dict[str, str], report: Any, per_reason: int) -> list[str]:
    """Act as the owners: resolve up to ``per_reason`` open exceptions of each fixable reason, taking suggestion 1."""
    picked: dict[str, int] = {}
    done = []
    for eid, life in sorted(report.lives.items()):
        if life["state"] not in ("open", "escalated") or life["reason"] not in FIXABLE:
            continue
        if picked.get(life["reason"], 0) >= per_reason:
            continue
        token = tokens[life["owner"]]
        try:
            rec = call_api(f"http://127.0.0.1:{port}", token, "GET", f"/exceptions/{eid}")
            if not rec.get("suggestions") and life["reason"] != "sequence_gap":
                continue
            query = {"customer": rec["customer_key"], "user": "demo"}
            if life["reason"] != "sequence_gap":
                query["choose"] = "1"
            call_api(f"http://127.0.0.1:{port}", token, "POST", f"/exceptions/{eid}/resolve", query)
        except ConcordError as exc:
            say(f"could not resolve {eid[:12]} ({life['reason']}): {exc}")
            continue
        picked[life["reason"]] = picked.get(life["reason"], 0) + 1
        done.append(eid)
    return done


def _progress(verb: str) -> Any:
    last = {"t": 0.0, "done": -1}

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done != last["done"] and (done == total or now - last["t"] >= 1.0):
            last.update(t=now, done=done)
            say(f"{verb} {done}/{total}")

    return report


def _sample_customer(records: list[Any]) -> str | None:
    for rec in records:
        cid = getattr(rec, "customer_id", None)
        if cid:
            return str(cid)
    return None


def _status_of(port: int, customer_id: str) -> str:
    try:
        body = wait_for_http(f"http://127.0.0.1:{port}/customers/{customer_id}", timeout=10)
    except ConcordError as exc:
        return f"unavailable ({exc})"
    status = json.loads(body)
    return ", ".join(f"{k}={len(v)}" for k, v in sorted(status.items()) if isinstance(v, dict | list))


def register(sub: Any) -> None:
    """Add `concord demo`."""
    p = sub.add_parser("demo", help="run a simulated business through Concord on an embedded broker",
                       description="Start a broker (embedded unless KAFKA_BOOTSTRAP_SERVERS is set) and a worker, "
                       "publish a simulated month of CRM, dispatch and billing changes with injected faults, "
                       "then print a reconciliation report counted from what came out of the broker. "
                       "Exit status 0 when every published record is accounted for.")
    p.add_argument("--customers", type=int, default=200, help="simulated customers (default 200)")
    p.add_argument("--days", type=int, default=30, help="simulated days (default 30)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.add_argument("--gap-wait", type=float, default=3.0,
                   help="seconds a sequence gap waits before its exception (default 3)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every record's outcome")
    p.add_argument("--sla-scale", type=float, default=1 / 3600,
                   help="multiply every SLA by this, so SLAs run out during the demo (default 1/3600: 4h -> 4s)")
    p.add_argument("--confirm-within", type=float, default=8.0,
                   help="seconds the target systems have to confirm a command in the demo (default 8; production "
                   "deadlines are in concord/config/flows.yaml)")
    p.add_argument("--resolve", type=int, default=3, help="exceptions per fixable reason the demo resolves "
                   "as their owner would (default 3)")
    p.add_argument("--web-port", type=int, default=0, help="worker web port (default: a free one)")
    p.add_argument("--state-dir", default=".concord/demo", help="where the worker log goes")
    p.add_argument("--native", action="store_true",
                   help="the simulator speaks the vendors' formats (Salesforce Change Data Capture, Debezium, Stripe "
                   "events), fed through the inbound connectors as `concord ingest` does; the report accounts for "
                   "every native record at the connector and every canonical event it published at the worker")
    p.add_argument("--stack", default=None, metavar="NAME",
                   help="with --native: which vendors play CRM, dispatch and billing: salesforce-debezium-stripe "
                   "(default), salesforce-jobber-stripe (Stripe's current API version, thin events, id-only Jobber "
                   "webhooks) or hubspot-debezium-stripe (a 2024 Stripe API version); notifications without "
                   "their record are fetched from loopback fakes of the vendors' APIs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--serve", action="store_true",
                   help="after the report, keep the broker and worker running, start the sandbox adapters and print "
                   "the owners' inbox address with a credential for each team, until Ctrl-C")
    p.set_defaults(func=run_demo)
