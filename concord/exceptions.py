"""Errors raised by Concord's stream processors; every one derives from ConcordError."""

from __future__ import annotations


class ConcordError(Exception):
    """Root of every error Concord raises on purpose."""


class ConfigError(ConcordError):
    """Raised when configuration is missing or invalid; the message names the setting at fault."""


class BrokerError(ConcordError):
    """Raised when no broker can be started or reached."""


class TopicMismatch(BrokerError):
    """Raised when an existing topic's partition count differs from its declaration."""


class DecodeError(ConcordError):
    """Raised when a record's bytes cannot be decoded into a known schema."""


class ValidationError(ConcordError):
    """Raised when a decoded record breaks the contract (missing ids, unknown values, wrong payload)."""
