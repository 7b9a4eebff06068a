"""The shims over faust: applied only when an app is built, and each fails here if what it relies on changes."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys

import pytest
from faust.tables.recovery import Recovery
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from concord.exceptions import ConfigError
from concord.runtime import faust_shims
from concord.runtime.offsets import OffsetLedger
from concord.runtime.settings import Settings


def test_importing_the_worker_changes_nothing_in_faust():
    code = ("import faust.transport.consumer as c, faust.transport.drivers.aiokafka as a\n"
            "before = (c.Consumer._new_offset, c.ThreadDelegateConsumer.seek_to_committed, a.Consumer.wait_first,"
            " a.AIOKafkaConsumerThread._create_worker_consumer)\n"
            "import concord.runtime.worker, concord.tools.cli\n"
            "after = (c.Consumer._new_offset, c.ThreadDelegateConsumer.seek_to_committed, a.Consumer.wait_first,"
            " a.AIOKafkaConsumerThread._create_worker_consumer)\n"
            "assert before == after, 'import-time patching'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_installed_versions_are_the_tested_ones(monkeypatch):
    assert faust_shims.installed_versions() == faust_shims.TESTED
    monkeypatch.setattr(faust_shims, "installed_versions", lambda: {**faust_shims.TESTED, "aiokafka": "9.9"})
    with pytest.raises(ConfigError, match="tested on"):
        faust_shims.apply(object(), ledger=OffsetLedger(), fetch_max_wait_ms=20)


def test_faust_still_resumes_stream_partitions_before_seeking_them():
    # the order that makes a restarted consumer deliver records past the committed offset; the ledger guards it
    src = inspect.getsource(Recovery.on_recovery_completed)
    assert src.index("consumer.resume_partitions(") < src.index("consumer.perform_seek()")


def test_faust_still_counts_a_fetch_jump_as_acknowledged():
    # why the commit offset must come from the ledger: faust fills gaps in what it fetched into its acks
    src = inspect.getsource(faust_consumer.Consumer._new_offset)
    assert "gap_for_tp" in src and "acked.extend(stuff_to_add)" in src


def test_the_methods_the_shims_wrap_are_where_they_were():
    assert list(inspect.signature(faust_consumer.Consumer._new_offset).parameters) == ["self", "tp"]
    assert list(inspect.signature(faust_consumer.Consumer._filter_tps_with_pending_acks).parameters) == [
        "self", "topics"]
    assert inspect.iscoroutinefunction(faust_consumer.ThreadDelegateConsumer.seek_to_committed)
    src = inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer)
    assert "fetch_max_wait_ms=1500" in src  # still hard-coded: the fetch-wait shim is still needed
    assert "_fetch_max_wait_ms" in inspect.getsource(__import__("aiokafka").AIOKafkaConsumer.__init__)


def test_a_shimmed_app_commits_what_the_ledger_says_and_nothing_more():
    from concord.runtime.worker import build_app

    app = build_app(Settings.from_env(app_id="shim-test", bootstrap_servers="127.0.0.1:1"))
    tp = TP("changes.crm.deal", 0)
    ledger: OffsetLedger = app.concord_ledger
    ledger.assigned([tp])
    ledger.committed_known({tp: 10})
    for offset in (10, 11):
        ledger.admit(tp, offset, 0.0)
    ledger.done(tp, 10)
    consumer = app.consumer
    consumer._acked[tp] = [10, 11, 12, 13]  # faust believes more was acknowledged than was decided
    consumer._acked_index[tp] = {10, 11, 12, 13}
    assert consumer._new_offset(tp) == 11


def test_an_app_built_without_the_shims_keeps_faust_behaviour():
    import faust

    app = faust.App("plain", broker="kafka://127.0.0.1:1")
    faust_shims.apply(faust.App("other", broker="kafka://127.0.0.1:1"), ledger=OffsetLedger(), fetch_max_wait_ms=20)
    tp = TP("t", 0)
    app.consumer._acked[tp] = [0, 1, 2]
    app.consumer._acked_index[tp] = {0, 1, 2}
    assert app.consumer._new_offset(tp) == 3


def test_faust_still_recovers_tables_to_the_end_the_broker_reports():
    # the recovery-end shim corrects the highwaters _build_highwaters fills from consumer.highwaters
    assert list(inspect.signature(Recovery._build_highwaters).parameters) == [
        "self", "consumer", "tps", "destination", "title"]
    src = inspect.getsource(faust_shims._ORIGINAL.get("build_highwaters", Recovery._build_highwaters))
    assert "await consumer.highwaters(*tps)" in src and "value - 1" in src and "destination.update(" in src


def test_routing_maps_a_key_to_its_changelog_partition_without_the_clients_metadata():
    import types

    from aiokafka.partitioner import DefaultPartitioner
    from faust.types import TP

    def no_metadata(topic, key):  # aiokafka's answer when its metadata lacks the topic
        raise TypeError("'NoneType' object is not iterable")

    def table(name, partitions):
        return types.SimpleNamespace(partitions=partitions,
                                     changelog_topic=types.SimpleNamespace(get_topic_name=lambda: name))

    app = types.SimpleNamespace(producer=types.SimpleNamespace(key_partition=no_metadata))
    faust_shims.route_by_table_partitions(app, [table("a-status-changelog", 8), table("a-exc-changelog", 3)])
    partitioner = DefaultPartitioner()
    for key in (b"cust-1", b"cust-2", b"x" * 40, "kund-\u00e4".encode()):
        for name, n in (("a-status-changelog", 8), ("a-exc-changelog", 3)):
            assert app.producer.key_partition(name, key) == TP(name, partitioner(key, list(range(n)), list(range(n))))
    with pytest.raises(TypeError):  # another topic is still the client's to map
        app.producer.key_partition("elsewhere", b"k")


def test_tables_recovered_is_called_once_the_actives_are_read_and_before_streams_resume():
    # the gauge indexes are rebuilt on this call: faust must send it after the changelogs are read, every time
    import faust

    app = faust.App(f"shim-recovered-{id(object())}", broker="kafka://127.0.0.1:9")
    calls: list[int] = []

    async def recovered() -> None:
        calls.append(1)

    faust_shims.on_tables_recovered(app, recovered)
    asyncio.run(app.on_rebalance_complete.send())
    asyncio.run(app.on_rebalance_complete.send())
    assert calls == [1, 1]
    loop = inspect.getsource(Recovery._restart_recovery.fun)
    assert loop.index("self.signal_recovery_end.wait()") < loop.index("self.on_recovery_completed")
    for step in (Recovery.on_recovery_completed, Recovery._resume_streams):
        src = inspect.getsource(step)  # sent before the generation check that may return early
        assert src.index("on_rebalance_complete.send()") < src.index("consumer_generation_id")
        assert src.index("on_rebalance_complete.send()") < src.index("resume_partitions")
