"""Every Prometheus metric Concord exports, defined once (the README's metrics table lists them)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS = Counter(
    "concord_events_total", "Input records by topic and outcome (applied, duplicate, stale, parked, "
    "released, dead_lettered, exception).", ["topic", "outcome"], registry=REGISTRY)
ORDERING_CONFLICTS = Counter(
    "concord_ordering_conflicts_total", "Ordering conflicts the guard caught, by kind (duplicate, stale, gap).",
    ["kind"], registry=REGISTRY)
PARKED = Gauge(
    "concord_parked_events", "Events parked behind a sequence gap or an open exception.", registry=REGISTRY)
DEADLETTERS = Counter(
    "concord_deadletters_total", "Records sent to a dead-letter topic, by source topic and stage.",
    ["topic", "stage"], registry=REGISTRY)
COMMANDS = Counter(
    "concord_commands_total", "Commands issued, by target system and type.", ["target", "type"], registry=REGISTRY)
EXCEPTIONS_OPENED = Counter(
    "concord_exceptions_opened_total", "Exceptions opened, by owner and reason.", ["owner", "reason"],
    registry=REGISTRY)
EXCEPTIONS_OPEN = Gauge(
    "concord_exceptions_open", "Exceptions open now, by owner and reason.", ["owner", "reason"], registry=REGISTRY)
EXCEPTIONS_RESOLVED = Counter(
    "concord_exceptions_resolved_total", "Exceptions closed by a successful replay, by owner and reason.",
    ["owner", "reason"], registry=REGISTRY)
EXCEPTIONS_ESCALATED = Counter(
    "concord_exceptions_escalated_total", "Exceptions escalated to the backup owner, by owner and reason.",
    ["owner", "reason"], registry=REGISTRY)
RESOLUTION_SECONDS = Histogram(
    "concord_exception_resolution_seconds", "Time from opening an exception to its successful replay (MTTR).",
    ["owner", "reason"], registry=REGISTRY,
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 3 * 24 * 3600, 7 * 24 * 3600))
EXCEPTION_SLA = Gauge(
    "concord_exception_sla_seconds", "The SLA routing gives an owner's exceptions of a reason (MTTR is held "
    "against it).", ["owner", "reason"], registry=REGISTRY)
SLA_BREACHES = Counter(
    "concord_sla_breaches_total", "Exceptions whose SLA ran out unresolved, by owner and reason.",
    ["owner", "reason"], registry=REGISTRY)
RESOLUTIONS = Counter(
    "concord_resolutions_total", "Resolutions made by people (the manual hand-offs that remain), by owner.",
    ["owner"], registry=REGISTRY)
REPLAYS = Counter(
    "concord_replays_total", "Replays of resolved exceptions, by outcome (succeeded, failed).", ["outcome"],
    registry=REGISTRY)
INVOICES = Counter(
    "concord_invoices_total", "Invoices issued for completed work, by whether they went out within policy.",
    ["on_time"], registry=REGISTRY)
E2E_LATENCY = Histogram(
    "concord_end_to_end_latency_seconds", "Source occurred_at to command issued.", registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
RECORDS_SKIPPED = Counter(
    "concord_records_skipped_total", "Delivered records the offset ledger did not process, by topic and action "
    "(skip: already processed or not yet positioned; seek: a jump the consumer is sent back over).",
    ["topic", "action"], registry=REGISTRY)
OFFSET_SEEKS = Counter(
    "concord_offset_seeks_total", "Seeks back to the next undecided offset after the consumer jumped ahead, by topic.",
    ["topic"], registry=REGISTRY)
CONSUMER_LAG = Gauge(
    "concord_consumer_lag", "Records not yet consumed, by topic and partition.", ["topic", "partition"],
    registry=REGISTRY)
CANARY_RUNS = Counter(
    "concord_canary_runs_total", "Synthetic flows run end to end, by outcome (succeeded, failed).", ["outcome"],
    registry=REGISTRY)
INGESTED = Counter(
    "concord_ingested_total", "Native records taken in by a connector, by source and outcome (published, "
    "duplicate, rejected).", ["source", "outcome"], registry=REGISTRY)
COMMAND_OUTCOMES = Counter(
    "concord_command_outcomes_total", "Command outcomes the adapters reported, by target, type and outcome "
    "(applied, duplicate, rejected, failed).", ["target", "type", "outcome"], registry=REGISTRY)
COMMANDS_CONFIRMED = Counter(
    "concord_commands_confirmed_total", "Commands the owning system's own change events confirmed, by target and "
    "type.", ["target", "type"], registry=REGISTRY)
CONFIRMATION_SECONDS = Histogram(
    "concord_command_confirmation_seconds", "Time from a command issued to its confirmation by the target's feed.",
    ["type"], registry=REGISTRY, buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600))
RECONCILE_CHECKS = Counter(
    "concord_reconcile_checks_total", "Customers the time-driven rules looked at.", registry=REGISTRY)
STATUSES_TOO_LARGE = Counter(
    "concord_statuses_too_large_total",
    "Time-driven checks not applied because the customer's status would outgrow one changelog record.",
    registry=REGISTRY)
REVENUE_AT_RISK = Gauge(
    "concord_revenue_at_risk_cents", "Money held up by open exceptions, by owner, reason and currency.",
    ["owner", "reason", "currency"], registry=REGISTRY)
UNBILLED_WORK = Gauge(
    "concord_unbilled_work_cents", "Completed work not invoiced within policy (open unbilled_work), by currency.",
    ["currency"], registry=REGISTRY)
OVERDUE_INVOICES = Gauge(
    "concord_overdue_invoices_cents", "Cents due on issued invoices past their due date and unpaid.",
    registry=REGISTRY)
CONFIG_INFO = Gauge(
    "concord_config_info", "The flow and routing configuration this process runs: 1, labelled by its digest.",
    ["digest"], registry=REGISTRY)


def publish_slas(routing: Any) -> None:
    """Export the SLA of every routed (owner, reason): sequence gaps go to each system's data owner."""
    for reason, route in sorted(routing.reasons.items()):
        owners = {route.owner} | (set(routing.gap_owner_by_system.values()) if reason == "sequence_gap" else set())
        for owner in sorted(owners):
            EXCEPTION_SLA.labels(owner, reason).set(route.sla_seconds)
