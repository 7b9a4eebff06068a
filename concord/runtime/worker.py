"""The faust worker: agents that move records between topics and tables and call concord.runtime.pipeline."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import sys
import threading
import types
import weakref
from collections.abc import Iterable
from typing import Any

import faust
from confluent_kafka import KafkaException
from confluent_kafka import Producer as RdProducer
from faust.streams import _current_event
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.utils import json as faust_json
from mode.services import WaitResults
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.exceptions import DecodeError
from concord.owners.desk import Desk, newer, table_record, wire_record
from concord.runtime import metrics
from concord.runtime.pipeline import Out, Pipeline, Record
from concord.runtime.reconciler import reconciler_for, tick_partitions
from concord.runtime.settings import Settings
from concord.runtime.web import register_views

log = logging.getLogger("concord.worker")

_FETCH_MAX_WAIT_MS = {"value": 20}
_create_worker_consumer = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer


def _create_worker_consumer_with_fetch_wait(self: Any, transport: Any) -> Any:
    consumer = _create_worker_consumer(self, transport)
    # faust hard-codes fetch_max_wait_ms=1500, which is the floor of every hop's latency on a quiet topic.
    consumer._fetch_max_wait_ms = _FETCH_MAX_WAIT_MS["value"]
    return consumer


faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer_with_fetch_wait

_wait_first = faust_aiokafka.Consumer.wait_first


@types.coroutine
def _resumed(coro: Any, yielded: Any) -> Any:
    """Go on running ``coro`` (already stepped once, and suspended on ``yielded``) inside a task."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # noqa: B036 - cancellation and errors go to the coroutine, as in a task
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _wait_first_stepping(self: Any, *coros: Any, timeout: Any = None) -> Any:
    """Faust's consumer hands every fetched message to the streams with ``wait_first(deliver, suspend_flow)``.

    That makes four tasks and an asyncio.wait per message (~8% of the worker's main thread in py-spy),
    although delivering almost never waits. So the delivery is stepped once first: when it completes
    without waiting it is done, and only a delivery that has to wait (a full stream buffer) runs as a
    task raced against the flow being suspended, as before.
    """
    first = coros[0] if coros else None
    if (timeout is not None or len(coros) != 2 or not isinstance(first, types.CoroutineType)
            or self._stopped.is_set() or self._crashed.is_set()):
        return await _wait_first(self, *coros, timeout=timeout)
    try:
        yielded = first.send(None)
    except StopIteration as stop:
        other = coros[1]
        if isinstance(other, types.CoroutineType):
            other.close()
        return WaitResults([first], [stop.value], False)
    return await _wait_first(self, asyncio.ensure_future(_resumed(first, yielded)), coros[1])


faust_aiokafka.Consumer.wait_first = _wait_first_stepping


_FREEZE_EVERY_S = 1.0
_FULL_GC_EVERY_S = 900.0
_FULL_GC = {"at": 0.0}


def _record(event: Any) -> Record:
    msg = event.message
    headers = dict(msg.headers or ())
    return Record(msg.topic, msg.partition, msg.offset, msg.key, msg.value, headers)


class _Delivery:
    """The acknowledgements of one batch of records: resolves ``future`` on the event loop when all are in."""

    __slots__ = ("loop", "future", "remaining", "lock", "error", "offsets")

    def __init__(self, loop: asyncio.AbstractEventLoop, remaining: int) -> None:
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.remaining = remaining
        self.lock = threading.Lock()
        self.error: Any = None
        self.offsets: dict[tuple[str, int], int] = {}  # changelog partition -> last offset written

    def __call__(self, err: Any, msg: Any) -> None:  # librdkafka's delivery report, on the poll thread
        with self.lock:
            if err is not None and self.error is None:
                self.error = err
            elif err is None and msg.topic().endswith("-changelog"):
                self.offsets[(msg.topic(), msg.partition())] = msg.offset()
            self.remaining -= 1
            if self.remaining != 0:
                return
        self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future.done():
            return
        if self.error is not None:
            self.future.set_exception(KafkaException(self.error))
        else:
            self.future.set_result(self.offsets)


class _Outputs:
    """Every record the agents produce goes through one librdkafka producer owned by the worker.

    Cheaper per record than faust's Topic/ProducerBuffer path (the C client batches and sends on its own
    thread); a batch's records are awaited together, so outputs are acknowledged before offsets are acked.
    ``murmur2_random`` puts a key on the same partition as faust/aiokafka's default partitioner.
    """

    def __init__(self, bootstrap: str, linger_ms: int) -> None:
        self.config = {"bootstrap.servers": bootstrap, "linger.ms": linger_ms, "acks": "all",
                       "partitioner": "murmur2_random", "enable.idempotence": True,
                       "queue.buffering.max.messages": 1_000_000, "log_level": 3}
        self._producer: RdProducer | None = None
        self._stopping = threading.Event()

    def _poll(self, producer: RdProducer) -> None:
        while not self._stopping.is_set():
            producer.poll(0.05)

    @property
    def producer(self) -> RdProducer:
        if self._producer is None:
            self._producer = RdProducer(self.config)
            threading.Thread(target=self._poll, args=(self._producer,), name="concord-producer", daemon=True).start()
        return self._producer

    def produce(self, records: list[tuple[str, bytes, bytes, Any, int | None]]) -> asyncio.Future:
        """Produce (topic, key, value, headers, partition) records; the future resolves when all are acknowledged."""
        loop = asyncio.get_running_loop()
        if not records:
            done = loop.create_future()
            done.set_result({})
            return done
        producer = self.producer
        delivery = _Delivery(loop, len(records))
        produce = producer.produce
        for topic, key, value, headers, partition in records:
            while True:
                try:
                    if partition is None:
                        produce(topic, value, key, headers=headers, on_delivery=delivery)
                    else:
                        produce(topic, value, key, partition, headers=headers, on_delivery=delivery)
                    break
                except BufferError:  # the local queue is full (1M records): wait for the poll thread to drain it
                    producer.poll(0.01)
        return delivery.future

    async def send(self, records: list[tuple[str, bytes, bytes, Any, int | None]]) -> dict[tuple[str, int], int]:
        """Produce records and return when the broker acknowledged all of them."""
        return await self.produce(records)

    def stop(self) -> None:
        self._stopping.set()
        if self._producer is not None:
            self._producer.flush(10)


async def _acked(stream: Any, table: Any, events: list[Any], delivery: asyncio.Future) -> None:
    """Wait until the broker acknowledged a batch's outputs, then ack its events (their offsets may be committed)."""
    written = await delivery
    for (topic, partition), offset in written.items():  # what faust's _on_changelog_sent records
        table.data.set_persisted_offset(TP(topic, partition), offset)
    for event in events:
        if event.ack():
            message = event.message
            stream._on_message_out(message.tp, message.offset, message)


def _changelog_value(value: Any) -> bytes:
    """A table value as faust's ``json`` value serializer writes it (so faust's recovery reads it back)."""
    data = faust_json.dumps(value)
    return data if isinstance(data, bytes) else data.encode()


class _as_if_from:  # noqa: N801 - used like a function in `with`
    """Make table writes go to the changelog partition of ``event`` (faust reads the current event)."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def __enter__(self) -> None:
        self.token = _current_event.set(weakref.ref(self.event))

    def __exit__(self, *exc: object) -> None:
        _current_event.reset(self.token)


def build_app(settings: Settings, pipeline: Pipeline | None = None) -> faust.App:
    """The faust app with Concord's topics, tables, agents, timer and web pages."""
    _FETCH_MAX_WAIT_MS["value"] = settings.fetch_max_wait_ms
    if pipeline is None:
        pipeline = default_pipeline(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{s}" for s in (settings.bootstrap_servers or "").split(",") if s],
        store=settings.store,
        datadir=str(settings.data_dir / settings.app_id),
        topic_partitions=topics.PARTITIONS,
        topic_disable_leader=True,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_s / 6),
        broker_rebalance_timeout=max(settings.session_timeout_s * 2, 10),
        producer_linger_ms=settings.producer_linger_ms,
        broker_commit_every=settings.batch_size,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_enabled=True,
        web_in_thread=False,
        canonical_url=settings.advertised_url or f"http://{settings.web_host}:{settings.web_port}",
        value_serializer="raw",
        key_serializer="raw",
        consumer_auto_offset_reset="earliest",
    )
    app.pipeline = pipeline  # type: ignore[attr-defined]
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    changes = app.topic(*(t.name for t in topics.CHANGES), topics.GUARD_CONTROLS.name, **raw)
    accepted = app.topic(topics.ACCEPTED.name, topics.EXCEPTION_ACTIONS.name, topics.COMMAND_OUTCOMES.name, **raw)
    outcomes = app.topic(topics.COMMAND_OUTCOMES.name, **raw)
    actions = app.topic(topics.EXCEPTION_ACTIONS.name, **raw)
    raised = app.topic(*(t.name for t in topics.EXCEPTIONS), **raw)
    controls = app.topic(topics.GUARD_CONTROLS.name, **raw)
    # Raw keys, so faust's key -> partition routing matches the bytes the topics are keyed by.
    # Raw (bytes) keys: faust takes a table's key serializer from its key type, not from a Schema, and defaults
    # to json; with bytes the changelog is keyed like the input topics, recovery reads the keys back, and web
    # requests are routed by the same hash the producers used. Values are json.
    table_schema: dict[str, Any] = {"key_type": bytes}
    entity_to_cursor = app.Table("entity_to_cursor", default=None, partitions=topics.PARTITIONS,
                                 **table_schema)
    customer_to_status = app.Table("customer_to_status", default=None, partitions=topics.PARTITIONS,
                                   **table_schema)
    app.customer_to_status = customer_to_status  # type: ignore[attr-defined]
    exception_to_record = app.Table("exception_to_record", default=None, partitions=topics.PARTITIONS,
                                    **table_schema)
    app.exception_to_record = exception_to_record  # type: ignore[attr-defined]
    escalating: set[bytes] = set()  # escalated here and not yet seen back on an exceptions topic

    outputs = _Outputs(settings.bootstrap_servers or "localhost:9092", settings.producer_linger_ms)
    app.outputs = outputs  # type: ignore[attr-defined]

    @app.on_before_shutdown.connect
    async def stop_outputs(app: Any, **kwargs: Any) -> None:
        outputs.stop()

    async def send_all(outs: Iterable[Out]) -> None:
        # every output acknowledged before the batch's offsets are acked
        await outputs.send([(o.topic, o.key, o.value, list(o.headers) or None, None) for o in outs])

    async def run_batches(stream: Any, step: Any, table: Any) -> None:
        changelog = table.changelog_topic.get_topic_name()
        in_flight: asyncio.Future | None = None  # the previous batch: its outputs on their way to the broker
        try:
            async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
                for event in events:  # held: acked only once the batch's outputs are acknowledged (see _acked)
                    event.message.incref()
                view = _BatchView(table)
                records: list[tuple[str, bytes, bytes, Any, int | None]] = []
                for event in events:
                    view.current_event = event
                    for o in step(event, view):
                        records.append((o.topic, o.key, o.value, list(o.headers) or None, None))
                for k, (value, event) in view.touched.items():
                    with _as_if_from(event):  # the store keeps the key in the event's partition
                        table.data[k] = value
                    # one changelog write per key per batch, in the event's partition, as faust would write it
                    records.append((changelog, k, _changelog_value(value), None, event.message.partition))
                delivery = outputs.produce(records)
                if in_flight is not None:
                    await in_flight  # at most one batch in flight; batches are acked in order
                in_flight = asyncio.ensure_future(_acked(stream, table, events, delivery))
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()

    def guard_step(event: Any, view: _BatchView) -> list[Out]:
        rec = _record(event)
        if rec.topic == topics.GUARD_CONTROLS.name:
            _, control = pipeline.codec.decode(rec.value)
            if control["action"] == "tick":
                return pipeline.tick(rec.partition, view)
            if control["action"] == "release_gap" and control["guard_key"]:
                return pipeline.release(control["guard_key"].encode(), view)
            return []
        return pipeline.guard(rec, view)

    @app.agent(changes, name="order_changes")
    async def order_changes(stream: Any) -> None:
        """Decode, validate and order every change; forward applied events keyed by customer."""
        await run_batches(stream, guard_step, entity_to_cursor)

    @app.agent(accepted, name="decide_changes")
    async def decide_changes(stream: Any) -> None:
        """Apply accepted events to the customer status table and issue commands and exceptions."""
        await run_batches(stream, lambda event, view: loop.step(_record(event), view), customer_to_status)

    @app.agent(raised, name="track_exceptions")
    async def track_exceptions(stream: Any) -> None:
        """Keep every exception's latest state in exception_to_record; release billing holds when closed."""
        async for event in stream.events():
            msg = event.message
            try:
                _, rec = pipeline.codec.decode(msg.value)
            except DecodeError as exc:  # only Concord writes these topics: say so loudly, and go on
                log.error("exception record %s/%s/%s cannot be decoded: %s", msg.topic, msg.partition, msg.offset, exc)
                metrics.DEADLETTERS.labels(msg.topic, "decode").inc()
                continue
            old = exception_to_record.get(msg.key)
            if not newer(old, rec):
                continue
            exception_to_record[msg.key] = table_record(rec)
            if rec["state"] == "escalated":
                escalating.discard(msg.key)
            if old and old["state"] == "escalated" and rec["state"] in ("resolved", "discarded") and rec.get(
                    "blocks_billing"):
                await send_all([pipeline.billing_hold(rec, pipeline.clock(), hold=False)])

    @app.timer(interval=settings.sla_check_interval_s)
    async def escalate_overdue() -> None:
        """Escalate every exception held here whose SLA ran out unresolved."""
        now = pipeline.clock()
        for key, rec in list(exception_to_record.items()):
            if rec and rec["state"] in ("open", "acknowledged") and rec["sla_deadline"] <= now \
                    and key not in escalating:
                escalating.add(key)
                await send_all(pipeline.escalation(wire_record(rec), now))

    # The closed loop (concord/runtime/reconciler.py): outcomes, confirmations and the time-driven rules.
    loop = reconciler_for(settings, pipeline)

    @app.timer(interval=settings.reconcile_interval_s)
    async def reconcile_due() -> None:
        """Run the time-driven rules on every assigned partition; set the revenue-at-risk gauges."""
        await tick_partitions(app, loop, outcomes, exception_to_record, customer_to_status)

    @app.task
    async def run_canary() -> None:
        """Start the canary's thread (a synthetic closed-won deal every CONCORD_CANARY_INTERVAL_S seconds)."""
        if settings.canary_interval_s <= 0 or not settings.bootstrap_servers:
            return
        from concord.domain.flow_config import load_flow_config
        from concord.runtime.canary import Canary

        sku = next(s for s, item in sorted(load_flow_config().catalog.items()) if item.billable)
        canary = Canary(settings.bootstrap_servers, settings.app_id, sku, settings.canary_interval_s)
        canary.start()
        app.canary = canary  # type: ignore[attr-defined]

    @app.task
    async def learn_changelog_partitions() -> None:
        """Fetch the changelog topics' metadata into faust's producer, which routes web requests by key.

        faust maps a key to the worker that owns it through its own producer's metadata; the outputs and
        changelog records go through Concord's producer, so that metadata would otherwise never be fetched
        and /customers/{id} and /exceptions/{id} would fail to route.
        """
        producer = app.producer._ensure_producer()  # noqa: SLF001 - faust keeps the aiokafka producer here
        for table in (entity_to_cursor, customer_to_status, exception_to_record):
            await producer.partitions_for(table.changelog_topic.get_topic_name())

    @app.task
    async def quiet_libraries() -> None:
        """Raise the client libraries' log levels to the worker's.

        Their DEBUG calls on every produce request otherwise build a log record each time, only for the
        handler to drop it (6% of a busy worker's CPU).
        """
        level = max(logging.INFO, logging.getLevelName(settings.log_level.upper()))
        for name in ("aiokafka", "kafka", "faust", "mode"):
            logging.getLogger(name).setLevel(level)

    @app.timer(interval=_FREEZE_EVERY_S)
    async def freeze_heap() -> None:
        """Keep the tables' long-lived objects out of the cyclic garbage collector's full passes.

        Statuses and cursors are plain JSON trees (freed by reference counting, never cyclic), but the full
        collections that the growing tables trigger scan all of them: 50-290 ms pauses every few seconds in
        the bench (py-spy / gc.callbacks), the worst latencies at 1,000 events/s. So young garbage is collected
        and the survivors frozen every second; every _FULL_GC_EVERY_S everything is thawed and collected once,
        so that no cyclic garbage frozen by chance is kept for good.
        """
        now = asyncio.get_running_loop().time()
        if now - _FULL_GC["at"] >= _FULL_GC_EVERY_S:
            _FULL_GC["at"] = now
            gc.unfreeze()
            gc.collect()
        else:
            gc.collect(1)
        gc.freeze()

    @app.timer(interval=5.0)
    async def measure_lag() -> None:
        """concord_consumer_lag: records not yet consumed, per assigned input partition."""
        tps = [tp for tp in app.consumer.assignment() if not tp.topic.endswith("-changelog")]
        if not tps:
            return
        highs = await app.consumer.highwaters(*tps)
        for tp in tps:
            pos = await app.consumer.position(tp)
            if pos is not None and tp in highs:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highs[tp] - pos))

    @app.timer(interval=1.0)
    async def tick_guards() -> None:
        """Ask each guard partition to look for gaps that waited too long."""
        now = pipeline.clock()
        value = pipeline.codec.encode("control", {"action": "tick", "guard_key": None, "actor": None, "at": now})
        assigned = {tp.partition for tp in app.consumer.assignment() if tp.topic == topics.GUARD_CONTROLS.name}
        for p in sorted(assigned):
            await controls.send(key=b"", value=value, partition=p)

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"ok": True, "app_id": settings.app_id})

    @app.page("/customers/{customer_id}")
    @app.table_route(table=customer_to_status, match_info="customer_id")
    async def customer_status(web: Any, request: Any, customer_id: str) -> Any:
        status = customer_to_status.get(customer_id.encode())
        if status is None:
            return web.json({"error": f"no customer {customer_id!r}"}, status=404)
        return web.json(status)

    from concord.domain.flow_config import load_flow_config

    desk = Desk(app, settings.credentials(), load_flow_config(), customer_to_status, exception_to_record, actions,
                controls, pipeline)
    register_views(app, desk)
    return app


class _BatchView:
    """The table as one batch sees it: reads fall through to the table, writes wait for the batch's end."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.touched: dict[bytes, tuple[Any, Any]] = {}  # key -> (value, the event that last wrote it)
        self.current_event: Any = None

    def get(self, key: bytes, default: Any = None) -> Any:
        if key in self.touched:
            return self.touched[key][0]
        value = self.table.get(key)
        return default if value is None else value

    def __getitem__(self, key: bytes) -> Any:
        return self.get(key)

    def __setitem__(self, key: bytes, value: Any) -> None:
        self.touched[key] = (value, self.current_event)


def default_pipeline(settings: Settings) -> Pipeline:
    """The pipeline with the repository's flow configuration and routing."""
    from concord.domain import rules
    from concord.domain.flow_config import load_flow_config
    from concord.domain.routing import load_routing

    cfg = load_flow_config()
    routing = load_routing()
    return Pipeline(Codec(settings.schema_registry_url),
                    lambda status, event, now: rules.decide(status, event, cfg, now),
                    routing.route, gap_wait_ms=int(settings.gap_wait_s * 1000), parks=routing.parks,
                    act=lambda status, action, now: rules.act(status, action, cfg, now))


async def run_worker(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run one worker until cancelled (used by `concord run` and the demo)."""
    app = build_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True, redirect_stdouts=False,
                          override_logging=False, loop=asyncio.get_running_loop())
    await worker.start()
    try:
        await asyncio.Event().wait()
    finally:
        await worker.stop()


def _run(args: argparse.Namespace) -> int:
    from concord.runtime.broker import ensure_topics, open_broker

    settings = Settings.from_env(web_port=args.web_port, app_id=args.app_id, log_level=args.log_level)
    with open_broker() as broker:
        settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        created = ensure_topics(broker.bootstrap_servers)
        print(f"concord: {broker.kind} broker at {broker.bootstrap_servers}; created {len(created)} topics",
              file=sys.stderr)
        print(f"concord: metrics on http://{settings.web_host}:{settings.web_port}/metrics", file=sys.stderr)
        app = build_app(settings)
        # quiet: faust's terminal spinner turns on DEBUG records for every library log call
        worker = faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True)
        with contextlib.suppress(SystemExit):
            worker.execute_from_commandline()
    return 0


def _status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = f"{args.url.rstrip('/')}/customers/{args.customer_id}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            status = json.load(resp)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        print(f"concord status: {exc.code} from {url}: {body}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"concord status: cannot reach a worker at {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(render_status(status))
    return 0


def render_status(status: dict[str, Any]) -> str:
    """A customer's status as readable lines."""
    lines = [f"customer {status.get('customer_id', '?')}"]
    for name, value in sorted(status.items()):
        if name == "customer_id":
            continue
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            lines.append(f"  {name}:")
            for k, v in sorted(value.items()):
                stage = v.get("stage") or v.get("status") or ""
                lines.append(f"    {k}: {stage}".rstrip())
        else:
            lines.append(f"  {name}: {json.dumps(value, default=str)}")
    return "\n".join(lines)


def register(sub: Any) -> None:
    """Add `concord run` and `concord status`."""
    run = sub.add_parser("run", help="run a worker (KAFKA_BOOTSTRAP_SERVERS, else an embedded broker)",
                         description="Run a Concord worker. Against KAFKA_BOOTSTRAP_SERVERS when set; otherwise "
                         "start an embedded broker for the worker's lifetime. Serves /metrics, /healthz and "
                         "/customers/{id} on the web port.")
    run.add_argument("--web-port", type=int, help="HTTP port for /metrics and the API (default 6066)")
    run.add_argument("--app-id", help="consumer group / table prefix (default concord)")
    run.add_argument("--log-level", default=None, help="debug, info, warning (default info)")
    run.set_defaults(func=_run)
    st = sub.add_parser("status", help="print one customer's status from a running worker",
                        description="Ask a running worker for a customer's joined status; any worker answers, "
                        "routing the request to the one that owns the customer.")
    st.add_argument("customer_id")
    st.add_argument("--url", default="http://127.0.0.1:6066", help="a worker's web address")
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    st.set_defaults(func=_status)
