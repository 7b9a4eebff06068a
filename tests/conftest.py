"""Shared fixtures: one broker per session and per broker of the matrix, fresh ids per test."""

from __future__ import annotations

import os
import re
import uuid
from collections import defaultdict
from collections.abc import Iterator

import pytest

from concord.runtime.broker import Broker, ensure_topics, kafka_version, open_broker, start_kafka

# what --brokers names, and the label each gets in test ids and the matrix line
_KINDS = {"tansu": "embedded", "kafka": "kafka", "container": "container"}


def pytest_addoption(parser: pytest.Parser) -> None:
    """--brokers: which brokers the broker tests run on (make test passes tansu,kafka)."""
    parser.addoption("--brokers", default=os.environ.get("CONCORD_TEST_BROKERS", "tansu"),
                     help="comma-separated brokers to run broker tests on: tansu, kafka, kafka-X.Y.Z, container "
                          "(default $CONCORD_TEST_BROKERS or tansu; KAFKA_BOOTSTRAP_SERVERS overrides)")


def _labels(config: pytest.Config) -> list[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return ["external"]
    names = [n.strip() for n in config.getoption("--brokers").split(",") if n.strip()]
    unknown = [n for n in names if n not in _KINDS and not re.fullmatch(r"kafka-\d+\.\d+\.\d+", n)]
    if unknown or not names:
        raise pytest.UsageError(f"--brokers: unknown {unknown}; expected some of {', '.join(_KINDS)} "
                                "or kafka-X.Y.Z")
    return [f"kafka-{kafka_version()}" if n == "kafka" else n for n in names]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that needs the broker runs once per broker of the matrix."""
    if "broker" in metafunc.fixturenames:
        labels = _labels(metafunc.config)
        metafunc.parametrize("broker", labels, ids=labels, indirect=True, scope="session")


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """The session's broker of this matrix entry: Tansu, Apache Kafka from the cache, a container, or external."""
    label = request.param
    if label.startswith("kafka-"):  # this version of Apache Kafka, fetched into the cache if need be
        b = start_kafka(version=label.removeprefix("kafka-"))
        try:
            ensure_topics(b.bootstrap_servers)
            yield b
        finally:
            b.stop()
        return
    with open_broker(None if label == "external" else _KINDS[label]) as b:
        ensure_topics(b.bootstrap_servers)
        yield b


@pytest.fixture
def uid() -> str:
    """A short unique suffix for this test's ids, groups and app ids."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def figure(request: pytest.FixtureRequest):
    """Record one measured figure; the run prints each at the end, passed or not, as `figure: ...`."""
    # carried on the test's report, so that it reaches the controller when xdist runs the test elsewhere
    return lambda line: request.node.user_properties.append(("figure", line))


def broker_label(nodeid: str) -> str | None:
    """The broker of the matrix a test id ran on (its first parameter id), or None for a test without one."""
    m = re.search(r"\[([^\]]+)\]$", nodeid)
    if not m:
        return None
    first = m[1].split("-")
    for n in range(len(first), 0, -1):  # "kafka-4.4.0-hubspot": the longest prefix that is a broker label
        label = "-".join(first[:n])
        if label in ("tansu", "container", "external") or re.fullmatch(r"kafka-\d+\.\d+\.\d+", label):
            return label
    return None


class _Matrix:
    """Counts passed and total broker tests per broker, for the one `broker matrix:` line.

    Everything comes from the tests' reports, the one thing a run under xdist brings back to its controller.
    """

    def __init__(self) -> None:
        self.total: dict[str, set[str]] = defaultdict(set)
        self.failed: set[str] = set()
        self.passed: set[str] = set()
        self.seconds: dict[str, float] = defaultdict(float)
        self.figures: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":
            self.figures.extend(v for k, v in report.user_properties if k == "figure")
        label = broker_label(report.nodeid)
        if label is None:
            return
        self.total[label].add(report.nodeid)
        self.seconds[label] += report.duration
        if report.failed or report.skipped:
            self.failed.add(report.nodeid)
        elif report.when == "call" and report.passed:
            self.passed.add(report.nodeid)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for line in self.figures:
            terminalreporter.write_line(f"figure: {line}")
        if not self.total or terminalreporter.config.option.collectonly:
            return
        ok: dict[str, int] = defaultdict(int)
        for nodeid in self.passed - self.failed:
            ok[broker_label(nodeid) or ""] += 1
        terminalreporter.write_line(
            "broker matrix: " + " ".join(f"{b}={ok[b]}/{len(self.total[b])}" for b in self._order()))
        terminalreporter.write_line(
            "broker time: " + " ".join(f"{b}={self.seconds[b]:.0f}s" for b in self._order()))

    def _order(self) -> list[str]:
        return sorted(self.total, key=lambda b: (b != "tansu", b))  # the same line whichever test ran first


def pytest_configure(config: pytest.Config) -> None:
    """Register the matrix counter; code under test that starts a broker of its own starts Tansu."""
    # a `concord demo` a test runs without KAFKA_BOOTSTRAP_SERVERS would otherwise start a JVM each time
    os.environ.setdefault("CONCORD_BROKER", "embedded")
    config.pluginmanager.register(_Matrix(), "concord-broker-matrix")
