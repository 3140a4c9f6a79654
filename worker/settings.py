"""The worker's configuration: one object, read from the environment once at start-up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.core.commands import UUID

#: Hosts of Microsoft's own Entra ID clouds; any other authority host (a sovereign cloud
#: reached through a custom name, the simulator) needs MSAL's instance discovery turned off.
MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.microsoft.com",
        "login.windows.net",
        "login.partner.microsoftonline.cn",
    }
)

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


class Settings(BaseSettings):
    """Every setting the worker reads; each has a default that works on a developer's machine."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # --- RabbitMQ -------------------------------------------------------------------------
    amqp_url: SecretStr = Field(
        SecretStr("amqp://guest:guest@127.0.0.1:5672/"), validation_alias="AMQP_URL"
    )
    command_queue: str = Field("invite.commands", validation_alias="COMMAND_QUEUE")
    outcome_exchange: str = Field("invite.outcomes", validation_alias="OUTCOME_EXCHANGE")
    #: Declare the queues and exchanges at start-up (false: the platform provisions them and
    #: the worker only checks, passively, that each exists; it needs no configure permission).
    declare_topology: bool = Field(True, validation_alias="DECLARE_TOPOLOGY")
    #: Quorum-queue delivery limit: a command redelivered more often is dead-lettered.
    delivery_limit: int = Field(20, ge=1, le=1000, validation_alias="COMMAND_DELIVERY_LIMIT")
    #: Largest command body accepted; bigger ones are rejected unread.
    max_command_bytes: int = Field(
        65_536, ge=1024, le=16 * 1024 * 1024, validation_alias="MAX_COMMAND_BYTES"
    )

    # --- Microsoft Graph ------------------------------------------------------------------
    graph_base_url: str = Field(
        "https://graph.microsoft.com/v1.0", validation_alias="GRAPH_BASE_URL"
    )
    #: Graph requests in flight at once in one worker process; the AMQP prefetch follows it.
    graph_max_in_flight: int = Field(32, ge=1, le=1024, validation_alias="GRAPH_MAX_IN_FLIGHT")
    #: Invite requests per tenant in any one-second window, per worker process.
    graph_tenant_rate_limit: int = Field(
        100, ge=1, le=3000, validation_alias="GRAPH_TENANT_RATE_LIMIT"
    )
    #: Per-tenant overrides of GRAPH_TENANT_RATE_LIMIT, as JSON: {"<tenant id>": 50, ...}.
    tenant_rate_limits: dict[str, Annotated[int, Field(ge=1, le=3000)]] = Field(
        default_factory=dict, validation_alias="TENANT_RATE_LIMITS"
    )
    #: Largest share of GRAPH_MAX_IN_FLIGHT one tenant may hold while other tenants wait.
    tenant_max_in_flight_share: float = Field(
        0.5, gt=0, le=1, validation_alias="TENANT_MAX_IN_FLIGHT_SHARE"
    )
    #: What carries Graph requests under httpx: aiohttp's pool (the default, faster with many
    #: connections) or httpx's own (httpcore).
    graph_http_transport: Literal["aiohttp", "httpcore"] = Field(
        "aiohttp", validation_alias="GRAPH_HTTP_TRANSPORT"
    )
    #: Seconds to connect to Graph, and to wait for its answer once the request is sent.
    graph_connect_timeout: float = Field(5.0, gt=0, validation_alias="GRAPH_CONNECT_TIMEOUT")
    graph_read_timeout: float = Field(15.0, gt=0, validation_alias="GRAPH_READ_TIMEOUT")

    # --- Entra ID (the Azure SDK's own variable names) ------------------------------------
    azure_tenant_id: str = Field(
        "00000000-0000-0000-0000-000000000000", validation_alias="AZURE_TENANT_ID"
    )
    #: Tenants served, comma-separated; commands for any other are rejected without a token
    #: request. Empty: AZURE_TENANT_ID alone.
    allowed_tenant_ids: Annotated[tuple[str, ...], NoDecode] = Field(
        (), validation_alias="ALLOWED_TENANT_IDS"
    )
    #: Seconds a tenant's refused token request (consent revoked, bad credential) is
    #: remembered, so that its commands fail at once instead of asking Entra ID each time.
    token_failure_backoff: float = Field(30.0, ge=0, validation_alias="TOKEN_FAILURE_BACKOFF")
    azure_client_id: str = Field(
        "00000000-0000-0000-0000-000000000000", validation_alias="AZURE_CLIENT_ID"
    )
    azure_client_secret: SecretStr | None = Field(None, validation_alias="AZURE_CLIENT_SECRET")
    azure_client_certificate_path: Path | None = Field(
        None, validation_alias="AZURE_CLIENT_CERTIFICATE_PATH"
    )
    azure_client_certificate_password: SecretStr | None = Field(
        None, validation_alias="AZURE_CLIENT_CERTIFICATE_PASSWORD"
    )
    azure_authority_host: str = Field(
        "https://login.microsoftonline.com", validation_alias="AZURE_AUTHORITY_HOST"
    )

    # --- TLS trust: the standard variables, read here so that nothing else reads them -----
    ssl_cert_file: Path | None = Field(None, validation_alias="SSL_CERT_FILE")
    requests_ca_bundle: Path | None = Field(None, validation_alias="REQUESTS_CA_BUNDLE")

    # --- Retries, poison messages, the circuit breaker -------------------------------------
    #: Graph requests per command that could have had an effect, the first included (429, 503
    #: and 509 answers are not counted); also token requests per command while Entra ID fails.
    retry_max_attempts: int = Field(5, ge=1, le=50, validation_alias="RETRY_MAX_ATTEMPTS")
    #: Seconds from a command's first delivery after which no new attempt starts.
    retry_max_elapsed: float = Field(120.0, gt=0, validation_alias="RETRY_MAX_ELAPSED")
    retry_base_delay: float = Field(0.5, gt=0, validation_alias="RETRY_BASE_DELAY")
    retry_max_delay: float = Field(30.0, gt=0, validation_alias="RETRY_MAX_DELAY")
    #: Waits up to this many seconds happen in the process; longer ones in a delay queue.
    retry_in_process_max: float = Field(2.0, ge=0, validation_alias="RETRY_IN_PROCESS_MAX")
    #: Retry a request after which Graph may have acted: sent without an answer, or 500/502/504.
    retry_ambiguous: bool = Field(False, validation_alias="RETRY_AMBIGUOUS")
    #: Redeliveries after which a command is treated as poison: failed and dead-lettered.
    max_redeliveries: int = Field(5, ge=1, le=100, validation_alias="COMMAND_MAX_REDELIVERIES")
    #: Settled commandIds remembered so that a redelivery does not call Graph again.
    settled_memory: int = Field(10_000, ge=0, validation_alias="SETTLED_MEMORY")
    #: Transient Graph failures in a row that open the circuit (stop consuming).
    circuit_failure_threshold: int = Field(5, ge=1, validation_alias="CIRCUIT_FAILURE_THRESHOLD")
    circuit_open_seconds: float = Field(5.0, gt=0, validation_alias="CIRCUIT_OPEN_SECONDS")
    circuit_max_open_seconds: float = Field(60.0, gt=0, validation_alias="CIRCUIT_MAX_OPEN_SECONDS")

    # --- The fleet's shared state (optional) ----------------------------------------------
    #: Redis for state shared by every worker process: one Graph call per commandId across
    #: the fleet, fleet-wide tenant budgets and 429 pauses. Unset: each process on its own.
    #: `rediss://` for TLS; the password goes in the URL (it is kept out of log lines).
    redis_url: SecretStr | None = Field(None, validation_alias="REDIS_URL")
    #: Prefix of every key the worker writes, so that fleets (or tests) can share a Redis.
    redis_key_prefix: str = Field(
        "invite-worker:", min_length=1, validation_alias="REDIS_KEY_PREFIX"
    )
    #: Seconds an idempotency record is kept after its command was last handled.
    idempotency_ttl: float = Field(86_400.0, ge=60, validation_alias="IDEMPOTENCY_TTL")
    #: Seconds a process's lease on the commands it holds outlives its last renewal (renewed
    #: every third of it): how long after a process died its commands wait for it.
    redis_lease: float = Field(15.0, ge=1, le=300, validation_alias="REDIS_LEASE")
    #: Seconds of each Redis call before Redis counts as away.
    redis_timeout: float = Field(2.0, gt=0, le=30, validation_alias="REDIS_TIMEOUT")

    # --- Process --------------------------------------------------------------------------
    #: Port of /healthz, /readyz and /metrics (0: no health server).
    health_port: int = Field(8080, ge=0, le=65535, validation_alias="HEALTH_PORT")
    #: Seconds that in-flight commands get to finish after SIGTERM.
    shutdown_grace_period: float = Field(25.0, ge=0, validation_alias="SHUTDOWN_GRACE_PERIOD")
    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")
    #: "json", "console", or "auto" (console on a terminal, JSON otherwise).
    log_format: str = Field("auto", validation_alias="LOG_FORMAT")
    #: The asyncio event loop: "uvloop" (libuv; the default) or "asyncio" (the standard one).
    event_loop: Literal["uvloop", "asyncio"] = Field("uvloop", validation_alias="EVENT_LOOP")
    #: CloudEvents `source` of every outcome event.
    event_source: str = Field("urn:invite-worker", validation_alias="EVENT_SOURCE")

    # --- Tracing: OpenTelemetry's own variables -------------------------------------------
    # These decide whether traces are exported at all; the SDK reads the others itself
    # (OTEL_TRACES_SAMPLER[_ARG], OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS, ...).
    #: The service's name in traces and log lines.
    otel_service_name: str = Field(
        "invite-worker", min_length=1, validation_alias="OTEL_SERVICE_NAME"
    )
    #: "otlp" or "none"; unset: OTLP when an endpoint is set, otherwise no tracing.
    otel_traces_exporter: Literal["", "otlp", "none"] = Field(
        "", validation_alias="OTEL_TRACES_EXPORTER"
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        None, validation_alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    #: Only OTLP over HTTP with protobuf bodies is installed (no gRPC).
    otel_exporter_otlp_protocol: Literal["http/protobuf"] = Field(
        "http/protobuf", validation_alias="OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    otel_exporter_otlp_traces_protocol: Literal["http/protobuf"] | None = Field(
        None, validation_alias="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    )
    otel_sdk_disabled: bool = Field(False, validation_alias="OTEL_SDK_DISABLED")

    @field_validator("command_queue", "outcome_exchange")
    @classmethod
    def _amqp_name(cls, value: str) -> str:
        if not _QUEUE_NAME.fullmatch(value):
            raise ValueError("use letters, digits and . _ : - only (at most 200)")
        return value

    @field_validator("graph_base_url", "azure_authority_host")
    @classmethod
    def _https_url(cls, value: str) -> str:
        if urlsplit(value).scheme != "https":
            raise ValueError("must be an https URL")
        return value.rstrip("/")

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in {"json", "console", "auto"}:
            raise ValueError("must be json, console or auto")
        return value

    @field_validator("allowed_tenant_ids", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("allowed_tenant_ids")
    @classmethod
    def _tenant_uuids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for tenant in value:
            if not UUID.fullmatch(tenant):
                raise ValueError("tenant ids must be UUIDs")
        return tuple(tenant.lower() for tenant in value)

    @field_validator("tenant_rate_limits")
    @classmethod
    def _tenant_keys(cls, value: dict[str, int]) -> dict[str, int]:
        if not all(UUID.fullmatch(tenant) for tenant in value):
            raise ValueError("keys must be tenant ids (UUIDs)")
        return {tenant.lower(): limit for tenant, limit in value.items()}

    @property
    def served_tenants(self) -> frozenset[str]:
        """The allow-list: ALLOWED_TENANT_IDS, or AZURE_TENANT_ID alone."""
        return frozenset(self.allowed_tenant_ids or (self.azure_tenant_id.lower(),))

    @model_validator(mode="after")
    def _one_credential(self) -> Settings:
        if self.azure_client_secret is not None and self.azure_client_certificate_path:
            raise ValueError("set AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH, not both")
        return self

    def delay_queue(self, seconds: int) -> str:
        """The delay queue that returns commands to the command queue after `seconds`."""
        return f"{self.command_queue}.delay.{seconds}s"

    @property
    def tracing_enabled(self) -> bool:
        """Whether spans are exported: an OTLP exporter is configured and the SDK not disabled."""
        if self.otel_sdk_disabled or self.otel_traces_exporter == "none":
            return False
        return self.otel_traces_exporter == "otlp" or bool(
            self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint
        )

    @property
    def otel_traces_url(self) -> str | None:
        """Where spans go: the traces endpoint as given, or `/v1/traces` under the base one
        (None: the exporter's default, http://localhost:4318/v1/traces)."""
        if self.otel_exporter_otlp_traces_endpoint:
            return self.otel_exporter_otlp_traces_endpoint
        if self.otel_exporter_otlp_endpoint:
            return self.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        return None

    @property
    def prefetch_count(self) -> int:
        """Unacknowledged commands the broker hands this process.

        Twice the in-flight limit: every Graph slot has a command ready behind it, while the
        backlog stays in the broker, where other pods can take it.
        """
        return 2 * self.graph_max_in_flight

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.command_queue}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.command_queue}.dead"

    @property
    def unrouted_outcome_queue(self) -> str:
        """Where outcomes that match no binding are kept instead of being dropped."""
        return f"{self.outcome_exchange}.unrouted"

    @property
    def authority_is_microsoft(self) -> bool:
        return urlsplit(self.azure_authority_host).hostname in MICROSOFT_AUTHORITY_HOSTS

    @property
    def graph_ca_file(self) -> Path | None:
        """The CA bundle that Graph's certificate must chain to (None: the system's)."""
        return self.ssl_cert_file

    @property
    def token_ca_file(self) -> Path | None:
        """The CA bundle for Entra ID, as `requests` would choose it."""
        return self.requests_ca_bundle or self.ssl_cert_file

    def redacted_redis_url(self) -> str | None:
        """The Redis URL without its password, for log lines."""
        if self.redis_url is None:
            return None
        parts = urlsplit(self.redis_url.get_secret_value())
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        user = "***@" if parts.password else ""
        return urlunsplit((parts.scheme, user + host, parts.path, "", ""))

    def redacted_amqp_url(self) -> str:
        """The broker URL without its password, for log lines."""
        parts = urlsplit(self.amqp_url.get_secret_value())
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        user = f"{parts.username}:***@" if parts.username else ""
        return urlunsplit((parts.scheme, user + host, parts.path, "", ""))
