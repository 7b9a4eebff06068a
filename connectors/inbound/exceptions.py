"""Errors of the inbound connectors."""

from __future__ import annotations


class BadInput(ValueError):
    """A native record Concord cannot map: unparseable, or missing a field it needs."""

    def __init__(self, message: str, record_id: str | None = None, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.record_id = record_id
        self.raw = raw  # the offending bytes when they are not the whole record (a CSV row)
        self.unexpected: str | None = None  # the error type a mapper raised instead, when this wraps one
