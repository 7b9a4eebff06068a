"""The faust worker: agents that move records between topics and tables and call concord.runtime.pipeline."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from concord.contracts import topics
from concord.contracts.codec import Codec
from concord.exceptions import ConfigError
from concord.owners.desk import Desk
from concord.runtime import faust_shims, metrics
from concord.runtime.indexes import TableIndex, open_exception, parked_in_cursor, parked_in_status
from concord.runtime.offsets import PROCESS, SEEK, OffsetLedger
from concord.runtime.pipeline import Escalations, Out, Pipeline, Record
from concord.runtime.producer import Outgoing, Outputs
from concord.runtime.reconciler import is_index_key, reconciler_for, tick_partitions
from concord.runtime.settings import Settings
from concord.runtime.web import register_views

log = logging.getLogger("concord.worker")

_FREEZE_EVERY_S = 1.0
_IDLE_RESEEK_S = 10.0
_FULL_GC_EVERY_S = 900.0
_FULL_GC = {"at": 0.0}


def _record(event: Any) -> Record:
    msg = event.message
    headers = dict(msg.headers or ())
    return Record(msg.topic, msg.partition, msg.offset, msg.key, msg.value, headers)


def _fatal(what: str, exc: BaseException) -> None:
    """An infrastructure failure in a stage: stop the process at once, committing nothing more.

    Outputs are acknowledged before offsets are committed, so every record not yet committed is processed
    again by the worker that takes over (at-least-once; decisions are idempotent).
    """
    log.critical("%s failed; exiting without committing: %r", what, exc, exc_info=exc)
    logging.shutdown()
    os._exit(70)


def build_app(settings: Settings, pipeline: Pipeline | None = None) -> faust.App:
    """The faust app with Concord's topics, tables, agents, timers and web pages."""
    if pipeline is None:
        pipeline = default_pipeline(settings)
    names = pipeline.names
    if names.app_id != settings.app_id:
        raise ConfigError(f"the pipeline writes the topics of app id {names.app_id!r}, the worker is "
                          f"{settings.app_id!r}")
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
        # The check compares the changelog offsets this worker wrote with the broker's end offset, which the
        # embedded broker reports as its last batch's base + 1: a live worker crashed at the next rebalance.
        # Recovery then reads from the persisted offset to the end it is told, which is what it needs.
        recovery_consistency_check=False,
    )
    ledger = OffsetLedger()
    faust_shims.apply(app, ledger=ledger, fetch_max_wait_ms=settings.fetch_max_wait_ms,
                      bootstrap=settings.bootstrap_servers)
    app.pipeline = pipeline  # type: ignore[attr-defined]
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    changes = app.topic(*(t.name for t in topics.CHANGES), names.guard_controls, **raw)
    accepted = app.topic(names.accepted, names.exception_actions, topics.COMMAND_OUTCOMES.name, **raw)
    outcomes = app.topic(topics.COMMAND_OUTCOMES.name, **raw)
    raised = app.topic(*names.exception_queues, **raw)
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
    # What the gauges and timers need, derived from the tables and rebuilt from them after every rebalance.
    indexes = {entity_to_cursor: TableIndex(parked_in_cursor), customer_to_status: TableIndex(parked_in_status),
               exception_to_record: TableIndex(open_exception)}
    app.concord_indexes = indexes  # type: ignore[attr-defined]
    escalations = Escalations(pipeline)  # the SLA check: what it sent and has not yet seen back on a queue

    outputs = Outputs(settings.bootstrap_servers or "localhost:9092", settings.producer_linger_ms,
                      settings.max_record_bytes)
    app.outputs = outputs  # type: ignore[attr-defined]

    @app.on_partitions_revoked.connect
    async def forget_revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
        ledger.revoked(revoked)

    @app.on_partitions_assigned.connect
    async def hold_assigned(app: Any, assigned: Any, **kwargs: Any) -> None:
        ledger.assigned({tp for tp in assigned if not tp.topic.endswith("-changelog")})
        for index in indexes.values():
            index.clear()  # rebuilt from the recovered tables on the next gauge tick
        escalations.clear()

    async def reindex_recovered() -> None:
        for index in indexes.values():
            index.clear()  # a gauge tick may have indexed a half-recovered table: read the whole one again

    faust_shims.on_tables_recovered(app, reindex_recovered)

    @app.on_before_shutdown.connect
    async def stop_outputs(app: Any, **kwargs: Any) -> None:
        outputs.stop()

    async def send_all(outs: Iterable[Out]) -> None:
        await outputs.send([(o.topic, o.key, o.value, list(o.headers) or None, None) for o in outs])

    async def run_batches(stream: Any, step: Any, table: Any, stage: str) -> None:
        """Take batches, decide each record the ledger admits, write outputs and table changes, then commit."""
        changelog = table.changelog_topic.get_topic_name()
        index = indexes[table]
        loop = asyncio.get_running_loop()
        in_flight: asyncio.Future | None = None  # the previous batch: its outputs on their way to the broker
        seeking: set[asyncio.Future] = set()
        try:
            async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
                for event in events:  # held: acked only once the batch's outputs are acknowledged (see _acked)
                    event.message.incref()
                admitted: list[Any] = []
                seeks: dict[Any, int] = {}
                now = loop.time()
                for event in events:
                    msg = event.message
                    verdict = ledger.admit(msg.tp, msg.offset, now)
                    if verdict.action != PROCESS:
                        metrics.RECORDS_SKIPPED.labels(msg.topic, verdict.action).inc()
                        if verdict.action == SEEK:
                            log.warning("%s[%s]: %s; seeking back", msg.topic, msg.partition, verdict.reason)
                            seeks[msg.tp] = verdict.offset
                        continue
                    if verdict.reason:
                        log.error("%s[%s]: %s", msg.topic, msg.partition, verdict.reason)
                    admitted.append(event)
                processed = [event.message for event in admitted]
                view, outs, values = _decide_batch(pipeline, admitted, step, table)
                records: list[Outgoing] = [(o.topic, o.key, o.value, list(o.headers) or None, None) for o in outs]
                for k, (value, event) in view.touched.items():
                    with faust_shims.writing_as(event):  # the store keeps the key in the event's partition
                        table.data[k] = value
                    index.put(event.message.partition, k, value)
                    # one changelog write per key per batch, in the event's partition, as faust would write it
                    records.append((changelog, k, values[k], None, event.message.partition))
                delivery = outputs.produce(records)
                for tp, offset in seeks.items():
                    metrics.OFFSET_SEEKS.labels(tp.topic).inc()
                    # not awaited here: the consumer thread may be waiting for this stage to drain its buffer,
                    # and a seek waits for that thread; the stage goes on skipping until the records come again
                    seeking.add(asyncio.ensure_future(app.consumer.seek(tp, offset)))
                    seeking.difference_update({f for f in seeking if f.done()})
                if in_flight is not None:
                    await in_flight  # at most one batch in flight; batches are acked in order
                in_flight = asyncio.ensure_future(_acked(stream, table, events, processed, delivery, ledger))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a stage gives data errors back as dead letters: what escapes is infrastructure
            _fatal(f"stage {stage}", exc)
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()

    def guard_step(event: Any, view: _BatchView) -> list[Out]:
        return pipeline.guard(_record(event), view)  # guard.controls records go to Pipeline.control

    def track_step(event: Any, view: _BatchView) -> list[Out]:
        msg = event.message
        outs = pipeline.track(_record(event), view)
        escalations.tracked(msg.key, view.get(msg.key))
        return outs

    @app.agent(changes, name="order_changes")
    async def order_changes(stream: Any) -> None:
        """Decode, validate and order every change; forward applied events keyed by customer."""
        await run_batches(stream, guard_step, entity_to_cursor, "order_changes")

    @app.agent(accepted, name="decide_changes")
    async def decide_changes(stream: Any) -> None:
        """Apply accepted events to the customer status table and issue commands and exceptions."""
        await run_batches(stream, lambda event, view: closed_loop.step(_record(event), view), customer_to_status,
                          "decide_changes")

    @app.agent(raised, name="track_exceptions")
    async def track_exceptions(stream: Any) -> None:
        """Keep every exception's latest state in exception_to_record; release billing holds when closed."""
        await run_batches(stream, track_step, exception_to_record, "track_exceptions")

    @app.timer(interval=settings.sla_check_interval_s)
    async def escalate_overdue() -> None:
        """Escalate every exception held here whose SLA ran out unresolved."""
        active = faust_shims.active_partitions(app, exception_to_record)
        keys = indexes[exception_to_record].keys(active)
        for holds, escalated in escalations.due(exception_to_record, keys, pipeline.clock()):
            await send_all(holds)  # acknowledged first: a release the tracker sends for it comes after it
            await send_all(escalated)

    # The closed loop (concord/runtime/reconciler.py): outcomes, confirmations and the time-driven rules.
    closed_loop = reconciler_for(settings, pipeline)

    @app.timer(interval=settings.reconcile_interval_s)
    async def reconcile_due() -> None:
        """Run the time-driven rules on every assigned partition; set the revenue-at-risk gauges."""
        await tick_partitions(app, closed_loop, outcomes, exception_to_record, customer_to_status)

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

    # faust routes web requests by key; changelogs go through Concord's producer, so faust's knows none of them
    faust_shims.route_by_table_partitions(app, list(indexes))

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

    @app.timer(interval=1.0)
    async def give_up_stalled_seeks() -> None:
        """Partitions sought back to offsets the broker never serves go on from the first offset seen past them."""
        for tp, (missing, resume) in ledger.stalled(asyncio.get_running_loop().time()).items():
            log.error("%s[%s]: offsets %s..%s never arrived after seeking back; taken as holding no record",
                      tp.topic, tp.partition, missing, resume - 1)
            metrics.OFFSET_SEEKS.labels(tp.topic).inc()
            await app.consumer.seek(tp, resume)

    @app.timer(interval=settings.gauge_interval_s)
    async def measure_tables() -> None:
        """Gauges from table state on the partitions this worker holds, so they equal what the queues show."""
        for table, index in indexes.items():
            active = faust_shims.active_partitions(app, table)
            if not index.built(active):
                index.rebuild(active, ((_partition_of(table, k, v), k, v) for k, v in table.items()))
        pipeline.gapped = indexes[entity_to_cursor].keys_by_partition()
        metrics.PARKED.set(sum(indexes[t].total(faust_shims.active_partitions(app, t)).get("parked", 0)
                               for t in (entity_to_cursor, customer_to_status)))
        opened = indexes[exception_to_record].total(faust_shims.active_partitions(app, exception_to_record))
        metrics.EXCEPTIONS_OPEN.clear()
        for (owner, reason), n in opened.items():
            metrics.EXCEPTIONS_OPEN.labels(owner, reason).set(n)

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
        # a partition with records past its next offset that delivered nothing for a while is sought again
        for tp, offset in ledger.idle(dict(highs), asyncio.get_running_loop().time(), _IDLE_RESEEK_S).items():
            log.warning("%s[%s]: records wait past offset %s but none came for %.0fs; seeking there again",
                        tp.topic, tp.partition, offset, _IDLE_RESEEK_S)
            metrics.OFFSET_SEEKS.labels(tp.topic).inc()
            await app.consumer.seek(tp, offset)

    @app.timer(interval=1.0)
    async def tick_guards() -> None:
        """Ask each guard partition to look for gaps that waited too long."""
        now = pipeline.clock()
        value = pipeline.codec.encode("control", {"action": "tick", "guard_key": None, "actor": None, "at": now})
        assigned = {tp.partition for tp in app.consumer.assignment() if tp.topic == names.guard_controls}
        await outputs.send([(names.guard_controls, b"", value, None, p) for p in sorted(assigned)])

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    from concord.domain.governance import running_digest
    from concord.domain.routing import load_routing

    metrics.CONFIG_INFO.labels(running_digest()).set(1)
    metrics.publish_slas(load_routing())

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"ok": True, "app_id": settings.app_id, "config_digest": running_digest()})

    @app.page("/customers/{customer_id}")
    @app.table_route(table=customer_to_status, match_info="customer_id")
    async def customer_status(web: Any, request: Any, customer_id: str) -> Any:
        status = customer_to_status.get(customer_id.encode())
        if status is None:
            return web.json({"error": f"no customer {customer_id!r}"}, status=404)
        return web.json(status)

    from concord.domain.flow_config import load_flow_config

    desk = Desk(app, settings.credentials(), load_flow_config(), customer_to_status, exception_to_record,
                pipeline)
    desk.publish = send_all  # the owners' actions go through the worker's one producer
    register_views(app, desk)
    return app


def _partition_of(table: Any, key: bytes, value: Any) -> int:
    """The partition a table key lives in: the one its input record came from."""
    if table.name == "entity_to_cursor" and isinstance(value, dict) and "p" in value:
        return int(value["p"])  # keyed by (source, entity, id) but partitioned by the changes topic's key
    return faust_shims.partition_of(table, key)


async def _acked(stream: Any, table: Any, events: list[Any], processed: list[Any], delivery: asyncio.Future,
                 ledger: OffsetLedger) -> None:
    """Wait until the broker acknowledged a batch's outputs, then mark its records decided in the ledger."""
    written = await delivery
    faust_shims.persisted(table, written)
    for msg in processed:
        ledger.done(msg.tp, msg.offset)
    for event in events:
        faust_shims.ack(stream, event)


def _decide_batch(pipeline: Pipeline, events: list[Any], step: Any,
                  table: Any) -> tuple[_BatchView, list[Out], dict[bytes, bytes]]:
    """Run ``step`` on a batch's events: the batch's table view, its outputs, each written key's changelog value.

    A table value has to fit one changelog record, as an input record has to fit the broker. When one would not,
    the batch is decided again one record at a time, and each record whose writes would not fit is a dead letter
    that changes nothing: a customer whose status outgrew the limit cannot stop its partition (its records go on
    being dead-lettered, with their bytes, until an operator raises CONCORD_MAX_RECORD_BYTES with the broker's
    limit). The counters of the batch's first try are not taken back. A deadline index entry over the limit is
    no record's fault (it holds every customer due in its minute): that stops the stage, as before.
    """
    view = _BatchView(table)
    outs: list[Out] = []
    for event in events:
        view.current_event = event
        outs += step(event, view)
    values = {k: faust_shims.changelog_value(value) for k, (value, _) in view.touched.items()}
    limit = pipeline.max_record_bytes
    over = [k for k, v in values.items() if len(v) > limit]
    if not over:
        return view, outs, values
    shared = [k for k in over if is_index_key(k)]
    if shared:  # every customer due in that minute shares it: no record of them is at fault
        raise RuntimeError(f"deadline index entry {shared[0]!r} is {len(values[shared[0]])} bytes, over the "
                           f"{limit}-byte record limit: raise CONCORD_MAX_RECORD_BYTES with the broker's limits")
    log.error("a table value of this batch is over the %d-byte record limit; deciding it one record at a time",
              limit)
    batch = _BatchView(table)
    outs, values = [], {}
    for event in events:
        one = _BatchView(batch)
        one.current_event = event
        got = step(event, one)
        written = {k: faust_shims.changelog_value(value) for k, (value, _) in one.touched.items()}
        too_large = {k: len(v) for k, v in written.items() if len(v) > limit and not is_index_key(k)}
        if too_large:
            key, size = next(iter(too_large.items()))
            outs += pipeline.unkept(_record(event), key, size)
            continue
        batch.touched.update(one.touched)
        values.update(written)
        outs += got
    return batch, outs, values


class _BatchView:
    """The table as one batch sees it: reads fall through to the table, writes wait for the batch's end."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.touched: dict[bytes, tuple[Any, Any]] = {}  # key -> (value, the event that last wrote it)
        self.current_event: Any = None

    def owns(self, key: bytes) -> bool:
        """Whether the value of ``key`` is this view's own (written here), so that changing it changes no table."""
        return key in self.touched

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
    return Pipeline(Codec(settings.schema_registry_url), topics.Deployment(settings.app_id),
                    lambda status, event, now: rules.decide(status, event, cfg, now),
                    routing.route, gap_wait_ms=int(settings.gap_wait_s * 1000), parks=routing.parks,
                    act=lambda status, action, now: rules.act(status, action, cfg, now),
                    max_record_bytes=settings.max_record_bytes)


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
        created = ensure_topics(broker.bootstrap_servers, topics.Deployment(settings.app_id).topics)
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
    run.add_argument("--app-id", help="consumer group, table and internal-topic prefix (default concord)")
    run.add_argument("--log-level", default=None, help="debug, info, warning (default info)")
    run.set_defaults(func=_run)
    st = sub.add_parser("status", help="print one customer's status from a running worker",
                        description="Ask a running worker for a customer's joined status; any worker answers, "
                        "routing the request to the one that owns the customer.")
    st.add_argument("customer_id")
    st.add_argument("--url", default="http://127.0.0.1:6066", help="a worker's web address")
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    st.set_defaults(func=_status)
