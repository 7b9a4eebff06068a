"""`concord bench`: raw client, a hand-written reference pipeline, and Concord, on the same data.

Prints events/s for each, p50/p99 publish-to-command latency at a steady rate, and one closing line:
``bench: concord_eps=N reference_eps=N raw_eps=N ratio_ref=R p50_ms=N p99_ms=N deep_ratio=R core_eps=N
two_workers_eps=N resume_s=N`` (targets: ratio_ref >= 0.25, p99_ms <= 150, deep_ratio >= 0.8,
core_eps >= 30,000, two_workers_eps >= 1.6 x concord_eps, resume_s <= 10 on the embedded broker).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.runtime.broker import ensure_topics, free_port, open_broker
from concord.runtime.producer import new_producer
from concord.tools import bench_receiver
from concord.tools.bench_audit import audit_line
from concord.tools.bench_inbox import inbox_line
from concord.tools.report import start_deployment_at_end


def say(msg: str) -> None:
    """Progress to stderr."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def generate(n_deals: int, run: str, occurred_at: int | None = None) -> tuple[list[tuple[str, bytes, bytes]],
                                                                                list[tuple[str, bytes, bytes]]]:
    """Customers with billing details, then ``n_deals`` deals closed-won with mapped SKUs (one command each)."""
    from concord.domain.flow_config import load_flow_config

    codec = Codec()
    skus = sorted(load_flow_config().catalog)[:3]
    customers = max(1, n_deals // 10)
    now = occurred_at or int(time.time() * 1000)
    setup = []
    for c in range(customers):
        cid = f"{run}-c{c}"
        rec = _event(f"{cid}-1", "crm", "customer", cid, cid, 1, now, {
            "name": f"Customer {c}", "email": f"billing@{cid}.example", "billing_account_id": f"acct_{cid}",
            "billing_terms": "net_30", "billing_policy": "on_close", "billing_address": "1 Main St",
            "external_ids": {}})
        setup.append((topics.changes_topic("crm", "customer"), cid.encode(), codec.encode("change_event", rec)))
    deals = []
    for d in range(n_deals):
        did, cid = f"{run}-d{d}", f"{run}-c{d % customers}"
        lines = [{"sku": skus[d % len(skus)], "description": "", "quantity": 1 + d % 3, "unit_price_cents": 10_000}]
        rec = _event(f"{did}-1", "crm", "deal", did, cid, 1, now, {
            "name": f"Deal {d}", "stage": "closed_won", "amount_cents": sum(ln["quantity"] * 10_000 for ln in lines),
            "currency": "USD", "lines": lines, "closed_at": now, "billing_status": None})
        deals.append((topics.changes_topic("crm", "deal"), did.encode(), codec.encode("change_event", rec)))
    return setup, deals


def _event(eid: str, system: str, entity: str, entity_id: str, cid: str, seq: int, now: int,
           payload: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": eid, "source_system": system, "source_vendor": "bench", "entity_type": entity,
            "entity_id": entity_id, "customer_id": cid, "seq": seq, "seq_contiguous": True, "op": "create",
            "occurred_at": now, "ingested_at": now, "trace_id": eid, "changed_fields": [], "payload": payload,
            "caused_by_command_id": None, "source_payload": None, "source_content_type": None}


def produce(bootstrap: str, records: list[tuple[str, bytes, bytes]], topic: str | None = None) -> None:
    """Publish records and wait for every acknowledgement."""
    p = new_producer(bootstrap)
    for i, (t, k, v) in enumerate(records):
        p.produce(topic or t, key=k, value=v)
        if i % 10_000 == 0:
            p.poll(0)
    p.flush(60)


async def raw_eps(bootstrap: str, topic: str, n: int) -> float:
    """How fast aiokafka (the client faust uses) alone consumes ``n`` records."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-raw-{uuid.uuid4().hex[:6]}",
                         auto_offset_reset="earliest", fetch_max_wait_ms=50, session_timeout_ms=6000)
    await c.start()
    got, start = 0, None
    try:
        while got < n:
            batch = await c.getmany(timeout_ms=500, max_records=5000)
            for msgs in batch.values():
                if start is None and msgs:
                    start = time.perf_counter()
                got += len(msgs)
    finally:
        await c.stop()
    return n / (time.perf_counter() - (start or time.perf_counter()))


async def reference_eps(bootstrap: str, topic: str, out_topic: str, n: int) -> float:
    """A minimal hand-written pipeline on aiokafka: consume, update a dict, produce one output per input."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-ref-{uuid.uuid4().hex[:6]}",
                         auto_offset_reset="earliest", fetch_max_wait_ms=50, session_timeout_ms=6000,
                         enable_auto_commit=False)
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await c.start()
    await p.start()
    state: dict[bytes, int] = {}
    got, start = 0, None
    try:
        while got < n:
            batch = await c.getmany(timeout_ms=500, max_records=5000)
            futures = []
            for msgs in batch.values():
                if start is None and msgs:
                    start = time.perf_counter()
                for m in msgs:
                    state[m.key] = state.get(m.key, 0) + 1
                    futures.append(await p.send(out_topic, m.value, key=m.key))
                got += len(msgs)
            if futures:
                await asyncio.gather(*futures)
                await c.commit()
    finally:
        await c.stop()
        await p.stop()
    return n / (time.perf_counter() - (start or time.perf_counter()))


def wait_for_commands(bootstrap: str, n: int, timeout: float, since: dict[int, int],
                      latencies: list[float] | None = None, ctype: str = "create_invoice",
                      ready: threading.Event | None = None, customers: str = "") -> tuple[float, float]:
    """Read commands.billing from ``since`` until ``n`` of type ``ctype`` arrive; return (first, last) arrival times.

    ``customers``, when given, is the prefix of the customer ids counted (others are another run's commands).

    ``ready`` is set once the consumer is reading, so that a caller can start publishing only then.
    """
    codec = Codec()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    topic = topics.commands_topic("billing")
    c.assign([TopicPartition(topic, p, o) for p, o in since.items()])
    got, first, last = 0, 0.0, 0.0
    deadline = time.monotonic() + timeout
    try:
        while got < n and time.monotonic() < deadline:
            msgs = c.consume(1000, 0.05)
            if ready is not None:
                ready.set()
            for m in msgs:
                if m.error():
                    continue
                t = time.time()
                cmd = codec.decode(m.value())[1]
                if cmd["type"] != ctype or not (cmd.get("customer_id") or "").startswith(customers):
                    continue  # e.g. the customers' update_customer commands are not what is measured
                first = first or t
                last = t
                got += 1
                if latencies is not None:
                    latencies.append(t * 1000 - cmd["source_occurred_at"])
    finally:
        c.close()
    if got < n:
        raise RuntimeError(f"only {got}/{n} commands arrived within {timeout:.0f}s")
    return first, last


def watch_commands(bootstrap: str, n: int, timeout: float, latencies: list[float] | None = None,
                   ctype: str = "create_invoice", customers: str = "") -> Future:
    """Start reading commands.billing from its current end in a thread, before anything is published.

    Arrival times are taken as the commands arrive, not after the publishing is over (which would count the
    publishing time as latency). The future gives wait_for_commands' (first, last).
    """
    since = end_offsets(bootstrap, topics.commands_topic("billing"))
    ready = threading.Event()
    pool = ThreadPoolExecutor(1, thread_name_prefix="bench-watch")
    fut = pool.submit(wait_for_commands, bootstrap, n, timeout, since, latencies, ctype, ready, customers)
    pool.shutdown(wait=False)
    while not ready.wait(0.1):
        if fut.done():
            fut.result()  # raises what went wrong
    return fut


def measure_concord(bs: str, deals: list[tuple[str, bytes, bytes]], run: str, rate: float, seconds: float,
                    timeout: float) -> tuple[float, list[float]]:
    """Concord's events/s on ``deals``, then publish-to-command latencies at a steady ``rate`` (a worker running)."""
    watch = watch_commands(bs, len(deals), timeout)
    produce(bs, deals)
    first, last = watch.result()
    concord = len(deals) / max(last - first, 1e-6)
    say(f"concord full pipeline: {concord:,.0f} events/s ({len(deals)} commands in {last - first:.2f}s)")

    lat_setup, lat_deals = generate(int(rate * seconds), f"{run}l")
    watch = watch_commands(bs, len(lat_setup), timeout, ctype="update_customer")
    produce(bs, lat_setup)
    watch.result()  # the customers are applied before the timed deals
    latencies: list[float] = []
    watch = watch_commands(bs, len(lat_deals), timeout, latencies)
    p = new_producer(bs, **{"linger.ms": 0})
    codec = Codec()
    say(f"steady {rate:.0f} events/s for {seconds:.0f}s")
    start = time.perf_counter()
    for i, (t, k, v) in enumerate(lat_deals):
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        _, rec = codec.decode(v)
        rec["occurred_at"] = int(time.time() * 1000)  # publish time
        p.produce(t, key=k, value=codec.encode("change_event", rec))
        p.poll(0)
    p.flush(30)
    watch.result()
    return concord, latencies


def measure_two_workers(bs: str, run: str, n: int, timeout: float) -> float:
    """Events/s of two worker processes sharing the partitions, on ``n`` fresh deals."""
    from pathlib import Path

    from concord.tools.demo import worker_process

    setup, deals = generate(n, f"{run}w")
    app_id = f"concord-bench2-{run}"
    log = Path(".concord/bench")
    start_deployment_at_end(bs, app_id)  # not the earlier runs' records
    with worker_process(bs, free_port(), app_id, log / "pair-1.log"), \
            worker_process(bs, free_port(), app_id, log / "pair-2.log"):
        watch = watch_commands(bs, len(setup), timeout, ctype="update_customer")
        produce(bs, setup)
        watch.result()  # both members joined and the customers are applied
        watch = watch_commands(bs, len(deals), timeout)
        produce(bs, deals)
        first, last = watch.result()
    eps = len(deals) / max(last - first, 1e-6)
    say(f"two workers: {eps:,.0f} events/s ({len(deals)} commands in {last - first:.2f}s)")
    return eps


def measure_resume(bs: str, run: str, timeout: float) -> float:
    """Seconds from SIGKILL of a worker to its replacement issuing commands for deals published while it was down."""
    import os
    import signal
    from pathlib import Path

    from concord.tools.demo import worker_process

    app_id = f"concord-bench-resume-{run}"
    log = Path(".concord/bench")
    start_deployment_at_end(bs, app_id)
    setup, deals = generate(2_000, f"{run}r")
    with worker_process(bs, free_port(), app_id, log / "resume-1.log") as first:
        watch = watch_commands(bs, len(setup), timeout, ctype="update_customer")
        produce(bs, setup)
        watch.result()
        os.killpg(first.pid, signal.SIGKILL)
        killed_at = time.time()
        first.wait(30)
    watch = watch_commands(bs, 1, timeout, customers=f"{run}r-")  # this run's deals, not a command of the others
    produce(bs, deals)
    with worker_process(bs, free_port(), app_id, log / "resume-2.log"):
        first_at, _ = watch.result()
    resume = first_at - killed_at
    say(f"resume after SIGKILL: {resume:.1f}s to the replacement's first command")
    return resume


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The high watermark of each partition of ``topic``."""
    from concord.tools.report import end_offsets as ends

    return {partition: offset for (_, partition), offset in ends(bootstrap, [topic]).items()}


def run_bench(args: argparse.Namespace) -> int:
    """Run the three measurements and the latency test; print the closing line."""
    from concord.tools.demo import worker_process

    with open_broker() as broker:
        bs = broker.bootstrap_servers
        ensure_topics(bs)
        run = uuid.uuid4().hex[:6]
        raw_topic = topics.TopicSpec(f"bench.raw.{run}", "change_event", "entity_id", "bench input copy")
        ref_out = topics.TopicSpec(f"bench.out.{run}", "change_event", "entity_id", "bench reference output")
        ensure_topics(bs, [raw_topic, ref_out])
        setup, deals = generate(args.events, run)
        say(f"{broker.kind} broker at {bs}; {len(deals)} deal events + {len(setup)} customers")
        produce(bs, deals, raw_topic.name)
        raw = asyncio.run(raw_eps(bs, raw_topic.name, len(deals)))
        say(f"raw aiokafka consume: {raw:,.0f} events/s")
        ref = asyncio.run(reference_eps(bs, raw_topic.name, ref_out.name, len(deals)))
        say(f"reference pipeline (consume, dict update, produce): {ref:,.0f} events/s")

        produce(bs, setup)
        port = free_port()
        from pathlib import Path

        with worker_process(bs, port, f"concord-bench-{run}", Path(".concord/bench/worker.log")):
            concord, latencies = measure_concord(bs, deals, run, args.rate, args.seconds, args.timeout)
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        say(f"publish-to-command latency at {args.rate:.0f}/s: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
        two = measure_two_workers(bs, run, args.events, args.timeout)
        resume = measure_resume(bs, run, args.timeout)
        bench_receiver.report(bs)
    from concord.tools.bench_core import core_eps, deep_ratio

    core = core_eps()
    say(f"processing core in process: {core:,.0f} events/s")
    deep, deep_eps, shallow_eps = deep_ratio()
    say(f"customers holding 1,000 records: {deep_eps:,.0f} events/s; holding 10: {shallow_eps:,.0f} events/s")
    print(f"bench: concord_eps={concord:.0f} reference_eps={ref:.0f} raw_eps={raw:.0f} "
          f"ratio_ref={concord / ref:.2f} p50_ms={p50:.0f} p99_ms={p99:.0f} deep_ratio={deep:.2f} "
          f"core_eps={core:.0f} two_workers_eps={two:.0f} resume_s={resume:.1f}")
    print(audit_line())
    print(inbox_line())
    return 0


def register(sub: Any) -> None:
    """Add `concord bench`."""
    p = sub.add_parser("bench", help="measure throughput and latency on the embedded broker",
                       description="Measure, on the same generated data: the raw aiokafka consume rate, a "
                       "hand-written reference pipeline, and Concord's full pipeline; then publish-to-command "
                       "latency at a steady rate. Ends with one `bench:` line.")
    p.add_argument("--events", type=int, default=20_000, help="deal events for the throughput runs")
    p.add_argument("--rate", type=float, default=1000.0, help="events/s for the latency run")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for outputs")
    p.set_defaults(func=run_bench)
