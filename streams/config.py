"""Runtime settings, read once from the environment (names in the README's settings table)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from streams.exceptions import ConfigError

_ENV = {
    "bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "schema_registry_url": "CONCORD_SCHEMA_REGISTRY_URL",
    "app_id": "CONCORD_APP_ID",
    "web_host": "CONCORD_WEB_HOST",
    "web_port": "CONCORD_WEB_PORT",
    "store": "CONCORD_STORE",
    "data_dir": "CONCORD_DATA_DIR",
    "session_timeout_s": "CONCORD_SESSION_TIMEOUT_S",
    "fetch_max_wait_ms": "CONCORD_FETCH_MAX_WAIT_MS",
    "producer_linger_ms": "CONCORD_PRODUCER_LINGER_MS",
    "batch_size": "CONCORD_BATCH_SIZE",
    "batch_within_s": "CONCORD_BATCH_WITHIN_S",
    "log_level": "CONCORD_LOG_LEVEL",
    "gap_wait_s": "CONCORD_GAP_WAIT_S",
}


class Settings(BaseModel):
    """Everything a worker needs to know about where it runs."""

    bootstrap_servers: str | None = Field(None, description="Kafka bootstrap servers; unset starts an embedded broker.")
    schema_registry_url: str | None = Field(
        None, description="Confluent-compatible Schema Registry; unset uses Avro single-object framing.")
    app_id: str = Field("concord", description="faust app id: consumer group and changelog topic prefix.")
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=0, le=65535)
    store: str = Field("memory://", description="faust table store: memory:// or rocksdb://")
    data_dir: Path = Path(".concord")
    session_timeout_s: float = Field(8.0, gt=0)
    fetch_max_wait_ms: int = Field(50, ge=1, le=10_000)
    producer_linger_ms: int = Field(5, ge=0)
    batch_size: int = Field(500, ge=1)
    batch_within_s: float = Field(0.02, gt=0)
    log_level: str = "info"
    gap_wait_s: float = Field(300.0, ge=0, description="how long a sequence gap waits before its exception")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from environment variables, then explicit overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {k: env[v] for k, v in _ENV.items() if env.get(v)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "?"
            name = _ENV.get(field, field)
            raise ConfigError(f"invalid setting {name}={values.get(field)!r}: {first['msg']}") from None
