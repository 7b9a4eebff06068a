"""`concord demo` as a user runs it: a small business end to end, and Ctrl-C leaving nothing behind."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.broker


def _pids(pattern: str, parent: int | None = None) -> set[str]:
    """Processes whose command line matches ``pattern`` (children of ``parent`` only, when given)."""
    out = subprocess.run(["pgrep", *(["-P", str(parent)] if parent else []), "-f", pattern],
                         capture_output=True, text=True).stdout
    return set(out.split())


def test_small_demo_accounts_for_every_record(broker, tmp_path):
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers)
    out = subprocess.run([sys.executable, "-m", "concord", "demo", "--customers", "30", "--days", "10",
                          "--state-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.rstrip().endswith("unaccounted: 0")
    assert "create_invoice" in out.stdout and "dead_lettered" in out.stdout
    assert "demo: published" in out.stderr and "demo: accounted" in out.stderr  # progress goes to stderr
    loop = re.search(r"^closed loop: issued=(\d+) applied=(\d+) confirmed=(\d+) unconfirmed=(\d+) "
                     r"injected_losses_found=(\d+)/(\d+)$", out.stdout, re.M)
    assert loop, out.stdout[-2000:]
    issued, applied, confirmed, unconfirmed, found, injected = map(int, loop.groups())
    assert issued > 0 and applied == issued and confirmed + unconfirmed == issued and confirmed > 0
    assert found == injected, "every loss the target systems were made to lose is found"
    unbilled = re.search(r"^unbilled work: found=(\d+)/(\d+) amount=USD [\d,.]+$", out.stdout, re.M)
    assert unbilled and unbilled.group(1) == unbilled.group(2), out.stdout[-2000:]
    assert re.search(r"^kpi: exception_rate_per_1k=[\d.]+ mttr_s=\S+ manual_handoffs=\d+ on_time_invoicing=\S+ "
                     r"replay_success=\S+ revenue_at_risk=USD [\d,.]+$", out.stdout, re.M), out.stdout[-2000:]


WORKER = "concord.tools.cli run"  # how the demo starts its worker


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_stops_its_broker_and_worker(tmp_path, sig):
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}  # its own embedded broker
    proc = subprocess.Popen([sys.executable, "-m", "concord", "demo", "--state-dir", str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tmp_path / "worker.log").exists():
        time.sleep(0.2)  # the broker is up and the worker starting
    while time.monotonic() < deadline and not _pids(WORKER, proc.pid):
        time.sleep(0.2)
    # the demo's own children: other tests (in parallel too) start brokers and workers of their own
    mine = _pids("tansu.*broker", proc.pid) | _pids(WORKER, proc.pid)
    assert len(mine) >= 2, "the demo should have started a broker and a worker"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    time.sleep(0.5)
    assert not (mine & (_pids("tansu.*broker") | _pids(WORKER))), "the demo's broker or worker outlived it"
