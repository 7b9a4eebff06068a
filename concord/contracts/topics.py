"""Every topic Concord reads or writes, declared once: name, partitions, value schema, key meaning."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

from concord.exceptions import ConfigError

PARTITIONS = 4


@dataclass(frozen=True)
class TopicSpec:
    """One declared topic."""

    name: str
    value_schema: str  # a file stem in schemas/
    key: str  # what the (utf-8 string) key is
    doc: str
    partitions: int = PARTITIONS
    compacted: bool = False


# (source_system, entity_type) pairs that have a changes topic.
ENTITIES: tuple[tuple[str, str], ...] = (
    ("crm", "customer"),
    ("crm", "deal"),
    ("dispatch", "job"),
    ("billing", "invoice"),
    ("billing", "payment"),
)
SOURCE_OF = {entity: system for system, entity in ENTITIES}

TARGET_SYSTEMS: tuple[str, ...] = ("billing", "crm", "dispatch")
OWNERS: tuple[str, ...] = ("revenue-ops", "marketing-ops", "dispatch-ops", "finance")


def changes_topic(system: str, entity: str) -> str:
    """The changes topic of one source system's entity type."""
    return f"changes.{system}.{entity}"


def deadletter_topic(topic: str) -> str:
    """The dead-letter topic paired with ``topic``."""
    return f"deadletter.{topic}"


def commands_topic(target: str) -> str:
    """The command topic a target system's adapter consumes."""
    return f"commands.{target}"


def exceptions_base(owner: str) -> str:
    """The base name of one owner team's exception queue (a deployment prefixes it: Deployment.exceptions)."""
    return f"exceptions.{owner}"


CHANGES = tuple(
    TopicSpec(changes_topic(s, e), "change_event", "entity_id", f"{s} {e} change events")
    for s, e in ENTITIES
)
DEADLETTERS = tuple(
    TopicSpec(deadletter_topic(t.name), "dead_letter", "original key", f"records of {t.name} that failed")
    for t in CHANGES
)
# Internal topics: each deployment (app id) has its own, named <app id>-<base name> (see Deployment), as Kafka
# Streams names its internal topics; the declarations here carry the base names.
ACCEPTED = TopicSpec(
    "accepted.changes", "change_event", "customer_id",
    "events the ordering guard applied, re-keyed by customer for the status table",
)
COMMANDS = tuple(
    TopicSpec(commands_topic(t), "command", "entity_id", f"commands for the {t} system") for t in TARGET_SYSTEMS
)
COMMAND_DEADLETTERS = tuple(
    TopicSpec(deadletter_topic(t.name), "dead_letter", "original key", f"records of {t.name} an adapter could "
              "not decode, with the original bytes")
    for t in COMMANDS
)
EXCEPTIONS = tuple(
    TopicSpec(exceptions_base(o), "exception", "exception_id", f"exception queue of {o}") for o in OWNERS
)
INGEST_SOURCES: tuple[str, ...] = ("salesforce", "hubspot", "stripe", "debezium", "jobber", "csv", "canonical")
INGEST_DEADLETTERS = tuple(
    TopicSpec(deadletter_topic(f"ingest.{s}"), "dead_letter", "source record id or empty",
              f"{s} input a connector rejected, with the original bytes")
    for s in INGEST_SOURCES
)
GUARD_CONTROLS = TopicSpec(
    "guard.controls", "control", "entity_id (or empty for a tick)",
    "timer ticks and owner instructions to the ordering guard, co-partitioned with the changes topics",
)
EXCEPTION_ACTIONS = TopicSpec(
    "actions.exceptions", "action", "customer_id (the status key)",
    "owners' acknowledgements, resolutions and discards, co-partitioned with accepted.changes",
)
COMMAND_OUTCOMES = TopicSpec(
    "outcomes.commands", "command_outcome", "customer_id (the status key)",
    "each command's outcome as its adapter reported it, co-partitioned with accepted.changes",
)
AUDIT = TopicSpec("audit.decisions", "decision", "trace_id", "every decision Concord made, with its reason")
CONFIG_CHANGES = TopicSpec("audit.config_changes", "config_change", "the new configuration digest",
                           "applied flow and routing configuration changes: who approved, when, what they change",
                           partitions=1)
INTERNAL: tuple[TopicSpec, ...] = (GUARD_CONTROLS, ACCEPTED, EXCEPTION_ACTIONS, *EXCEPTIONS)

# The topics every deployment on a cluster shares: the source systems' changes, the target systems' commands and
# their outcomes, the audit trail and the dead letters of those.
ALL: tuple[TopicSpec, ...] = (
    *CHANGES, *DEADLETTERS, *INGEST_DEADLETTERS, *COMMANDS, *COMMAND_DEADLETTERS, COMMAND_OUTCOMES, AUDIT,
    CONFIG_CHANGES,
)
BY_NAME: dict[str, TopicSpec] = {t.name: t for t in ALL}
# An app id is a topic prefix; one that starts with "deadletter." would name its internal topics as another
# deployment's dead letters (deadletter.x-exceptions.finance is x's), so it is refused.
_APP_ID = re.compile(r"(?!deadletter\.)[A-Za-z0-9._-]{1,150}")


@dataclass(frozen=True)
class Deployment:
    """The topic names of one deployment (one app id).

    Its internal topics carry its app id, so two deployments on one cluster (or a demo beside production) never
    read or act on each other's records.
    """

    app_id: str

    def __post_init__(self) -> None:
        if not _APP_ID.fullmatch(self.app_id):
            raise ConfigError(f"app id {self.app_id!r}: a topic prefix takes 1-150 of A-Z a-z 0-9 . _ - and does "
                              "not start with deadletter.")

    def name(self, base: str) -> str:
        """The deployment's name for the internal topic ``base``."""
        return f"{self.app_id}-{base}"

    @cached_property
    def accepted(self) -> str:
        return self.name(ACCEPTED.name)

    @cached_property
    def guard_controls(self) -> str:
        return self.name(GUARD_CONTROLS.name)

    @cached_property
    def exception_actions(self) -> str:
        return self.name(EXCEPTION_ACTIONS.name)

    def exceptions(self, owner: str) -> str:
        """One owner team's exception queue."""
        return self.name(exceptions_base(owner))

    @cached_property
    def exception_queues(self) -> tuple[str, ...]:
        return tuple(self.exceptions(o) for o in OWNERS)

    @cached_property
    def specs(self) -> tuple[TopicSpec, ...]:
        """The internal topics and their dead-letter topics, under this deployment's names."""
        own = tuple(replace(t, name=self.name(t.name)) for t in INTERNAL)
        dead = tuple(TopicSpec(deadletter_topic(t.name), "dead_letter", "original key", f"records of {t.name} a "
                               "worker could not use, with the original bytes") for t in own)
        return (*own, *dead)

    @cached_property
    def topics(self) -> tuple[TopicSpec, ...]:
        """Every topic the deployment uses: the shared ones and its own."""
        return (*ALL, *self.specs)

    @cached_property
    def worker_inputs(self) -> tuple[str, ...]:
        """What the deployment's worker group reads: stage one, stage two and the exception tracker."""
        return (*(t.name for t in CHANGES), self.guard_controls, self.accepted, self.exception_actions,
                COMMAND_OUTCOMES.name, *self.exception_queues)

    def base(self, topic: str) -> str | None:
        """The base name of one of this deployment's internal topics; None for any other topic."""
        prefix = f"{self.app_id}-"
        return topic[len(prefix):] if topic.startswith(prefix) and topic[len(prefix):] in _INTERNAL_BASES else None


_INTERNAL_BASES = frozenset(t.name for t in INTERNAL)


def internal_base(name: str) -> str | None:
    """The base name of any deployment's internal topic, None for a shared topic or an undeclared one.

    ``exceptions.finance`` for ``<app id>-exceptions.finance``.
    """
    for base in _INTERNAL_BASES:
        app_id = name.removesuffix(f"-{base}")
        if app_id != name and _APP_ID.fullmatch(app_id):
            return base
    return None


def is_exception_queue(name: str) -> bool:
    """Whether ``name`` is an owner team's exception queue of any deployment."""
    return (internal_base(name) or "").startswith("exceptions.")


@lru_cache(maxsize=4096)  # per record on the decode path: an internal topic's look-up costs ~40 µs uncached
def spec(name: str) -> TopicSpec:
    """The declaration of topic ``name`` (a shared one, or any deployment's internal one or its dead letters).

    KeyError names the topic when it is not declared.
    """
    found = BY_NAME.get(name)
    if found is None:
        inner = name.removeprefix("deadletter.")
        base = internal_base(inner)
        if base is not None:
            found = next(t for t in Deployment(inner.removesuffix(f"-{base}")).specs if t.name == name)
    if found is None:
        raise KeyError(f"topic {name!r} is not declared in concord/contracts/topics.py")
    return found
