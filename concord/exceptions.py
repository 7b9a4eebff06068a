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


class SchemaMismatch(DecodeError):
    """Raised when a valid Avro record carries another schema than the one its topic declares."""


class EncodeError(ConcordError, ValueError):
    """Raised when a record does not fit the schema it is written with; the message names the schema."""


class PayloadTypeError(DecodeError):
    """Raised when a change event's payload is not the record type its entity_type names."""


class RuleError(ConcordError):
    """Raised when a business rule raises on one record; the rule's own error is its cause."""


class TooLarge(DecodeError):
    """Raised when a record is larger than Concord can forward or keep whole in a dead letter."""
