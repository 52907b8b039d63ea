"""One frozen, validated settings object, read from PROFILESTREAM_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from handlers.errors import ConfigError
from handlers.significance import Thresholds

from .settings_file import SettingsFileSource

ENV_PREFIX = "PROFILESTREAM_"


class Settings(BaseSettings):
    """Every setting of the worker; the README's configuration table lists them."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    app_id: str = Field("profilestream", description="Kafka consumer group id and prefix of internal topics.")
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list of the Kafka brokers.")
    topic_posts: str = Field("posts", description="Input topic of post.v1 events.")
    topic_likes: str = Field("likes", description="Input topic of like.v1 events.")
    topic_follows: str = Field("follows", description="Input topic of follow.v1 events.")
    topic_users: str = Field("users", description="Input topic of user_deleted.v1 events, which erase a user's state and profiles.")
    topic_profiles: str = Field("profiles", description="Compacted output topic of profile.v1 documents.")
    topic_dead_letter: str = Field("profilestream-dead-letter", description="Topic for records that cannot be applied.")
    partitions: int = Field(4, ge=1, le=1024, description="Partitions of every topic the project creates; input topics must all have this count.")
    replication_factor: int = Field(1, ge=1, le=7, description="Replication factor of the topics the project creates.")
    kafka_session_timeout_s: float = Field(30.0, gt=0, description="Consumer group session timeout, in seconds.")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field("at_least_once", description="Faust's processing guarantee. Only at_least_once is supported: offsets are committed after the writes, and reprocessed events and profile writes are no-ops. exactly_once (Kafka transactions) is rejected, because with faust-streaming 0.15.3 a worker killed mid-replay lost state updates.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field("PLAINTEXT", description="Protocol of every Kafka connection: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT (SASL without TLS) or SASL_SSL (SASL over TLS).")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field("PLAIN", description="SASL mechanism with SASL_PLAINTEXT and SASL_SSL.")
    kafka_sasl_username: str | None = Field(None, description="SASL user name; required with SASL_PLAINTEXT and SASL_SSL.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password; required with SASL_PLAINTEXT and SASL_SSL.")
    kafka_ssl_cafile: str | None = Field(None, description="Path of a PEM file of CA certificates that verify the brokers with SSL and SASL_SSL; unset uses the system's CA certificates.")
    kafka_ssl_certfile: str | None = Field(None, description="Path of a PEM client certificate for TLS client authentication with SSL and SASL_SSL.")
    kafka_ssl_keyfile: str | None = Field(None, description="Path of the unencrypted PEM private key of PROFILESTREAM_KAFKA_SSL_CERTFILE; unset when the certificate file contains the key.")

    postgres_dsn: SecretStr | None = Field(None, description="Postgres connection string; unset disables the Postgres sink.")
    postgres_pool_max: int = Field(5, ge=1, le=100, description="Maximum connections in the Postgres pool.")
    postgres_acquire_timeout_s: float = Field(10.0, gt=0, description="Seconds to wait for a pooled connection.")
    postgres_sslmode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] | None = Field(None, description="TLS mode of the Postgres connections, with libpq's meanings; unset uses the DSN's sslmode, then PGSSLMODE, then prefer.")
    postgres_sslrootcert: str | None = Field(None, description="Path of a PEM file of CA certificates that verify the Postgres server; only with PROFILESTREAM_POSTGRES_SSLMODE verify-ca or verify-full.")

    llm_base_url: str | None = Field(None, description="Base URL of an OpenAI-compatible API; unset uses the rules generator only.")
    llm_api_key: SecretStr | None = Field(None, description="API key for the LLM endpoint.")
    llm_model: str | None = Field(None, description="Model name sent to the LLM endpoint.")
    llm_timeout_s: float = Field(30.0, gt=0, le=600, description="Total timeout of one model call, in seconds.")
    llm_max_retries: int = Field(2, ge=0, le=10, description="Retries of a failed model call.")
    ingest_batch_max: int = Field(500, ge=1, le=100_000, description="Maximum records the ingest agent processes as one batch.")
    ingest_batch_within_s: float = Field(0.2, gt=0, le=60, description="Seconds the ingest agent waits to fill a batch.")
    llm_max_concurrent_calls: int = Field(4, ge=1, le=256, description="Model calls in flight at the same time in one worker; later calls wait for a slot.")
    llm_circuit_failure_threshold: int = Field(5, ge=1, le=1000, description="Failed model calls in a row (timeout, server error, connection error, rate limited after retries) that open the circuit breaker; quota exhaustion opens it at once.")
    llm_circuit_cooldown_s: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False, description="Seconds the open circuit breaker waits before one probe call; doubled after each failed probe.")
    llm_circuit_max_cooldown_s: float = Field(600.0, gt=0, le=86400, allow_inf_nan=False, description="Maximum open period of the circuit breaker, in seconds.")
    llm_requests_per_minute: int | None = Field(None, ge=1, description="Client-side limit of model requests, retries included, per 60 s window; unset means no limit.")
    llm_tokens_per_minute: int | None = Field(None, ge=1, description="Client-side limit of model tokens per 60 s window, estimated before each request and corrected with the reported usage; unset means no limit.")
    llm_tokens_per_day: int | None = Field(None, ge=1, description="Client-side limit of model tokens per UTC day; unset means no limit.")
    llm_prompt_price_per_1k_usd: float = Field(0.0, ge=0, allow_inf_nan=False, description="Price of 1000 prompt tokens in US dollars, for the estimated cost metric.")
    llm_completion_price_per_1k_usd: float = Field(0.0, ge=0, allow_inf_nan=False, description="Price of 1000 completion tokens in US dollars, for the estimated cost metric.")
    generation_concurrency: int = Field(4, ge=1, le=256, description="Profiles generated at the same time by one worker.")
    generation_budget_per_minute: int = Field(0, ge=0, description="Maximum profiles generated per minute by one worker; 0 means no limit.")
    profile_language: Literal["en", "zh"] = Field("en", description="Language of the profile summary.")

    max_future_s: float = Field(600.0, ge=0, description="Events stamped further ahead of the clock than this are dead-lettered.")
    max_event_bytes: int = Field(256 * 1024, ge=1024, description="Largest input record value, in bytes; a larger record is dead-lettered as oversized without being parsed.")
    interest_half_life_s: float = Field(30 * 24 * 3600.0, gt=0, description="Half-life of interest weights, in seconds of event time.")
    interest_short_half_life_s: float = Field(7 * 24 * 3600.0, gt=0, allow_inf_nan=False, description="Half-life of the short-scale interest weights (recent_interests in the generation request), in seconds of event time.")
    post_index_retention_s: float = Field(90 * 24 * 3600.0, gt=0, allow_inf_nan=False, description="Seconds of event time the post index keeps a post's topics; a like of an older post adds no topics to the liker's interests.")
    min_events_new_user: int = Field(10, ge=1, description="Events a new user needs before the first profile.")
    interest_drift: float = Field(0.2, gt=0, le=1, description="Interest drift (1 - cosine) that triggers a new profile.")
    cooldown_s: float = Field(7 * 24 * 3600.0, ge=0, description="Minimum event time between two profiles of a user, in seconds.")
    new_content_events: int = Field(50, ge=1, description="New events since the last profile that trigger a new one.")
    stale_after_s: float = Field(90 * 24 * 3600.0, gt=0, description="Event time after which any change triggers a new profile.")
    drift_hysteresis: float = Field(0.05, ge=0, lt=1, description="Drift margin below PROFILESTREAM_INTEREST_DRIFT that keeps an armed trigger armed.")

    watchdog_stall_s: float = Field(120.0, gt=0, le=86400, allow_inf_nan=False, description="Seconds an input partition with lag may go without its committed offset advancing before /readyz reports the consumer stalled.")
    shutdown_timeout_s: float = Field(45.0, gt=0, le=3600, allow_inf_nan=False, description="Seconds the worker may take to stop after SIGTERM or SIGINT; then it logs worker.shutdown_timed_out and exits with status 1, and records not committed yet are processed again after the restart. Keep it below the orchestrator's grace period (60 s in deploy/).")
    watchdog_exit_after_s: float = Field(0.0, ge=0, le=86400, allow_inf_nan=False, description="Seconds a stall reported by the watchdog may last before the worker exits with code 3 for its supervisor to restart it; 0 never exits.")
    log_format: Literal["console", "json"] = Field("console", description="Log line format: console (readable key=value lines) or json (one JSON object per line).")
    log_repeats_per_minute: int = Field(10, ge=1, le=100_000, description="Identical log messages (same logger and message template) written per minute; later repeats are dropped and counted in the next line's suppressed field. The erasure audit events are never dropped.")

    http_host: str = Field("127.0.0.1", description="Address of the worker's HTTP server (/metrics, /healthz, /readyz).")
    http_port: int = Field(6066, ge=0, le=65535, description="Port of the worker's HTTP server (/metrics, /healthz, /readyz).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level of the worker.")
    data_dir: str = Field(".profilestream-data", description="Folder for the worker's local files.")
    settings_file: str | None = Field(None, description="Path of a .env file (PROFILESTREAM_* lines) or a .toml file (setting names without the prefix, in lower case) read before the environment; environment variables win.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Arguments win over the environment, and the environment over the settings file.
        return init_settings, env_settings, SettingsFileSource(settings_cls, init_settings.init_kwargs)

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", "postgres_sslrootcert", "settings_file")
    @classmethod
    def _check_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"file {value} not found; set {ENV_PREFIX}{info.field_name.upper()} to the path of an existing file")
        return value

    @field_validator("processing_guarantee")
    @classmethod
    def _check_processing_guarantee(cls, value: str) -> str:
        if value == "exactly_once":
            # NOTE: tried with faust-streaming 0.15.3, aiokafka 0.14.0 and Kafka 4.4. After a SIGKILL mid-replay,
            # 5 of 10 runs committed input offsets whose state changelog records were lost (events_applied below a
            # clean run's). Commit markers also keep the group lag at 1 in each partition a transaction wrote.
            raise ValueError(
                "exactly_once is not supported: Faust's Kafka transactions lost state updates when a worker was killed;"
                " use at_least_once, whose idempotent state and sinks make reprocessing after a crash harmless"
            )
        return value

    @model_validator(mode="after")
    def _check_llm(self) -> Settings:
        if self.llm_base_url and not self.llm_model:
            raise ValueError(f"{ENV_PREFIX}LLM_BASE_URL is set but {ENV_PREFIX}LLM_MODEL is not; set the model name too")
        if self.llm_model and not self.llm_base_url:
            raise ValueError(f"{ENV_PREFIX}LLM_MODEL is set but {ENV_PREFIX}LLM_BASE_URL is not; set the endpoint too")
        if self.llm_circuit_max_cooldown_s < self.llm_circuit_cooldown_s:
            raise ValueError(
                f"{ENV_PREFIX}LLM_CIRCUIT_MAX_COOLDOWN_S={self.llm_circuit_max_cooldown_s} is below"
                f" {ENV_PREFIX}LLM_CIRCUIT_COOLDOWN_S={self.llm_circuit_cooldown_s}; raise the maximum or lower the cool-down"
            )
        return self

    @model_validator(mode="after")
    def _check_kafka_security(self) -> Settings:
        protocol = self.kafka_security_protocol
        credentials = {"KAFKA_SASL_USERNAME": self.kafka_sasl_username, "KAFKA_SASL_PASSWORD": self.kafka_sasl_password}
        files = {"KAFKA_SSL_CAFILE": self.kafka_ssl_cafile, "KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
                 "KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile}
        if protocol.startswith("SASL_"):
            missing = [f"{ENV_PREFIX}{name}" for name, value in credentials.items() if not _is_set(value)]
            if missing:
                raise ValueError(
                    f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL={protocol} needs {ENV_PREFIX}KAFKA_SASL_USERNAME and"
                    f" {ENV_PREFIX}KAFKA_SASL_PASSWORD; set {' and '.join(missing)}"
                )
        else:
            stray = [f"{ENV_PREFIX}{name}" for name, value in credentials.items() if _is_set(value)]
            if stray:
                raise ValueError(
                    f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL={protocol} sends no SASL credentials, but"
                    f" {' and '.join(stray)} {'is' if len(stray) == 1 else 'are'} set; set the protocol to"
                    " SASL_PLAINTEXT or SASL_SSL, or unset the credentials"
                )
        if protocol not in ("SSL", "SASL_SSL"):
            stray = [f"{ENV_PREFIX}{name}" for name, value in files.items() if value is not None]
            if stray:
                raise ValueError(
                    f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL={protocol} uses no TLS, but {', '.join(stray)}"
                    f" {'is' if len(stray) == 1 else 'are'} set; set the protocol to SSL or SASL_SSL, or unset the files"
                )
        if self.kafka_ssl_keyfile is not None and self.kafka_ssl_certfile is None:
            raise ValueError(
                f"{ENV_PREFIX}KAFKA_SSL_KEYFILE is set but {ENV_PREFIX}KAFKA_SSL_CERTFILE is not;"
                " set the client certificate too, or unset the key"
            )
        return self

    @model_validator(mode="after")
    def _check_postgres_tls(self) -> Settings:
        if self.postgres_sslrootcert is not None and self.postgres_sslmode not in ("verify-ca", "verify-full"):
            raise ValueError(
                f"{ENV_PREFIX}POSTGRES_SSLROOTCERT is set but {ENV_PREFIX}POSTGRES_SSLMODE is {self.postgres_sslmode or 'unset'},"
                " which verifies no server certificate; set the mode to verify-ca or verify-full, or unset the file"
            )
        return self

    @property
    def input_topics(self) -> dict[str, str]:
        """Map each input topic name to the event kind it carries."""
        return {self.topic_posts: "post", self.topic_likes: "like", self.topic_follows: "follow", self.topic_users: "user_deleted"}

    @property
    def topic_audience(self) -> str:
        return f"{self.app_id}-audience"

    @property
    def topic_post_index(self) -> str:
        return f"{self.app_id}-post-index"

    @property
    def topic_regenerate(self) -> str:
        return f"{self.app_id}-regenerate"

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(
            min_events_new_user=self.min_events_new_user,
            interest_drift=self.interest_drift,
            cooldown_s=self.cooldown_s,
            new_content_events=self.new_content_events,
            stale_after_s=self.stale_after_s,
            drift_hysteresis=self.drift_hysteresis,
        )


def _is_set(value: str | SecretStr | None) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return bool(value)


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning validation errors into one ConfigError naming each variable."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(name for name in os.environ if name.startswith(ENV_PREFIX) and name not in known)
    # Test-only variables of the test suite share the prefix.
    unknown = [name for name in unknown if not name.startswith(f"{ENV_PREFIX}TEST_") and name != f"{ENV_PREFIX}CACHE_DIR"]
    if unknown:
        raise ConfigError(f"unknown setting {', '.join(unknown)}; check the spelling against the README's configuration table")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
            value = error.get("input")
            # A model-level error (no field) has every input as its value, secrets included.
            hidden = not field or any(word in field for word in ("secret", "key", "dsn", "password"))
            shown = "" if hidden else f" (got {value!r})"
            problems.append(f"{name}: {error['msg']}{shown}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def settings_environment(settings: Settings) -> dict[str, str]:
    """Return the PROFILESTREAM_* variables that load `settings` again in a child process.

    Unset optional fields are left out, and so is `settings_file`, because `settings` already
    contains the file's values.
    """
    environment = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None or name == "settings_file":
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        environment[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    return environment


def settings_table() -> str:
    """Render the README's configuration table from the settings' fields."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None else f"`{default}`"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)
