"""`concord bench`'s receiver figure: ``/healthz`` latency while hostile signed bodies stream at ``concord webhooks``.

The receiver runs as its own process (as deployed); two senders POST signed hostile bodies back to back
(near-limit bodies full of long strings and wide arrays, deep nesting, enormous numbers, the campaign's
mutations) while a prober times ``GET /healthz``. Prints ``receiver: healthz_p99_ms=N bodies=N``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from concord.runtime.broker import free_port
from connectors.inbound import fuzz


@dataclass
class ReceiverFigures:
    """What one run measured."""

    healthz_ms: list[float]
    bodies: int
    statuses: dict[int, int]

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.healthz_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")

    def line(self) -> str:
        return f"receiver: healthz_p99_ms={self.p99_ms:.0f} bodies={self.bodies}"


def hostile_bodies(n: int, seed: int = 13) -> list[tuple[str, bytes]]:
    """``n`` (source, body) pairs: heavy near-limit bodies and the fuzz campaign's mutations, interleaved."""
    rng = random.Random(seed)
    stripe_seed = json.loads(fuzz.seeds("stripe")[0])
    heavy = [
        # just under the 900 KB record limit: many long strings, parsed and walked in full
        json.dumps({**stripe_seed, "data": {"object": {**stripe_seed["data"]["object"],
                                                       "metadata": {f"k{i}": "v" * 8_000 for i in range(100)}}}}),
        json.dumps({**stripe_seed, "pad": [[i, str(i)] for i in range(9_000)] * 8}),  # wide arrays
        json.dumps(stripe_seed).replace('"paid"', "[" * 60 + '"paid"' + "]" * 60, 1),  # deep, under the limit
        json.dumps({**stripe_seed, "created": "1.5e1000000", "amount": "9" * 400}),  # numbers once slow
    ]
    out: list[tuple[str, bytes]] = []
    sources = ["stripe", "hubspot", "salesforce", "jobber"]
    for i in range(n):
        if i % 4 == 0:
            out.append(("stripe", heavy[(i // 4) % len(heavy)].encode()))
        else:
            source = sources[i % len(sources)]
            out.append((source, fuzz.mutate(source, rng.choice(fuzz.seeds(source)), rng)))
    return out


def _get_ms(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        r.read()
    return (time.perf_counter() - start) * 1000


def measure(bootstrap: str, seconds: float = 15.0, senders: int = 2) -> ReceiverFigures:
    """Start ``concord webhooks`` on ``bootstrap``, stream hostile bodies for ``seconds``, time /healthz."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, **fuzz.SECRETS, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CONCORD_WEBHOOK_PUBLIC_URL": base}
    state = tempfile.mkdtemp(prefix="concord-bench-receiver-")
    proc = subprocess.Popen([sys.executable, "-m", "concord", "webhooks", "--port", str(port),
                             "--identity", str(Path(state) / "identity.json")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get_ms(base + "/healthz")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("concord webhooks did not start") from None
                time.sleep(0.2)
        bodies = hostile_bodies(400)
        sent, statuses, lock = [0], dict[int, int](), threading.Lock()
        stop = threading.Event()

        def send(offset: int) -> None:
            i = offset
            while not stop.is_set():
                source, body = bodies[i % len(bodies)]
                path = f"/webhooks/{source}"
                status, _ = fuzz.post(base + path, body, fuzz.sign(source, body, path, base))
                with lock:
                    sent[0] += 1
                    statuses[status] = statuses.get(status, 0) + 1
                i += senders

        threads = [threading.Thread(target=send, args=(k,), daemon=True) for k in range(senders)]
        for t in threads:
            t.start()
        latencies: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            latencies.append(_get_ms(base + "/healthz"))
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(90)
        return ReceiverFigures(latencies, sent[0], statuses)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(state, ignore_errors=True)


def report(bootstrap: str, seconds: float = 15.0) -> ReceiverFigures:
    """Measure and print the ``receiver:`` line (the status counts to stderr)."""
    figures = measure(bootstrap, seconds)
    print(f"bench: receiver answered {dict(sorted(figures.statuses.items()))} to {figures.bodies} hostile bodies; "
          f"{len(figures.healthz_ms)} /healthz probes", file=sys.stderr, flush=True)
    print(figures.line(), flush=True)
    return figures
