"""Which configuration decides: a digest of the flow and routing configuration, and the record of a change to it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from concord.domain.flow_config import FlowConfig, load_flow_config
from concord.domain.routing import Routing, load_routing


def config_digest(cfg: FlowConfig, routing: Routing) -> str:
    """A short digest of what the rules are given: equal configurations (however written) digest alike."""
    body = json.dumps({"flows": cfg.model_dump(mode="json"), "routing": routing.model_dump(mode="json")},
                      sort_keys=True).encode()
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def running_digest() -> str:
    """The digest of the configuration a worker loads ($CONCORD_FLOWS / $CONCORD_ROUTING, else the repository's)."""
    return config_digest(load_flow_config(), load_routing())


def config_change(*, before: str, after: str, approved_by: str, approved_at: int, reason: str,
                  summary: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """The audit record of an applied configuration change (schemas/config_change.avsc)."""
    if not approved_by.strip():
        raise ValueError("a configuration change needs the name of who approved it")
    return {"change_id": f"{before}->{after}", "digest_before": before, "digest_after": after,
            "approved_by": approved_by.strip(), "approved_at": approved_at, "reason": reason,
            "summary": json.dumps(summary, sort_keys=True), "files": dict(files)}
