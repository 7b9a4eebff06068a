"""Every topic Concord reads or writes, declared once: name, partitions, value schema, key meaning."""

from __future__ import annotations

from dataclasses import dataclass

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


def exceptions_topic(owner: str) -> str:
    """The exception queue of one owner team."""
    return f"exceptions.{owner}"


CHANGES = tuple(
    TopicSpec(changes_topic(s, e), "change_event", "entity_id", f"{s} {e} change events")
    for s, e in ENTITIES
)
DEADLETTERS = tuple(
    TopicSpec(deadletter_topic(t.name), "dead_letter", "original key", f"records of {t.name} that failed")
    for t in CHANGES
)
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
    TopicSpec(exceptions_topic(o), "exception", "exception_id", f"exception queue of {o}") for o in OWNERS
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
AUDIT = TopicSpec("audit.decisions", "decision", "trace_id", "every decision Concord made, with its reason")
CONFIG_CHANGES = TopicSpec("audit.config_changes", "config_change", "the new configuration digest",
                           "applied flow and routing configuration changes: who approved, when, what they change",
                           partitions=1)
INTERNAL_DEADLETTERS = tuple(
    TopicSpec(deadletter_topic(t.name), "dead_letter", "original key", f"records of {t.name} a worker could not "
              "use, with the original bytes")
    for t in (GUARD_CONTROLS, ACCEPTED, EXCEPTION_ACTIONS, *EXCEPTIONS)
)

ALL: tuple[TopicSpec, ...] = (
    *CHANGES, *DEADLETTERS, *INGEST_DEADLETTERS, ACCEPTED, GUARD_CONTROLS, *COMMANDS, *COMMAND_DEADLETTERS,
    *EXCEPTIONS,
    EXCEPTION_ACTIONS, AUDIT, CONFIG_CHANGES, *INTERNAL_DEADLETTERS,
)
# What a worker's consumer group reads: stage one, stage two and the exception tracker.
WORKER_INPUTS: tuple[str, ...] = (
    *(t.name for t in CHANGES), GUARD_CONTROLS.name, ACCEPTED.name, EXCEPTION_ACTIONS.name,
    *(t.name for t in EXCEPTIONS),
)
BY_NAME: dict[str, TopicSpec] = {t.name: t for t in ALL}


def spec(name: str) -> TopicSpec:
    """The declaration of topic ``name``; KeyError names the topic when it is not declared."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"topic {name!r} is not declared in concord/contracts/topics.py") from None
