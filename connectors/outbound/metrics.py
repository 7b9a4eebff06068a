"""Metrics of the command adapters, registered on Concord's one registry (concord.runtime.metrics.REGISTRY)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from concord.runtime.metrics import REGISTRY

ADAPTER_COMMANDS = Counter(
    "concord_adapter_commands_total", "Commands an adapter handled, by target backend, command type and outcome "
    "(applied, duplicate, rejected, retried, undecodable).", ["target", "type", "outcome"], registry=REGISTRY)
ADAPTER_APPLY_SECONDS = Histogram(
    "concord_adapter_apply_seconds", "Time from taking a command to its effect being recorded, retries included.",
    ["target"], registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
