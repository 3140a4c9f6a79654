"""Prometheus metrics: a few counters, gauges and histograms, rendered in the text format.

Tenant labels are bounded by the allow-list (ALLOWED_TENANT_IDS): a command for any other
tenant is counted under `tenant="other"`.

Kept to what the worker needs instead of a client library: updates are plain dict
arithmetic on the event loop (no locks; every update happens on the loop's thread), and
rendering happens only when `/metrics` is scraped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

Labels = tuple[str, ...]

#: Seconds; from a fast local answer to Graph's slowest acceptable one.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Labels, extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass
class Counter:
    name: str
    help: str
    label_names: tuple[str, ...] = ()
    values: dict[Labels, float] = field(default_factory=dict)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


@dataclass
class Gauge:
    """A value read when scraped, from a function of the live state."""

    name: str
    help: str
    read: Callable[[], float]

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {_number(self.read())}"


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    label_names: tuple[str, ...] = ()
    counts: dict[Labels, list[int]] = field(default_factory=dict)
    sums: dict[Labels, float] = field(default_factory=dict)

    def observe(self, value: float, *labels: str) -> None:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.buckets) + 1)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self.sums[labels] = self.sums.get(labels, 0.0) + value

    def count(self, *labels: str) -> int:
        return sum(self.counts.get(labels, ()))

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for labels, counts in sorted(self.counts.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                le = 'le="' + _number(bound) + '"'
                yield f"{self.name}_bucket{_labels(self.label_names, labels, le)} {cumulative}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {_number(self.sums[labels])}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {cumulative}"


class Metrics:
    """Every metric the worker exports; one instance per process, made at start-up."""

    def __init__(self) -> None:
        self.commands_received = Counter(
            "invite_commands_received_total", "Command messages delivered to this worker."
        )
        self.outcomes = Counter(
            "invite_outcomes_total",
            "Outcome events confirmed by the broker, by outcome and tenant.",
            ("outcome", "tenant"),
        )
        self.graph_requests = Counter(
            "invite_graph_requests_total",
            "Graph invite requests by HTTP status ('none' when no answer came) and tenant.",
            ("status", "tenant"),
        )
        self.graph_latency = Histogram(
            "invite_graph_request_duration_seconds",
            "Time from sending an invite to Graph's answer.",
        )
        self.rate_limit_wait = Histogram(
            "invite_rate_limiter_wait_seconds",
            "Time a request waited for its tenant's rate limit.",
        )
        self.throttled = Counter(
            "invite_graph_throttled_total",
            "Graph answers with status 429 Too Many Requests, by tenant.",
            ("tenant",),
        )
        self.retry_after = Counter(
            "invite_graph_retry_after_seconds_total",
            "Sum of the Retry-After seconds Graph asked for.",
        )
        self.token_acquisitions = Counter(
            "invite_token_acquisitions_total",
            "Token requests sent to Entra ID (not served from cache), by result and tenant.",
            ("result", "tenant"),
        )
        self.retries_scheduled = Counter(
            "invite_retries_scheduled_total",
            "Graph requests scheduled for another attempt, by where.",
            ("where",),
        )
        self.dead_lettered = Counter(
            "invite_dead_lettered_total",
            "Commands sent to the dead-letter queue, by reason.",
            ("reason",),
        )
        self.broker_reconnects = Counter(
            "invite_broker_reconnects_total", "Times the broker connection was re-established."
        )
        self.outcome_publish_failures = Counter(
            "invite_outcome_publish_failures_total", "Outcome events the broker did not confirm."
        )
        self.commands_abandoned = Counter(
            "invite_commands_abandoned_total",
            "Commands whose delivery was lost with its channel, abandoned unpublished; "
            "'kept' when Graph had answered and the outcome waits for the redelivery.",
            ("outcome",),
        )
        self._gauges: list[Gauge] = []

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Export a value read from live state when scraped (in-flight requests, readiness)."""
        self._gauges.append(Gauge(name, help_text, read))

    def render(self) -> str:
        metrics: list[Counter | Histogram | Gauge] = [
            value for value in vars(self).values() if isinstance(value, Counter | Histogram)
        ]
        metrics.extend(self._gauges)
        lines = [line for metric in metrics for line in metric.render()]
        return "\n".join(lines) + "\n"
