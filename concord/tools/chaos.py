"""Kill workers and adapters while a simulated business flows, then check nothing was lost or done twice.

The reference is the same records run through the same topology in process (concord.runtime.harness): by the
convergence property (tests/domain/test_properties.py) an uninterrupted run issues exactly its command ids and
ends in its statuses. `make chaos` runs a long campaign and prints
``chaos: kills=N lost=0 duplicate_effects=0 undecided=0 status_mismatch=0 max_resume_s=X``;
tests/runtime/test_chaos.py runs short ones.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.runtime.broker import die_with_parent, free_port
from concord.runtime.harness import InProcess
from concord.tools.demo import stop_process, wait_for_http
from concord.tools.report import end_offsets, start_deployment_at_end, start_group_at_end
from concord.tools.simulator import Simulator
from connectors.outbound.sandbox import applied_effects

# Faults whose outcome is the same whatever the timing; sequence gaps wait on a clock, so they are left out.
FAULTS = {"sequence_gap": 0.0}
WATCH = [topics.AUDIT.name, *(t.name for t in topics.COMMANDS)]


def settled(status: Any) -> dict[str, Any]:
    """What must agree between two runs of the same history: positions, stages, amounts and open exceptions."""
    if not isinstance(status, dict):
        return {}
    keep = ("stage", "position", "status", "billing_status", "amount_cents", "amount_due_cents", "won", "deleted")
    out: dict[str, Any] = {}
    for part in ("deals", "jobs", "invoices", "payments"):
        out[part] = {k: {f: v.get(f) for f in keep if f in v} for k, v in (status.get(part) or {}).items()}
    out["exceptions"] = sorted((status.get("exceptions") or {}).keys())
    out["parked"] = sum(len(q) for q in (status.get("parked") or {}).values())
    return out


def _differences(want: Any, got: Any, path: str = "") -> list[str]:
    """Where ``got`` differs from ``want``, as ``path: want -> got`` lines (dicts walked key by key)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out: list[str] = []
        for k in sorted(set(want) | set(got), key=str):
            out += _differences(want.get(k), got.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if want == got else [f"{path}: want {json.dumps(want)} got {json.dumps(got)}"]


@dataclass
class ChaosResult:
    """What a campaign did and found."""

    kills: int = 0
    kills_mid_flow: int = 0
    adapter_kills: int = 0
    inputs: int = 0
    expected_commands: int = 0
    lost: int = 0
    spurious: int = 0
    duplicate_effects: int = 0
    missing_effects: int = 0
    undecided: int = 0
    status_mismatch: int = 0
    crashed: int = 0  # workers found exited without being killed
    resume_s: list[float] = field(default_factory=list)

    @property
    def max_resume_s(self) -> float:
        """The longest time from a kill to the replacement deciding records again."""
        return max(self.resume_s, default=0.0)

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing undecided, nothing done twice, every status as in the reference."""
        return not (self.lost or self.spurious or self.duplicate_effects or self.missing_effects or self.undecided
                    or self.status_mismatch or self.crashed)

    def line(self) -> str:
        """The closing line `make chaos` prints."""
        return (f"chaos: kills={self.kills} lost={self.lost} duplicate_effects={self.duplicate_effects} "
                f"undecided={self.undecided} status_mismatch={self.status_mismatch} "
                f"max_resume_s={self.max_resume_s:.1f}")


class _Reader(threading.Thread):
    """Reads decisions and commands from ``since`` while the campaign runs."""

    def __init__(self, bootstrap: str, since: dict[tuple[str, int], int]) -> None:
        super().__init__(name="chaos-reader", daemon=True)
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"chaos-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
        self.consumer.assign([TopicPartition(t, p, o) for (t, p), o in since.items()])
        self.codec = Codec()
        self.lock = threading.Lock()
        self.decided: dict[tuple[str, int, int], float] = {}  # input coordinates -> first decision's timestamp
        self.last_decision_at = 0.0
        self.commands: dict[str, str | None] = {}  # command id -> its customer
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for m in self.consumer.consume(500, 0.2):
                    if m.error():
                        continue
                    _, rec = self.codec.decode(m.value())
                    ts = m.timestamp()[1] / 1000
                    with self.lock:
                        if m.topic() == topics.AUDIT.name:
                            self.decided.setdefault((rec["topic"], rec["partition"], rec["offset"]), ts)
                            self.last_decision_at = max(self.last_decision_at, ts)
                        elif m.topic().startswith("commands."):
                            self.commands[rec["command_id"]] = rec.get("customer_id")
        finally:
            self.consumer.close()


class Campaign:
    """One campaign: its business, its workers (restarted after each kill), an adapter, and the checks."""

    def __init__(self, bootstrap: str, state_dir: Path, *, customers: int, days: int, seed: int, workers: int,
                 say: Any = print) -> None:
        self.bootstrap, self.state_dir, self.say = bootstrap, state_dir, say
        self.app_id = f"concord-chaos-{uuid.uuid4().hex[:8]}"
        self.names = topics.Deployment(self.app_id)
        self.prefix = f"{uuid.uuid4().hex[:6]}-"
        self.sim = Simulator(customers=customers, days=days, seed=seed, prefix=self.prefix, faults=FAULTS)
        self.planned = list(self.sim.records())
        self.ports = [free_port() for _ in range(workers)]
        self.procs: list[subprocess.Popen | None] = [None] * workers
        self.adapter: subprocess.Popen | None = None
        self.db = state_dir / "sandbox.db"
        # The reference runs on the history's own clock, where no deadline has passed yet; the workers' time-driven
        # checks run on the wall clock, eleven months after this history, so a flow still on its way when its
        # customer is re-checked (a kill's pause is enough) is raised and closes itself only at the next check.
        # Those checks wait an hour here: the campaign compares what the event path decided.
        self.env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, CONCORD_DATA_DIR=str(state_dir / "data"),
                        CONCORD_CANARY_INTERVAL_S="0", CONCORD_RECONCILE_DELAY_S="3600")

    # ---- processes ---------------------------------------------------------------------------------
    def start_worker(self, i: int) -> None:
        log = open(self.state_dir / f"worker-{i}.log", "ab")  # noqa: SIM115 - the child keeps it
        env = dict(self.env, CONCORD_DATA_DIR=str(self.state_dir / f"data-{i}"))
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "concord.tools.cli", "run", "--web-port", str(self.ports[i]), "--app-id",
             self.app_id, "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        wait_for_http(f"http://127.0.0.1:{self.ports[i]}/healthz", self.procs[i], timeout=90)

    def start_adapter(self) -> None:
        self.adapter = start_sandbox_adapter(self.env, self.db, f"{self.app_id}-adapters",
                                             self.state_dir / "adapter.log", self.app_id)

    def kill(self, proc: subprocess.Popen, sig: int) -> None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop_all(self) -> None:
        for p in [*self.procs, self.adapter]:
            if p is not None:
                stop_process(p)

    # ---- the reference ---------------------------------------------------------------------------------
    def reference(self) -> InProcess:
        ref = InProcess(now=self.sim.start)
        for p in self.planned:
            ref.feed(p.topic, p.key, p.value)
        return ref

    # ---- the campaign ----------------------------------------------------------------------------------
    def run(self, kills: int, sig: int = signal.SIGKILL, adapter_kills: int = 1, rate: float = 200.0,
            timeout: float = 600.0) -> ChaosResult:
        """Publish at ``rate`` records/s while killing a worker ``kills`` times with ``sig``; then check."""
        from concord.runtime.broker import ensure_topics

        ensure_topics(self.bootstrap)
        result = ChaosResult(inputs=len(self.planned))
        since = end_offsets(self.bootstrap, WATCH)
        start_deployment_at_end(self.bootstrap, self.app_id)
        start_group_at_end(self.bootstrap, f"{self.app_id}-adapters", [t.name for t in topics.COMMANDS])
        reader = _Reader(self.bootstrap, since)
        reader.start()
        rng = random.Random(len(self.planned))
        for i in range(len(self.procs)):
            self.start_worker(i)
        self.start_adapter()
        published: list[Any] = []
        publisher = threading.Thread(target=lambda: published.extend(self._publish(rate)), daemon=True)
        publisher.start()
        try:
            adapter_every = max(1, kills // max(1, adapter_kills)) if adapter_kills else 0
            for k in range(kills):
                time.sleep(rng.uniform(1.0, 3.0))
                victim = k % len(self.procs)
                for i, proc in enumerate(self.procs):  # a rebalance must never take the other worker down
                    if proc is not None and proc.poll() is not None:
                        result.crashed += 1
                        self.say(f"chaos: worker {i} exited by itself with status {proc.returncode}")
                        self.start_worker(i)
                with reader.lock:
                    decided_before = len(reader.decided)
                mid_flow = decided_before < len(self.planned)
                killed_at = time.time()
                self.kill(self.procs[victim], sig)  # type: ignore[arg-type]
                result.kills += 1
                result.kills_mid_flow += mid_flow
                if adapter_every and k % adapter_every == 0 and result.adapter_kills < adapter_kills:
                    self.kill(self.adapter, signal.SIGKILL)  # type: ignore[arg-type]
                    result.adapter_kills += 1
                    self.start_adapter()
                self.start_worker(victim)
                resumed = self._wait_resumed(reader, killed_at, mid_flow, timeout=120)
                if resumed is not None:
                    result.resume_s.append(resumed)
                self.say(f"chaos: kill {k + 1}/{kills} ({signal.Signals(sig).name}, worker {victim}) "
                         f"{'mid-flow' if mid_flow else 'after the flow'}; decided so far {decided_before}; "
                         f"resumed in {resumed if resumed is None else round(resumed, 1)} s")
            publisher.join(timeout)
            coords = {(p.topic, p.partition, p.offset) for p in published}
            ref = self.reference()
            want = {c["command_id"] for c in ref.commands()}
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with reader.lock:
                    if coords <= set(reader.decided) and want <= set(reader.commands):
                        break
                time.sleep(0.5)
            result.crashed += sum(1 for proc in self.procs if proc is not None and proc.poll() is not None)
            time.sleep(2.0)  # let the adapter apply what was issued last
            with reader.lock:
                got = {c for c, customer in reader.commands.items()
                       if c in want or (customer or "").startswith(self.prefix)}
                result.undecided = len(coords - set(reader.decided))
            result.expected_commands = len(want)
            result.lost = len(want - got)
            result.spurious = len(got - want)
            result.status_mismatch = self._compare_statuses(ref)
            result.duplicate_effects, result.missing_effects = self._effects(want)
        finally:
            reader.stop.set()
            self.stop_all()
        return result

    def _publish(self, rate: float) -> list[Any]:
        out: list[Any] = []
        chunk = max(1, int(rate / 10))
        for i in range(0, len(self.planned), chunk):
            out += self.sim.publish(self.bootstrap, self.planned[i:i + chunk])
            time.sleep(0.1)
        return out

    def _wait_resumed(self, reader: _Reader, killed_at: float, mid_flow: bool, timeout: float) -> float | None:
        """Seconds from the kill to the first decision made after it (None if there was nothing left to do)."""
        if not mid_flow:
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with reader.lock:
                if reader.last_decision_at > killed_at + 0.5:  # produced after the killed worker was gone
                    return reader.last_decision_at - killed_at
                if len(reader.decided) >= len(self.planned):
                    return None
            time.sleep(0.1)
        return None

    def _compare_statuses(self, ref: InProcess) -> int:
        mismatched = 0
        for key, status in ref.statuses.items():
            if not key.startswith(self.prefix.encode()):
                continue
            got = _get_json(f"http://127.0.0.1:{self.ports[0]}/customers/{key.decode()}")
            if settled(got) != settled(status):
                mismatched += 1
                diff = "; ".join(_differences(settled(status), settled(got)))
                self.say(f"chaos: status of {key.decode()} differs: {diff}")
        return mismatched

    def _effects(self, want: set[str]) -> tuple[int, int]:
        """(command ids applied more than once, issued command ids never applied) in the sandbox."""
        deadline = time.monotonic() + 60
        while True:
            rows = applied_effects(self.db)
            applied = [r for r in rows if r in want]
            missing = want - set(applied)
            if not missing or time.monotonic() > deadline:
                return len(applied) - len(set(applied)), len(missing)
            time.sleep(0.5)


def start_sandbox_adapter(env: dict[str, str], db: Path, group: str, log_path: Path,
                          app_id: str) -> subprocess.Popen:
    """The sandbox adapter (one effect per command id, in ``db``) as its own process, in consumer group ``group``.

    It raises rejections on the exception queues of the deployment ``app_id``.
    """
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        [sys.executable, "-m", "concord.tools.cli", "adapters", "--target", "sandbox", "--db", str(db),
         "--group", group, "--app-id", app_id, "--session-timeout-ms", "6000"], env=env, stdout=log,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)
    except OSError:
        return None


def _chaos(args: argparse.Namespace) -> int:
    import tempfile

    from concord.runtime.broker import open_broker

    results = []
    with open_broker() as broker, tempfile.TemporaryDirectory(prefix="concord-chaos-") as tmp:
        plans = [("SIGKILL", signal.SIGKILL, 1, args.kills), ("SIGTERM", signal.SIGTERM, 1, max(2, args.kills // 3)),
                 ("two workers", signal.SIGKILL, 2, max(2, args.kills // 3))]
        for n, (name, sig, workers, kills) in enumerate(plans):
            print(f"chaos: {name}: {kills} kills, {workers} worker(s), {args.customers} customers", file=sys.stderr)
            state = Path(tmp) / f"run-{n}"
            state.mkdir()
            camp = Campaign(broker.bootstrap_servers, state, customers=args.customers, days=args.days,
                            seed=args.seed + n, workers=workers, say=lambda s: print(s, file=sys.stderr))
            r = camp.run(kills, sig, adapter_kills=2, rate=args.rate)
            print(f"chaos: {name}: {r.line()} inputs={r.inputs} commands={r.expected_commands} "
                  f"mid_flow={r.kills_mid_flow}/{r.kills} missing_effects={r.missing_effects} spurious={r.spurious}",
                  file=sys.stderr)
            results.append(r)
    total = ChaosResult(kills=sum(r.kills for r in results), lost=sum(r.lost for r in results),
                        duplicate_effects=sum(r.duplicate_effects for r in results),
                        undecided=sum(r.undecided for r in results),
                        status_mismatch=sum(r.status_mismatch for r in results),
                        resume_s=[s for r in results for s in r.resume_s])
    print(total.line())
    return 0 if all(r.ok for r in results) else 1


def register(sub: Any) -> None:
    """Add `concord chaos`."""
    p = sub.add_parser("chaos", help="kill workers and adapters under load and check nothing was lost",
                       description="Publish a simulated business while killing workers (SIGKILL, SIGTERM, and one "
                       "of two workers) and the sandbox adapter, then compare with the same records run in process: "
                       "every input decided, the same command ids, one effect per command id, the same statuses. "
                       "Exit status 0 when all agree, 1 otherwise.")
    p.add_argument("--kills", type=int, default=10, help="kills in the SIGKILL run (default 10)")
    p.add_argument("--customers", type=int, default=200, help="simulated customers (default 200)")
    p.add_argument("--days", type=int, default=30, help="simulated days (default 30)")
    p.add_argument("--rate", type=float, default=60.0, help="records published per second (default 60)")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=_chaos)
