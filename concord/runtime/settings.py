"""Runtime settings, read once from the environment (names in the README's settings table)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from concord.contracts.deadletter import DEFAULT_MAX_RECORD_BYTES
from concord.exceptions import ConfigError

_ENV = {
    "bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "schema_registry_url": "CONCORD_SCHEMA_REGISTRY_URL",
    "app_id": "CONCORD_APP_ID",
    "web_host": "CONCORD_WEB_HOST",
    "web_port": "CONCORD_WEB_PORT",
    "advertised_url": "CONCORD_ADVERTISED_URL",
    "store": "CONCORD_STORE",
    "data_dir": "CONCORD_DATA_DIR",
    "session_timeout_s": "CONCORD_SESSION_TIMEOUT_S",
    "fetch_max_wait_ms": "CONCORD_FETCH_MAX_WAIT_MS",
    "producer_linger_ms": "CONCORD_PRODUCER_LINGER_MS",
    "batch_size": "CONCORD_BATCH_SIZE",
    "batch_within_s": "CONCORD_BATCH_WITHIN_S",
    "log_level": "CONCORD_LOG_LEVEL",
    "gap_wait_s": "CONCORD_GAP_WAIT_S",
    "owner_tokens": "CONCORD_OWNER_TOKENS",
    "owner_tokens_file": "CONCORD_OWNER_TOKENS_FILE",
    "sla_check_interval_s": "CONCORD_SLA_CHECK_INTERVAL_S",
    "gauge_interval_s": "CONCORD_GAUGE_INTERVAL_S",
    "canary_interval_s": "CONCORD_CANARY_INTERVAL_S",
    "reconcile_interval_s": "CONCORD_RECONCILE_INTERVAL_S",
    "reconcile_budget": "CONCORD_RECONCILE_BUDGET",
    "reconcile_delay_s": "CONCORD_RECONCILE_DELAY_S",
    "max_record_bytes": "CONCORD_MAX_RECORD_BYTES",
}


class Settings(BaseModel):
    """Everything a worker needs to know about where it runs."""

    bootstrap_servers: str | None = Field(None, description="Kafka bootstrap servers; unset starts an embedded broker.")
    schema_registry_url: str | None = Field(
        None, description="Confluent-compatible Schema Registry; unset uses Avro single-object framing.")
    app_id: str = Field("concord", description="faust app id: consumer group and changelog topic prefix.")
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=0, le=65535)
    advertised_url: str | None = Field(None, description="how other workers reach this one (table routing)")
    store: str = Field("memory://", description="faust table store: memory:// or rocksdb://")
    data_dir: Path = Path(".concord")
    session_timeout_s: float = Field(6.0, gt=0)
    fetch_max_wait_ms: int = Field(20, ge=1, le=10_000)
    producer_linger_ms: int = Field(2, ge=0)
    batch_size: int = Field(500, ge=1)
    batch_within_s: float = Field(0.01, gt=0)
    log_level: str = "info"
    gap_wait_s: float = Field(300.0, ge=0, description="how long a sequence gap waits before its exception")
    owner_tokens: str | None = Field(None, description="team=token,team=token: each owner team's API credential")
    owner_tokens_file: Path | None = Field(None, description="YAML mapping team -> token (instead of the variable)")
    sla_check_interval_s: float = Field(1.0, gt=0, description="how often SLA deadlines are checked")
    gauge_interval_s: float = Field(2.0, gt=0, description="how often gauges are read from the tables")
    canary_interval_s: float = Field(60.0, ge=0, description="seconds between canary flows; 0 turns the canary off")
    reconcile_interval_s: float = Field(5.0, gt=0, description="how often the time-driven rules run per partition")
    reconcile_budget: int = Field(500, ge=1, description="customers checked per partition per run")
    reconcile_delay_s: float = Field(30.0, ge=0, description="how long after a change its customer is re-checked")
    max_record_bytes: int = Field(
        DEFAULT_MAX_RECORD_BYTES, ge=32_768,
        description="the largest record a worker forwards, and the largest table value it keeps (one changelog "
                    "record); larger ones are dead letters. Raise it only with the broker's message.max.bytes")

    def credentials(self) -> dict[str, str]:
        """Token -> owner team, from CONCORD_OWNER_TOKENS or CONCORD_OWNER_TOKENS_FILE (never from the repo)."""
        from concord.contracts.topics import OWNERS

        pairs: dict[str, str] = {}
        if self.owner_tokens_file:
            import yaml

            try:
                data = yaml.safe_load(self.owner_tokens_file.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"CONCORD_OWNER_TOKENS_FILE={self.owner_tokens_file}: {exc}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"CONCORD_OWNER_TOKENS_FILE={self.owner_tokens_file}: expected team: token lines")
            pairs.update({str(k): str(v) for k, v in data.items()})
        for item in filter(None, (self.owner_tokens or "").split(",")):
            team, sep, token = item.strip().partition("=")
            if not sep or not token:
                raise ConfigError(f"CONCORD_OWNER_TOKENS: {item!r} is not team=token")
            pairs[team] = token
        for team, token in pairs.items():
            if team not in OWNERS:
                raise ConfigError(f"owner credentials: {team!r} is not one of {list(OWNERS)}")
            if len(token) < 16:
                raise ConfigError(f"owner credentials: the token of {team} is shorter than 16 characters")
        return {token: team for team, token in pairs.items()}

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
