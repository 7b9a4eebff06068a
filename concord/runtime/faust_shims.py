"""Every change Concord makes to faust, mode and aiokafka behaviour, in one place, applied by ``apply(app)``.

Nothing here runs at import time: ``concord.runtime.worker.build_app`` calls ``apply`` on the app it builds,
and each shim reads its setting from that app, so an app built without it behaves as faust ships.
Each shim is pinned to the versions in ``TESTED`` (pyproject.toml pins the same ones), and
tests/runtime/test_faust_shims.py fails when the behaviour a shim relies on changes underneath.
"""

from __future__ import annotations

import asyncio
import types
import weakref
from collections.abc import Awaitable, Callable, Iterable
from importlib.metadata import version
from typing import Any

from aiokafka.partitioner import murmur2
from faust.streams import _current_event
from faust.tables.recovery import Recovery
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from faust.utils import json as faust_json
from mode.services import WaitResults

from concord.exceptions import ConfigError
from concord.runtime.offsets import OffsetLedger

TESTED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1"}

_ORIGINAL: dict[str, Any] = {}


def installed_versions() -> dict[str, str]:
    """The versions of the libraries the shims reach into."""
    return {name: version(name) for name in TESTED}


def apply(app: Any, *, ledger: OffsetLedger, fetch_max_wait_ms: int, bootstrap: str | None = None) -> None:
    """Make ``app`` commit only what ``ledger`` says was decided, and fetch with Concord's wait.

    ``bootstrap``: where the table recovery reads each changelog's real end (see ``_build_highwaters``).
    """
    found = installed_versions()
    if found != TESTED:
        raise ConfigError(f"the faust shims are tested on {TESTED}, not {found}: pin those versions")
    app.concord_ledger = ledger
    app.concord_fetch_max_wait_ms = fetch_max_wait_ms
    app.concord_bootstrap = bootstrap
    _install()


def _install() -> None:
    """Put the shims on the classes once; each defers to faust's own code for apps that were not shimmed."""
    if _ORIGINAL:
        return
    consumer_thread = faust_aiokafka.AIOKafkaConsumerThread
    transport = faust_consumer.Consumer
    _ORIGINAL["create_worker_consumer"] = consumer_thread._create_worker_consumer
    _ORIGINAL["new_offset"] = transport._new_offset
    _ORIGINAL["pending_acks"] = transport._filter_tps_with_pending_acks
    _ORIGINAL["seek_to_committed"] = faust_consumer.ThreadDelegateConsumer.seek_to_committed
    _ORIGINAL["wait_first"] = faust_aiokafka.Consumer.wait_first
    _ORIGINAL["build_highwaters"] = Recovery._build_highwaters
    Recovery._build_highwaters = _build_highwaters
    consumer_thread._create_worker_consumer = _create_worker_consumer
    transport._new_offset = _new_offset
    transport._filter_tps_with_pending_acks = _filter_tps_with_pending_acks
    faust_consumer.ThreadDelegateConsumer.seek_to_committed = _seek_to_committed
    faust_aiokafka.Consumer.wait_first = _wait_first_stepping


async def _build_highwaters(self: Any, consumer: Any, tps: Any, destination: Any, title: str) -> None:
    """Recover each table to its changelog's last record, not to where the broker says the log ends.

    The embedded broker answers a partition's end as its last batch's base offset + 1; faust stops recovering a
    table there, so the later records of that batch (a batch holds every key one stage batch touched) were lost
    from the table on a restart while the input offsets that made them stayed committed.
    """
    await _ORIGINAL["build_highwaters"](self, consumer, tps, destination, title)
    bootstrap = getattr(self.app, "concord_bootstrap", None)
    if not bootstrap or not destination:
        return
    from concord.runtime.broker import read_ends

    asked = {(tp.topic, tp.partition): last + 1 for tp, last in destination.items() if last is not None}
    ends = await asyncio.get_running_loop().run_in_executor(None, read_ends, bootstrap, asked)
    for tp in list(destination):
        end = ends.get((tp.topic, tp.partition))
        if end is not None and end - 1 > destination[tp]:
            destination[tp] = end - 1


def _ledger(consumer: Any) -> OffsetLedger | None:
    return getattr(consumer.app, "concord_ledger", None)


def _create_worker_consumer(self: Any, transport: Any) -> Any:
    """Faust hard-codes fetch_max_wait_ms=1500, the floor of every hop's latency on a quiet topic."""
    consumer = _ORIGINAL["create_worker_consumer"](self, transport)
    wait = getattr(self.app, "concord_fetch_max_wait_ms", None)
    if wait is not None:
        consumer._fetch_max_wait_ms = wait
    return consumer


def _new_offset(self: Any, tp: Any) -> int | None:
    """The offset to commit for ``tp``: the ledger's, whatever faust's list of acks and gaps says."""
    faust_view = _ORIGINAL["new_offset"](self, tp)  # still called: it trims faust's own list of acks
    ledger = _ledger(self)
    return faust_view if ledger is None else ledger.committable(tp)


def _filter_tps_with_pending_acks(self: Any, topics: Any = None) -> Any:
    """Partitions with something to commit: faust's, and every partition the ledger follows."""
    ledger = _ledger(self)
    if ledger is None:
        return _ORIGINAL["pending_acks"](self, topics)
    tps = set(self._acked) | {tp for tp in ledger.partitions() if tp in self.assignment()}
    return (tp for tp in tps if topics is None or tp in topics or tp.topic in topics)


async def _seek_to_committed(self: Any) -> Any:
    """Tell the ledger where each assigned partition resumes; seek again where it must start elsewhere."""
    offsets = await _ORIGINAL["seek_to_committed"](self)
    ledger = _ledger(self)
    if ledger is not None:
        for tp, offset in ledger.committed_known(dict(offsets)).items():
            await self.seek(tp, offset)
    return offsets


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
    """Step a message's delivery once before racing it against the flow being suspended.

    faust's consumer hands every fetched message to the streams with ``wait_first(deliver, suspend_flow)``:
    four tasks and an asyncio.wait per message (~8% of the worker's main thread), although delivering almost
    never waits. A delivery that completes without waiting is done; only one that has to wait (a full
    stream buffer) runs as a task raced against the flow being suspended, as faust does.
    """
    wait_first = _ORIGINAL["wait_first"]
    first = coros[0] if coros else None
    if (_ledger(self) is None or timeout is not None or len(coros) != 2
            or not isinstance(first, types.CoroutineType) or self._stopped.is_set() or self._crashed.is_set()):
        return await wait_first(self, *coros, timeout=timeout)
    try:
        yielded = first.send(None)
    except StopIteration as stop:
        other = coros[1]
        if isinstance(other, types.CoroutineType):
            other.close()
        return WaitResults([first], [stop.value], False)
    return await wait_first(self, asyncio.ensure_future(_resumed(first, yielded)), coros[1])


class writing_as:  # noqa: N801 - used like a function in `with`
    """Make table writes go to the changelog partition of ``event`` (faust reads the current event)."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def __enter__(self) -> None:
        self.token = _current_event.set(weakref.ref(self.event))

    def __exit__(self, *exc: object) -> None:
        _current_event.reset(self.token)


def changelog_value(value: Any) -> bytes:
    """A table value as faust's ``json`` value serializer writes it (so faust's recovery reads it back)."""
    data = faust_json.dumps(value)
    return data if isinstance(data, bytes) else data.encode()


def persisted(table: Any, written: dict[tuple[str, int], int]) -> None:
    """Record the changelog offsets Concord's producer wrote, as faust's own changelog sender would."""
    for (topic, partition), offset in written.items():
        table.data.set_persisted_offset(TP(topic, partition), offset)


def ack(stream: Any, event: Any) -> None:
    """Acknowledge a processed event to faust (its own bookkeeping; the ledger decides what is committed)."""
    if event.ack():
        message = event.message
        stream._on_message_out(message.tp, message.offset, message)


def route_by_table_partitions(app: Any, tables: Iterable[Any]) -> None:
    """Map a table key to its changelog partition from the table's own partition count.

    faust's web routing asks its aiokafka producer for the changelog's partitions, which only that producer's
    metadata holds; Concord writes changelogs through its own producer, so that metadata is fetched for routing
    alone, and a later refresh that meets the topic without a leader (Apache Kafka, right after creating it) drops
    it until the next refresh five minutes on: every routed request raised meanwhile. The changelog was declared
    with the table's partition count (checked at start), so the partition follows from the key as the default
    partitioner computes it, with no metadata. Before the worker's first assignment faust answers 503.
    """
    by_changelog = {t.changelog_topic.get_topic_name(): t for t in tables}
    fallback = app.producer.key_partition

    def key_partition(topic: str, key: bytes) -> TP:
        table = by_changelog.get(topic)
        return fallback(topic, key) if table is None else TP(topic, partition_of(table, key))

    app.producer.key_partition = key_partition


def active_partitions(app: Any, table: Any) -> set[int]:
    """The partitions of ``table`` this worker is active for (not standby copies)."""
    changelog = table.changelog_topic.get_topic_name()
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == changelog}


def on_tables_recovered(app: Any, callback: Callable[[], Awaitable[None]]) -> None:
    """Call ``callback`` each time faust has recovered the active tables after an assignment.

    faust sends ``app.on_rebalance_complete`` once the active changelogs are read up to their end, before it
    resumes the streams, whatever generation the consumer has reached by then. The gauges once waited for
    ``app.rebalancing`` to fall instead; on Apache Kafka they then stayed empty for minutes while the worker
    processed records.
    """

    async def recovered(sender: Any, **kwargs: Any) -> None:
        await callback()

    app.on_rebalance_complete.connect(recovered, weak=False)


def partition_of(table: Any, key: bytes) -> int:
    """The partition faust keeps ``key`` of ``table`` in (the default partitioner's murmur2 of the key)."""
    return (murmur2(key) & 0x7FFFFFFF) % table.partitions
