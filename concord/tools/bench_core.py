"""The processing core alone, in process on one core: events/s, and how it holds up as customers' histories grow.

``core_eps``: closed-won deals for customers with billing details, through guard, status table and rules.
``deep_ratio``: events/s for customers already holding ``deep`` records each, divided by events/s at ``shallow``.
"""

from __future__ import annotations

import gc
import time

from concord.contracts import events as ev
from concord.contracts import topics
from concord.runtime.harness import InProcess

NOW = 1_767_225_600_000


def _customer(cid: str) -> dict:
    return ev.change_event("customer", cid, 1, ev.customer(f"Customer {cid}", account=f"acct_{cid}"), cid, at=NOW)


def _deal(cid: str, n: int, stage: str = "closed_won") -> dict:
    return ev.change_event("deal", f"{cid}-d{n}", 1, ev.deal(stage, [ev.line("SVC-INSTALL", 1, 50_000)]), cid,
                           at=NOW + n)


# The clock the rates are taken with: wall time (what `make bench` reports); ``--cpu`` on the command line takes
# the process's CPU time instead, for figures that hold on a machine shared with other work.
CLOCK = {"now": time.perf_counter}


def _timed(h: InProcess, events: list[dict]) -> float:
    encoded = [(topics.changes_topic(e["source_system"], e["entity_type"]), e["entity_id"].encode(),
                h.codec.encode("change_event", e)) for e in events]
    clock = CLOCK["now"]
    gc.collect()  # the set-up's garbage is collected before, not during, the timed events (timeit keeps the
    # collector out of its timings too)
    start = clock()
    for topic, key, value in encoded:
        h.feed(topic, key, value)
    return len(encoded) / max(clock() - start, 1e-9)


def core_eps(n: int = 20_000) -> float:
    """Events/s of the in-process core on ``n`` closed-won deals over n/10 customers."""
    h = InProcess(now=NOW)
    customers = [f"core-c{i}" for i in range(max(1, n // 10))]
    for cid in customers:
        h.feed_event(_customer(cid))
    return _timed(h, [_deal(customers[i % len(customers)], i) for i in range(n)])


def eps_at_depth(depth: int, customers: int = 50, n: int = 500, repeat: int = 5) -> float:
    """Events/s for new deals of customers that already hold ``depth`` deals each: the best of ``repeat`` batches.

    The best, as timeit reports: a batch takes a tenth of a second, and on a shared machine one batch in a few
    is slowed by other work by up to half. Each batch adds ``n / customers`` deals per customer.
    """
    h = InProcess(now=NOW)
    names = [f"deep{depth}-c{i}" for i in range(customers)]
    for cid in names:
        h.feed_event(_customer(cid))
        for d in range(depth):
            h.feed_event(_deal(cid, d, "closed_lost"))
    held = depth
    rates = []
    for _ in range(repeat):
        rates.append(_timed(h, [_deal(names[i % customers], held + i // customers) for i in range(n)]))
        held += n // customers
    return max(rates)


def deep_ratio(deep: int = 1_000, shallow: int = 10) -> tuple[float, float, float]:
    """(ratio, eps at ``deep``, eps at ``shallow``)."""
    shallow_eps = eps_at_depth(shallow)
    deep_eps = eps_at_depth(deep)
    return deep_eps / shallow_eps, deep_eps, shallow_eps


def main(argv: list[str] | None = None) -> int:
    """``python -m concord.tools.bench_core``: the core part of `concord bench` alone (no broker)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m concord.tools.bench_core", description=__doc__)
    p.add_argument("--events", type=int, default=20_000, help="deal events for core_eps")
    p.add_argument("--deep", type=int, default=1_000, help="records each customer holds for the deep run")
    p.add_argument("--shallow", type=int, default=10, help="records each customer holds for the shallow run")
    p.add_argument("--cpu", action="store_true", help="rates from the process's CPU time, not wall time")
    args = p.parse_args(argv)
    if args.cpu:
        CLOCK["now"] = time.process_time
    core = core_eps(args.events)
    ratio, deep_eps, shallow_eps = deep_ratio(args.deep, args.shallow)
    print(f"core: core_eps={core:.0f} deep_ratio={ratio:.2f} deep_eps={deep_eps:.0f} shallow_eps={shallow_eps:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
