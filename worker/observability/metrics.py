"""Prometheus metrics for the worker, on prometheus_client with a registry of its own.

Tenant labels are bounded by the allow-list (ALLOWED_TENANT_IDS): a command for any other
tenant is counted under `tenant="other"`.

Each `Metrics` has its own `CollectorRegistry` (tests build many in one process), holding the
worker's counters, histograms and gauges, the process, GC and platform collectors, and
`invite_worker_build_info`. Histograms carry the trace id of the span recorded at the time as
an exemplar (exposed in OpenMetrics only), so that a slow bucket leads to a trace. The small
classes here keep the call sites short
(`metrics.throttled.inc(tenant)`) and give tests a `value()` to read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.openmetrics import exposition as openmetrics

from worker import __version__
from worker.observability.tracing import recording_trace_id

#: Seconds; from a fast local answer to Graph's slowest acceptable one.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PROMETHEUS_CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
OPENMETRICS_CONTENT_TYPE = openmetrics.CONTENT_TYPE_LATEST

# `_created` series double every counter's exposition and no dashboard here reads them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class _Metric:
    """One metric of the registry; the label values are given positionally."""

    _metric: Any

    def __init__(self, name: str, label_names: Sequence[str], registry: CollectorRegistry):
        self.name = name
        self._labels = tuple(label_names)
        self._registry = registry
        #: prometheus_client's child of each label tuple, looked up there once: its `labels()`
        #: takes a lock and checks the values on every call.
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, labels: tuple[str, ...]) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._metric.labels(*labels) if labels else self._metric
            self._children[labels] = child
        return child

    def _sample(self, name: str, labels: tuple[str, ...]) -> float:
        labelled = dict(zip(self._labels, labels, strict=True))
        return self._registry.get_sample_value(name, labelled) or 0.0


class Counter(_Metric):
    """A counter, with or without labels; `name` ends in `_total` as exposed."""

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name, label_names, registry)
        self._metric = prometheus_client.Counter(
            name.removesuffix("_total"), help_text, self._labels, registry=registry
        )

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self._child(labels).inc(amount)

    def value(self, *labels: str) -> float:
        return self._sample(self.name, labels)


class Histogram(_Metric):
    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, label_names, registry)
        self._metric = prometheus_client.Histogram(
            name, help_text, self._labels, registry=registry, buckets=buckets
        )

    def observe(self, value: float, *labels: str) -> None:
        """Observe `value`; while a span is recorded, with its trace id as the exemplar."""
        trace_id = recording_trace_id()
        self._child(labels).observe(value, exemplar={"trace_id": trace_id} if trace_id else None)

    def count(self, *labels: str) -> int:
        return int(self._sample(f"{self.name}_count", labels))


class Metrics:
    """Every metric the worker exports; one instance per process, made at start-up."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        PlatformCollector(registry=registry)
        prometheus_client.Info(
            "invite_worker_build", "The worker's version.", registry=registry
        ).info({"version": __version__})
        self.commands_received = Counter(
            "invite_commands_received_total",
            "Command messages delivered to this worker.",
            registry=registry,
        )
        self.outcomes = Counter(
            "invite_outcomes_total",
            "Outcome events confirmed by the broker, by outcome and tenant.",
            ("outcome", "tenant"),
            registry=registry,
        )
        self.graph_requests = Counter(
            "invite_graph_requests_total",
            "Graph invite requests by HTTP status ('none' when no answer came) and tenant.",
            ("status", "tenant"),
            registry=registry,
        )
        self.graph_latency = Histogram(
            "invite_graph_request_duration_seconds",
            "Time from sending an invite to Graph's answer.",
            registry=registry,
        )
        self.rate_limit_wait = Histogram(
            "invite_rate_limiter_wait_seconds",
            "Time a request waited for its tenant's rate limit.",
            registry=registry,
        )
        self.throttled = Counter(
            "invite_graph_throttled_total",
            "Graph answers with status 429 Too Many Requests, by tenant.",
            ("tenant",),
            registry=registry,
        )
        self.retry_after = Counter(
            "invite_graph_retry_after_seconds_total",
            "Sum of the Retry-After seconds Graph asked for.",
            registry=registry,
        )
        self.token_acquisitions = Counter(
            "invite_token_acquisitions_total",
            "Token requests sent to Entra ID (not served from cache), by result and tenant.",
            ("result", "tenant"),
            registry=registry,
        )
        self.retries_scheduled = Counter(
            "invite_retries_scheduled_total",
            "Graph requests scheduled for another attempt, by where: in the process, or a "
            "delayed copy published to a delay queue (broker).",
            ("where",),
            registry=registry,
        )
        self.dead_lettered = Counter(
            "invite_dead_lettered_total",
            "Commands sent to the dead-letter queue, by reason.",
            ("reason",),
            registry=registry,
        )
        self.broker_reconnects = Counter(
            "invite_broker_reconnects_total",
            "Times the broker connection was re-established.",
            registry=registry,
        )
        self.outcome_publish_failures = Counter(
            "invite_outcome_publish_failures_total",
            "Outcome events the broker did not confirm.",
            registry=registry,
        )
        self.commands_crashed = Counter(
            "invite_commands_crashed_total",
            "Unexpected exceptions while handling or settling a command, by stage.",
            ("stage",),
            registry=registry,
        )
        self.commands_abandoned = Counter(
            "invite_commands_abandoned_total",
            "Commands whose delivery was lost with its channel, abandoned unpublished; "
            "'kept' when Graph had answered and the outcome waits for the redelivery.",
            ("outcome",),
            registry=registry,
        )

        self.redis_calls = Counter(
            "invite_redis_calls_total",
            "Calls to the fleet's shared state (Redis), by operation; the calls made while "
            "Redis answers one pipeline share the next round trip.",
            ("operation",),
            registry=registry,
        )
        self.redis_round_trips = Counter(
            "invite_redis_round_trips_total",
            "Round trips to the fleet's shared state (Redis): pipelines of calls, lease renewals.",
            registry=registry,
        )
        self.redis_errors = Counter(
            "invite_redis_errors_total",
            "Shared-state operations that failed (Redis unreachable or failing), by operation.",
            ("operation",),
            registry=registry,
        )

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Export a value read from live state when scraped (in-flight requests, readiness)."""
        prometheus_client.Gauge(name, help_text, registry=self.registry).set_function(read)

    def render(self) -> str:
        """The Prometheus text exposition."""
        return prometheus_client.generate_latest(self.registry).decode()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type for a scrape: OpenMetrics when the scraper asks for it."""
        if accept and "application/openmetrics-text" in accept:
            body = openmetrics.generate_latest(self.registry)  # type: ignore[no-untyped-call]
            return body, OPENMETRICS_CONTENT_TYPE
        return prometheus_client.generate_latest(self.registry), PROMETHEUS_CONTENT_TYPE
