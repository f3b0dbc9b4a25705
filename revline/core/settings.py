"""Every setting in one place, read once from the environment and passed down.

Environment variables use the ``REVLINE_`` prefix (``REVLINE_INPUT_TOPIC``…),
except those conventional across Kafka tooling: ``KAFKA_BOOTSTRAP_SERVERS``,
``SCHEMA_REGISTRY_URL`` and the security settings (``KAFKA_SECURITY_PROTOCOL``,
``KAFKA_SASL_*``, ``KAFKA_SSL_*``, ``SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO``…), which
``revline.core.kafka_config`` turns into every client's config.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR = Path(__file__).parent / "data"

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _env(name: str) -> AliasChoices:
    """A conventional name first (what the docs show), the ``REVLINE_`` one as well."""
    return AliasChoices(name, f"REVLINE_{name}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REVLINE_", extra="ignore", frozen=True)

    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "REVLINE_KAFKA_BOOTSTRAP_SERVERS"),
        description="Existing Kafka cluster; unset means the local broker (started on demand).",
    )
    schema_registry_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "REVLINE_SCHEMA_REGISTRY_URL"),
        description="Confluent Schema Registry; unset means single-object encoding.",
    )
    state_dir: Path = Field(default=Path(".revline"), description="Local broker, stores, reports.")

    # Security: every client (confluent-kafka, Faust's aiokafka, the registry) gets these
    # through revline/core/kafka_config.py. Secrets are SecretStr: never shown.
    kafka_security_protocol: str | None = Field(
        default=None, validation_alias=_env("KAFKA_SECURITY_PROTOCOL"),
        description="PLAINTEXT (unset), SSL, SASL_PLAINTEXT or SASL_SSL.",
    )
    kafka_sasl_mechanism: str | None = Field(
        default=None, validation_alias=_env("KAFKA_SASL_MECHANISM"),
        description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.",
    )
    kafka_sasl_username: str | None = Field(
        default=None, validation_alias=_env("KAFKA_SASL_USERNAME"),
        description="SASL user (Confluent Cloud: the API key).",
    )
    kafka_sasl_password: SecretStr | None = Field(
        default=None, validation_alias=_env("KAFKA_SASL_PASSWORD"),
        description="SASL password (Confluent Cloud: the API secret).",
    )
    kafka_sasl_password_file: Path | None = Field(
        default=None, validation_alias=_env("KAFKA_SASL_PASSWORD_FILE"),
        description="A file holding the SASL password (read at each client's start).",
    )
    kafka_ssl_ca_location: str | None = Field(
        default=None, validation_alias=_env("KAFKA_SSL_CA_LOCATION"),
        description="PEM CA bundle that signed the brokers' certificates; unset: system CAs.",
    )
    kafka_ssl_certificate_location: Path | None = Field(
        default=None, validation_alias=_env("KAFKA_SSL_CERTIFICATE_LOCATION"),
        description="Client certificate (PEM) for mutual TLS.",
    )
    kafka_ssl_key_location: Path | None = Field(
        default=None, validation_alias=_env("KAFKA_SSL_KEY_LOCATION"),
        description="Client private key (PEM) for mutual TLS.",
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None, validation_alias=_env("KAFKA_SSL_KEY_PASSWORD"),
        description="Password of an encrypted client key.",
    )
    kafka_config_file: Path | None = Field(
        default=None,
        description="librdkafka key=value properties applied to every confluent-kafka client.",
    )
    schema_registry_basic_auth_user_info: SecretStr | None = Field(
        default=None, validation_alias=_env("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"),
        description="<key>:<secret> for the registry's HTTP basic auth.",
    )
    schema_registry_ssl_ca_location: Path | None = Field(
        default=None, validation_alias=_env("SCHEMA_REGISTRY_SSL_CA_LOCATION"),
        description="PEM CA bundle for an https registry with a private CA.",
    )

    input_topic: str = "revline.events.v1"
    validated_topic: str = "revline.validated.v1"
    exceptions_topic: str = "revline.exceptions.v1"
    dead_letter_topic: str = "revline.deadletter.v1"
    outcomes_topic: str = "revline.outcomes.v1"
    reference_topic: str = "revline.reference.v1"
    ticks_topic: str = "revline.ticks.v1"
    input_partitions: int = 6

    # Operations: audit trail, exception lifecycle, re-drive.
    audit_facts_topic: str = Field(
        default="revline.audit-facts.v1",
        description="Facts from the sink, exception manager and operators, before chaining.",
    )
    audit_topic: str = Field(default="revline.audit.v1", description="Hash-chained audit trail.")
    audit_heads_topic: str = Field(
        default="revline.audit-heads.v1", description="Compacted: last hash and seq per order."
    )
    exception_events_topic: str = Field(
        default="revline.exception-events.v1",
        description="Exception lifecycle: ack, resolve, waive, escalate, expire.",
    )
    exception_state_topic: str = Field(
        default="revline.exception-state.v1", description="Compacted: each exception's state."
    )
    quarantine_topic: str = Field(
        default="revline.quarantine.v1", description="Records re-driven too often (loop guard)."
    )
    ownership_file: Path = DATA_DIR / "ownership.yaml"
    redrive_max: int = Field(default=3, description="Re-drives of one record before quarantine.")

    # Sinks.
    ledger_dsn: str | None = Field(
        default=None, description="SQLAlchemy URL of the ledger; unset means SQLite in state_dir."
    )
    erp: str = Field(default="auto", description="memory, tryton, or auto (tryton if configured).")
    tryton_url: str | None = Field(
        default=None, description="trytond JSON-RPC root, e.g. http://127.0.0.1:8000/revline/."
    )
    tryton_database: str = "revline"
    tryton_user: str = "admin"
    tryton_password: str = "revline-admin"
    sink_group: str | None = Field(default=None, description="Default: <app_id>-sink.")
    sink_batch_size: int = 300
    sink_poll_timeout_s: float = Field(
        default=0.05, description="Longest wait for a first record; a batch is what has arrived."
    )
    sink_metrics_port: int = Field(default=9101, description="/metrics of the sink; 0 = any.")
    sink_crash_after_erp_writes: int | None = Field(
        default=None, description="Testing only: SIGKILL the sink right after its Nth ERP write."
    )
    memory_erp_file: Path | None = Field(
        default=None,
        description="In-memory ERP only: keep its documents in this append-only file, so a "
                    "sink killed and restarted finds what it wrote (chaos runs set it).",
    )
    memory_erp_outage_file: Path | None = Field(
        default=None,
        description="In-memory ERP only: while this file exists every ERP call fails as an "
                    "unreachable ERP does (the sink pauses and retries); for outage drills.",
    )
    ledger_outage_s: float = Field(
        default=60.0, gt=0, le=3600,
        description="How long a component retries a ledger-database write or read that failed "
                    "on a connection (a PostgreSQL restart or fail-over) before it gives up; "
                    "start-up waits up to startup_timeout_s for the database.",
    )

    # Worker (stream core).
    app_id: str = Field(default="revline", description="Faust app id and consumer group.")
    store: str = Field(default="memory", description="memory, or rocksdb (rocksdict).")
    orders_table: str = "orders"
    metrics_port: int = Field(default=9100, description="/metrics of the worker; 0 = any.")
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address every /metrics endpoint binds; 0.0.0.0 in containers.",
    )
    batch_size: int = 1000
    batch_within_s: float = Field(
        default=0.05,
        description="Longest idle wait between input polls (backs off from 1 ms while empty).",
    )
    commit_interval_s: float = 1.0
    hold_check_interval_s: float = 5.0
    session_timeout_s: float = Field(
        default=15.0, ge=6.0, le=1800.0,
        description="A crashed member's partitions move after this long (every consumer "
                    "group; the broker accepts 6 s to 30 min by default).",
    )
    instance_id: str | None = Field(
        default=None,
        description="This host's instance name for static group membership "
                    "(group.instance.id = <instance>-<component>); default: the host name. "
                    "Give each of several sinks on one host its own (--instance).",
    )
    startup_timeout_s: float = Field(
        default=120.0, gt=0, le=86_400,
        description="How long start-up waits out transient broker errors (a cold cluster) "
                    "before it fails with one message.",
    )
    dedup_retention_days: float = 30.0
    max_orders: int = Field(default=2_000_000, description="Bound on orders kept in state.")
    log_level: str = "warn"

    rules_file: Path = DATA_DIR / "rules.yaml"
    reference_file: Path = DATA_DIR / "reference.yaml"

    # librdkafka producer tuning (mapped in producer_config()).
    producer_linger_ms: int = 5
    producer_batch_size: int = 256 * 1024
    producer_compression: str = "lz4"

    @property
    def broker_home(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def sink_group_id(self) -> str:
        return self.sink_group or f"{self.app_id}-sink"

    @property
    def ledger_url(self) -> str:
        return self.ledger_dsn or f"sqlite:///{(self.state_dir / 'ledger.db').absolute()}"

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="after")
    @classmethod
    def _upper_choice(cls, value: str | None, info: ValidationInfo) -> str | None:
        from revline.core.errors import ConfigurationError

        if value is None or not value.strip():
            return None
        value = value.strip().upper()
        allowed: tuple[str, ...] = SASL_MECHANISMS
        variable = "KAFKA_SASL_MECHANISM"
        if info.field_name == "kafka_security_protocol":
            variable, allowed = "KAFKA_SECURITY_PROTOCOL", SECURITY_PROTOCOLS
        if value not in allowed:
            raise ConfigurationError(
                f"{variable}={value} is not supported: use one of {', '.join(allowed)}")
        return value

    @field_validator("erp", "shadow_erp", "store", mode="after")
    @classmethod
    def _known_choice(cls, value: str, info: ValidationInfo) -> str:
        """Refused when the settings are read, not when the sink or worker reaches the step
        that uses it (after connecting to Kafka, or after minutes of start-up)."""
        from revline.core.errors import ConfigurationError

        allowed = {"erp": ("auto", "memory", "tryton"), "shadow_erp": ("memory", "tryton"),
                   "store": ("memory", "rocksdb")}[str(info.field_name)]
        chosen = value.strip().lower()
        if chosen not in allowed:
            raise ConfigurationError(
                f"REVLINE_{str(info.field_name).upper()}={value!r} is not one of "
                f"{', '.join(allowed)}")
        return chosen

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        from revline.core.errors import ConfigurationError

        if self.kafka_sasl_password is not None and self.kafka_sasl_password_file is not None:
            raise ConfigurationError(
                "KAFKA_SASL_PASSWORD and KAFKA_SASL_PASSWORD_FILE are both set: keep one")
        # The files it names (properties, password, certificates) are checked by
        # revline.core.kafka_config.validate, which the command line calls once it has read the
        # settings, and every client build checks again: settings stay plain data.
        return self

    # Exception lifecycle (`revline exceptions run`).
    exception_check_interval_s: float = Field(
        default=5.0, description="How often the exception manager checks SLAs and expiry."
    )
    exceptions_metrics_port: int = Field(
        default=9103, description="/metrics of the exception manager; 0 = any."
    )

    # replay and re-drive (`revline replay`, `revline redrive`).
    redrive_log_topic: str = Field(
        default="revline.redrive-log.v1",
        description="Compacted: what re-drive did with each dead letter or exception (once each).",
    )

    # reconcile: `revline reconcile` and shadow mode (`revline shadow run|parity`).
    shadow_ledger_dsn: str | None = Field(
        default=None, description="The shadow sink's own ledger (SQLAlchemy URL)."
    )
    shadow_erp: str = Field(default="memory", description="The shadow sink's ERP: memory, tryton.")
    shadow_tryton_url: str | None = Field(
        default=None, description="trytond JSON-RPC root of the shadow ERP (shadow_erp=tryton)."
    )
    shadow_group: str | None = Field(default=None, description="Default: <app_id>-shadow-sink.")
    shadow_exceptions_topic: str = Field(
        default="revline.exceptions.shadow.v1",
        description="Where the shadow sink's refusals go: never the real exceptions topic.",
    )
    shadow_min_parity_pct: float = Field(
        default=99.5, description="`revline shadow parity` exits 1 below this."
    )
