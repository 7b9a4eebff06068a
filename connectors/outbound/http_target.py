"""The ``http`` target: POST each command as JSON to ``{base}/commands/{type}`` with an Idempotency-Key.

2xx: applied; 409: the receiver already applied this command id (duplicate); 429, 5xx, network
errors: transient (``Retry-After`` honoured); any other status: the receiver rejected the command.
A bearer token, when the receiver needs one, comes from ``CONCORD_HTTP_TOKEN`` (never from code).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from connectors.outbound.base import (
    APPLIED,
    DUPLICATE,
    REQUIRED,
    Command,
    FatalError,
    PermanentError,
    Result,
    TransientError,
    check,
)

TYPES = frozenset(REQUIRED)  # every command type Concord issues


class HttpTarget:
    """A generic JSON-over-HTTP receiver (a dispatch system's API, a CRM relay)."""

    name = "http"
    types = TYPES

    def __init__(self, base_url: str, timeout: float = 10.0, token: str | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise FatalError(f"--base-url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.token = token if token is not None else os.environ.get("CONCORD_HTTP_TOKEN")

    def body(self, cmd: Command) -> dict[str, Any]:
        """The JSON document posted for ``cmd``."""
        return {"command_id": cmd.command_id, "concord_command_id": cmd.marker, "type": cmd.type,
                "target_system": cmd.target_system, "entity_type": cmd.entity_type, "entity_id": cmd.entity_id,
                "customer_id": cmd.customer_id, "trace_id": cmd.trace_id, "issued_at": cmd.issued_at,
                "caused_by": cmd.caused_by, "payload": cmd.payload}

    def apply(self, cmd: Command) -> Result:
        """POST the command; map the status to applied / duplicate / transient / permanent."""
        check(cmd, self.types, self.name)
        headers = {"Content-Type": "application/json", "Idempotency-Key": cmd.command_id,
                   "X-Concord-Trace-Id": cmd.trace_id}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = f"{self.base_url}/commands/{cmd.type}"
        req = urllib.request.Request(url, data=json.dumps(self.body(cmd)).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return Result(APPLIED, _ref(resp.read()))
        except urllib.error.HTTPError as exc:
            status, text = exc.code, _text(exc)
            if status == 409:
                return Result(DUPLICATE, _ref(text.encode()))
            if status == 429 or status >= 500:
                raise TransientError(f"POST {url} answered {status}: {text}", _retry_after(exc)) from None
            if status in (401, 403):
                raise FatalError(f"POST {url} answered {status} (check CONCORD_HTTP_TOKEN): {text}") from None
            raise PermanentError(f"POST {url} answered {status}: {text}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TransientError(f"POST {url} failed: {getattr(exc, 'reason', exc)}") from None

    def close(self) -> None:
        """Nothing to release (one connection per request)."""


def _text(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read().decode("utf-8", "replace").strip()[:500] or exc.reason
    except Exception:  # a body that cannot be read still has a status
        return str(exc.reason)


def _ref(body: bytes) -> str:
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return ""
    return str(doc.get("id") or "") if isinstance(doc, dict) else ""


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    try:
        return float(exc.headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None
