"""Tracing: OpenTelemetry's SDK from the standard OTEL_* variables, W3C Trace Context in headers.

`configure` builds a `TracerProvider` (batching, OTLP over HTTP/protobuf) only when an exporter
is configured; otherwise the worker keeps the API's no-op tracer, whose spans only carry the
incoming context along (an upstream's `traceparent` still reaches the outcome event and the log
lines) and record nothing. The SDK reads its own variables (sampler, resource attributes,
exporter endpoint, headers, timeouts, batching) itself.

Context travels in AMQP headers with OpenTelemetry's `TraceContextTextMapPropagator`; the
getter here is the only part written by hand, because no library reads aio-pika's header
tables, whose values arrive as `str` or `bytes` (and, from an untrusted publisher, as anything).
A malformed `traceparent` is ignored: the command starts a trace of its own.

The instrumentation libraries are not used: aio-pika's would end the consume span when its
callback returns, which the consumer makes as soon as the command's own task has started, and
the spans of the Graph request want the handler's attempt count and Graph's ids. The command's
span is opened where the command is handled (`worker.amqp.consumer`).

`traced` opens a span that records an error by its type only: exception messages can carry
what a span must never hold (Graph's error text may echo a participant).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACER_NAME = "invite-worker"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: On a delayed-retry copy: the `traceparent` of the attempt that published it, which the
#: next attempt's span links to (the copy's own `traceparent` stays the command's parent).
PREVIOUS_ATTEMPT_HEADER = "x-invite-previous-attempt"
#: Seconds a stopping worker waits for its last spans to be exported.
FLUSH_SECONDS = 5.0
#: Longer header values are not read: W3C's own limit for `traceparent` is far below this.
_MAX_HEADER = 512

PROPAGATOR = TraceContextTextMapPropagator()
NO_TRACER: Tracer = trace.NoOpTracer()


class _AmqpHeaders(Getter[Mapping[str, Any]]):
    """Reads a header table whose values may be `str`, `bytes` or anything else."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes | bytearray):
            try:
                value = bytes(value).decode("ascii")
            except UnicodeDecodeError:
                return None
        if not isinstance(value, str) or len(value) > _MAX_HEADER:
            return None
        return [value]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [key for key in carrier if isinstance(key, str)]


_GETTER = _AmqpHeaders()


def extract(headers: Mapping[str, Any] | None) -> Context | None:
    """The context an incoming message carries; None when it carries none (or a broken one)."""
    if not headers or TRACEPARENT not in headers:
        return None
    try:
        context = PROPAGATOR.extract(headers, getter=_GETTER)
    except Exception:  # untrusted input never stops a command
        return None
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def link_to_previous(headers: Mapping[str, Any] | None) -> list[Link] | None:
    """A link to the attempt that sent this command to a delay queue, when it names one."""
    if not headers or PREVIOUS_ATTEMPT_HEADER not in headers:
        return None
    context = extract({TRACEPARENT: headers[PREVIOUS_ATTEMPT_HEADER]})
    if context is None:
        return None
    span_context = trace.get_current_span(context).get_span_context()
    return [Link(span_context, {"invite.link": "previous_attempt"})]


def headers_of(span_context: SpanContext) -> dict[str, str]:
    """`traceparent` (and `tracestate`) naming `span_context`; empty when it is not valid."""
    if not span_context.is_valid:
        return {}
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, trace.set_span_in_context(trace.NonRecordingSpan(span_context)))
    return carrier


def current_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) of the current span; empty without one."""
    return headers_of(trace.get_current_span().get_span_context())


def log_ids(span_context: SpanContext) -> dict[str, str]:
    """`trace_id` and `span_id` in hex, as log back-ends join them to traces."""
    if not span_context.is_valid:
        return {}
    return {
        "trace_id": trace.format_trace_id(span_context.trace_id),
        "span_id": trace.format_span_id(span_context.span_id),
    }


def recording_trace_id() -> str | None:
    """The current trace id in hex while a span is recorded (metric exemplars); else None."""
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    return trace.format_trace_id(span.get_span_context().trace_id)


def fail(span: Span, error_type: str, description: str | None = None) -> None:
    """Mark `span` failed, by a type name and a description free of personal data."""
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, description or error_type))


#: What every span helper gives with the no-op tracer and no context to carry: nothing to do.
_NO_SPAN: contextlib.nullcontext[Span] = contextlib.nullcontext(trace.INVALID_SPAN)


def span(
    tracer: Tracer,
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
    context: Context | None = None,
    links: Sequence[Link] | None = None,
) -> contextlib.AbstractContextManager[Span]:
    """A current span whose errors the caller records (`fail`); nothing at all when tracing
    is off and there is no `context` to carry (the no-op tracer's spans would only repeat
    the current one)."""
    if tracer is NO_TRACER and context is None:
        return _NO_SPAN
    return tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    )


def traced(
    tracer: Tracer,
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
    context: Context | None = None,
    links: Sequence[Link] | None = None,
) -> contextlib.AbstractContextManager[Span]:
    """A current span; an exception marks it failed by its type alone, never its message."""
    if tracer is NO_TRACER and context is None:
        return _NO_SPAN
    return _failing(
        span(tracer, name, kind=kind, attributes=attributes, context=context, links=links)
    )


@contextlib.contextmanager
def _failing(opened: contextlib.AbstractContextManager[Span]) -> Iterator[Span]:
    with opened as current:
        try:
            yield current
        except BaseException as exc:
            fail(current, type(exc).__name__)
            raise


def consumed(
    tracer: Tracer, name: str, headers: Mapping[str, Any] | None
) -> contextlib.AbstractContextManager[Span]:
    """The span of a consumed message: a child of the context its headers carry, linked to
    the attempt that delayed it; without a context, the root of a new trace."""
    parent = extract(headers)
    if parent is None and tracer is NO_TRACER:
        return _NO_SPAN
    return traced(
        tracer,
        name,
        kind=SpanKind.CONSUMER,
        # An empty context, not the current one: nothing but the message names the parent.
        context=parent or Context(),
        links=link_to_previous(headers),
    )


def started(
    tracer: Tracer, name: str, *, attributes: Mapping[str, AttributeValue] | None = None
) -> Span:
    """A span, not made current, that the caller ends; the invalid span when tracing is off."""
    if tracer is NO_TRACER:
        return trace.INVALID_SPAN
    return tracer.start_span(name, attributes=attributes)


@dataclass
class Tracing:
    """The tracer the worker uses, and the SDK provider behind it when tracing is on."""

    tracer: Tracer = NO_TRACER
    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self, within: float = FLUSH_SECONDS) -> bool:
        """Export what is still batched, then stop; False when that took over `within` seconds.

        Blocking (run it off the event loop). The export goes on in a daemon thread, which
        an unreachable collector cannot make hold the process's exit.
        """
        provider = self.provider
        if provider is None:
            return True
        done = threading.Event()

        def shut_down() -> None:
            provider.shutdown()
            done.set()

        threading.Thread(target=shut_down, name="tracing-shutdown", daemon=True).start()
        return done.wait(within)


def configure(
    *, enabled: bool, service_name: str, version: str, endpoint: str | None = None
) -> Tracing:
    """The SDK with a batching OTLP/HTTP exporter to `endpoint` when `enabled`, else no-op.

    The exporter reads `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, `_TIMEOUT` and `_COMPRESSION`
    (and the endpoint when `endpoint` is None); the provider `OTEL_TRACES_SAMPLER[_ARG]`; the
    resource `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`; the batch processor
    `OTEL_BSP_*`.
    """
    if not enabled:
        return Tracing()
    # Imported only when tracing is on: a worker without an exporter loads no SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    resource = Resource.create({"service.version": version})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider.get_tracer(TRACER_NAME, version), provider)
