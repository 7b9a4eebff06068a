"""Shared fixtures: one broker per session (external, container or embedded), fresh ids per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from concord.runtime.broker import Broker, docker_engine_answers, ensure_topics, open_broker


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """The session's broker: KAFKA_BOOTSTRAP_SERVERS, else Kafka in Docker if an engine answers, else Tansu."""
    import os

    prefer = None if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") else (
        "container" if docker_engine_answers() else "embedded")
    with open_broker(prefer) as b:
        ensure_topics(b.bootstrap_servers)
        yield b


@pytest.fixture
def uid() -> str:
    """A short unique suffix for this test's ids, groups and app ids."""
    return uuid.uuid4().hex[:10]
