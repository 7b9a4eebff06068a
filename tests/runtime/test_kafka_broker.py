"""How Concord chooses, fetches and configures Apache Kafka, checked without starting a broker."""

import subprocess
import sys

import pytest

from concord.exceptions import BrokerError
from concord.runtime import broker as b


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def test_a_three_node_cluster_replicates_three_ways_and_needs_two_in_sync(tmp_path):
    props = _props(b._node_properties(2, 9001, 9002, "1@127.0.0.1:1,2@127.0.0.1:9002,3@127.0.0.1:3", tmp_path, 3))
    assert props["node.id"] == "2" and props["process.roles"] == "broker,controller"
    assert props["default.replication.factor"] == "3" and props["min.insync.replicas"] == "2"
    assert props["offsets.topic.replication.factor"] == "3" and props["transaction.state.log.min.isr"] == "2"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9001,CONTROLLER://127.0.0.1:9002"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "false"


def test_a_single_node_asks_for_no_more_replicas_than_it_has(tmp_path):
    props = _props(b._node_properties(1, 9001, 9002, "1@127.0.0.1:9002", tmp_path, 1))
    assert props["default.replication.factor"] == "1" and props["min.insync.replicas"] == "1"
    assert props["offsets.topic.replication.factor"] == "1"


def test_concord_broker_forces_a_kind_and_a_wrong_one_is_an_error(monkeypatch):
    for kind in ("embedded", "kafka", "container"):
        monkeypatch.setenv("CONCORD_BROKER", kind)
        assert b.broker_choice() == kind
    monkeypatch.setenv("CONCORD_BROKER", "zookeeper")
    with pytest.raises(BrokerError, match="expected container, kafka or embedded"):
        b.broker_choice()


def test_without_java_the_choice_falls_back_to_the_embedded_broker(monkeypatch, tmp_path):
    monkeypatch.delenv("CONCORD_BROKER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker, no java, no mvn
    assert b.broker_choice() == "embedded"


def test_the_cache_counts_only_a_completed_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("CONCORD_CACHE_DIR", str(tmp_path))
    libs = b.kafka_cache_dir("9.9.9") / "libs"
    libs.mkdir(parents=True)
    (libs / "kafka_2.13-9.9.9.jar").write_bytes(b"half")
    assert libs.parent == tmp_path / "kafka-9.9.9" and not b.kafka_cached("9.9.9")
    (libs / ".complete").write_text("9.9.9\n")
    assert b.kafka_cached("9.9.9") and b.fetch_kafka("9.9.9") == libs  # nothing fetched again


def test_fetching_without_maven_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("CONCORD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="not cached .* no mvn"):
        b.fetch_kafka("9.9.8")


def test_the_command_line_fails_on_stderr_with_status_1(tmp_path):
    env = {"PATH": str(tmp_path), "CONCORD_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "concord.runtime.broker", "--version", "9.9.7", "--fetch-only"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: Apache Kafka 9.9.7 is not cached")
