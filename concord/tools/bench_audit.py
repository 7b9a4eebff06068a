"""The in-process replay benchmark: a generated history through guard, status table and rules, no broker.

``python -m concord.tools.bench_audit --events N`` replays N events (default 1,000,000) the way ``concord rules
diff`` does, on one core, and prints ``audit_eps=N audit_rss_mb=N``: events per second of CPU time and peak
resident memory. ``audit_line()`` runs it in a child process, so the memory is the replay's alone.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

DEFAULT_EVENTS = 1_000_000
START = 1_767_225_600_000  # 2026-01-01T00:00Z


def history(n: int, seed: int = 16, batch: int = 200) -> Iterator[dict[str, Any]]:
    """``n`` events of simulated months, generated batch by batch of customers (never all held at once)."""
    from concord.tools.simulator import business

    rng = random.Random(seed)
    sent, k = 0, 0
    while sent < n:
        for e in business(rng, batch, 30, START, prefix=f"b{k}-"):
            if sent >= n:
                return
            sent += 1
            yield e
        k += 1


def measure(n: int) -> tuple[float, float, int]:
    """(events/s, peak RSS in MB, commands issued) of replaying ``n`` generated events in this process."""
    from concord.domain.flow_config import load_flow_config
    from concord.domain.routing import load_routing
    from concord.tools.rules_diff import replay

    events = list(history(min(n, 50_000)))  # generation is not what is measured: replay a window over and over
    window = len(events)

    def stream() -> Iterator[dict[str, Any]]:
        for i in range(n):
            e = events[i % window]
            lap = i // window
            if lap:  # a fresh copy of the window per lap: new customers and entities, same shape
                e = {**e, "event_id": f"{lap}:{e['event_id']}", "entity_id": f"{lap}:{e['entity_id']}",
                     "customer_id": f"{lap}:{e['customer_id']}" if e["customer_id"] else None}
            yield e

    # CPU time of this process, not wall time: on a shared machine the wall clock measures the neighbours
    t0 = time.process_time()
    out = replay(stream(), load_flow_config(), load_routing(), now=START + 40 * 86_400_000)
    secs = time.process_time() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return out.events / secs, rss_mb, len(out.commands)


def audit_line(events: int | None = None) -> str:
    """Run the replay benchmark in a child process and return its ``audit_eps=N audit_rss_mb=N`` line."""
    n = events or int(os.environ.get("CONCORD_BENCH_AUDIT_EVENTS") or DEFAULT_EVENTS)
    done = subprocess.run([sys.executable, "-m", "concord.tools.bench_audit", "--events", str(n)],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    """Replay, then print the figures."""
    p = argparse.ArgumentParser(prog="python -m concord.tools.bench_audit", description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="events to replay (default 1,000,000)")
    args = p.parse_args(argv)
    eps, rss, commands = measure(args.events)
    print(f"bench: replayed {args.events} events in process, {commands} commands", file=sys.stderr)
    print(f"audit_eps={eps:.0f} audit_rss_mb={rss:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
