"""Span shapes with the SDK's in-memory exporter; propagation over AMQP headers; logs, metrics
and settings as tracing sees them. No broker: tests/integration/test_tracing.py has the rest."""

from __future__ import annotations

import io
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError

from tests.support.fakes import FakeGraph, FakeTokens
from tests.support.harness import TENANT_A, command, isolated_settings
from worker.app import handler_config
from worker.core import outcomes
from worker.core.errors import DeadlinePassed, GraphRefused
from worker.core.handler import Delivery, InviteHandler
from worker.observability import logs, tracing
from worker.observability.metrics import OPENMETRICS_CONTENT_TYPE, Metrics

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
PHONE = "+14255550123"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Iterator[trace.Tracer]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test")
    provider.shutdown()


def handler(tracer: trace.Tracer, graph: FakeGraph | None = None) -> InviteHandler:
    settings = isolated_settings({"AZURE_TENANT_ID": TENANT_A, "RETRY_BASE_DELAY": 0.01})
    return InviteHandler(
        handler_config(settings), tokens=FakeTokens(), sender=graph or FakeGraph(), tracer=tracer
    )


def delivery(**fields: Any) -> Delivery:
    body = command(command_id=str(uuid.uuid4()), **fields)
    return Delivery(json.dumps(body).encode(), "application/json", None)


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


# --- Propagation over AMQP headers --------------------------------------------------------


@pytest.mark.parametrize("value", [TRACEPARENT, TRACEPARENT.encode()])
def test_a_traceparent_header_as_text_or_bytes_is_the_commands_parent(value: object) -> None:
    context = tracing.extract({"traceparent": value, "tracestate": b"vendor=1"})
    assert context is not None
    span_context = trace.get_current_span(context).get_span_context()
    assert (span_context.trace_id, span_context.span_id) == (int(TRACE_ID, 16), int(SPAN_ID, 16))
    assert span_context.trace_state.to_header() == "vendor=1"


@pytest.mark.parametrize(
    "value",
    [
        "00-not-a-trace-01",
        f"ff-{TRACE_ID}-{SPAN_ID}-01",  # a version W3C forbids
        f"00-{'0' * 32}-{SPAN_ID}-01",  # the invalid trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",
        TRACEPARENT + "-extra",  # version 00 has exactly four parts
        "00-" + "a" * 600,
        b"\xff\xfe not ascii",
        42,
        None,
        ["a", "list"],
    ],
)
def test_a_malformed_traceparent_is_no_context_and_never_an_error(value: object) -> None:
    assert tracing.extract({"traceparent": value}) is None


def test_no_headers_is_no_context() -> None:
    assert tracing.extract(None) is None
    assert tracing.extract({"x-other": "1"}) is None
    assert tracing.link_to_previous({"x-invite-previous-attempt": "junk"}) is None


# --- The handler's spans --------------------------------------------------------------------


async def test_token_wait_and_graph_request_are_children_of_the_command_span(
    tracer: trace.Tracer, exporter: InMemorySpanExporter
) -> None:
    with tracer.start_as_current_span("command") as parent:
        handled = await handler(tracer).handle(delivery())
    spans = by_name(exporter.get_finished_spans())
    assert handled.event is not None
    graph = spans["POST /v1.0/communications/calls/{id}/participants/invite"]
    for name in ("invite.token", "invite.wait", graph.name):
        owner = spans[name].parent
        assert owner is not None
        assert owner.span_id == parent.get_span_context().span_id
    assert graph.kind is trace.SpanKind.CLIENT
    attributes = dict(graph.attributes or {})
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.response.header.request-id"] == ("req-1",)
    assert attributes["http.request.header.client-request-id"] == (handled.event.data.command_id,)
    assert attributes["server.address"] == "graph.microsoft.com"
    # The event names the span it was made in: the command's.
    expected = f"00-{trace.format_trace_id(parent.get_span_context().trace_id)}"
    assert handled.event.traceparent is not None
    assert handled.event.traceparent.startswith(expected)


async def test_a_refused_invite_is_an_error_status_without_the_message_or_the_number(
    tracer: trace.Tracer, exporter: InMemorySpanExporter
) -> None:
    refusal = GraphRefused(403, "Forbidden", f"cannot call {PHONE}", "req-9")
    graph = FakeGraph(failures=[refusal])
    participant = {"identity": {"phone": {"id": PHONE}}}
    with tracer.start_as_current_span("command"):
        handled = await handler(tracer, graph).handle(delivery(participants=[participant]))
    assert handled.event is not None
    assert handled.event.kind is outcomes.OutcomeKind.FAILED
    spans = exporter.get_finished_spans()
    [request] = [s for s in spans if s.kind is trace.SpanKind.CLIENT]
    assert request.status.status_code is trace.StatusCode.ERROR
    assert dict(request.attributes or {})["error.type"] == "403"
    exported = "".join(span.to_json() for span in spans)
    assert "14255550123" not in exported
    assert "cannot call" not in exported


async def test_without_an_sdk_the_incoming_context_still_reaches_the_outcome(
    exporter: InMemorySpanExporter,
) -> None:
    """The no-op tracer records nothing, yet carries the upstream's trace through."""
    context = tracing.extract({"traceparent": TRACEPARENT})
    with tracing.traced(tracing.NO_TRACER, "command", context=context):
        handled = await handler(tracing.NO_TRACER).handle(delivery())
    assert handled.event is not None
    assert handled.event.traceparent == TRACEPARENT
    assert exporter.get_finished_spans() == ()


def test_an_event_made_outside_any_trace_has_no_trace_attributes() -> None:
    event = outcomes.from_error(
        DeadlinePassed("late"), None, attempts=0, duration_ms=0, client_request_id=None, source="s"
    )
    body = json.loads(event.to_json())
    assert "traceparent" not in body
    assert "tracestate" not in body


# --- Logs and metrics -------------------------------------------------------------------------


def test_every_line_carries_service_and_version_and_bound_trace_ids() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream, service="svc", version="1.2.3")
    structlog.contextvars.bind_contextvars(trace_id=TRACE_ID, span_id=SPAN_ID)
    try:
        structlog.get_logger("test").info("command.settled", command_id="c-1")
        logging.getLogger("aio_pika").warning("a library speaks")
    finally:
        structlog.contextvars.clear_contextvars()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    for line in (first, second):
        assert (line["service"], line["version"]) == ("svc", "1.2.3")
        assert (line["trace_id"], line["span_id"]) == (TRACE_ID, SPAN_ID)
    assert first["command_id"] == "c-1"


def test_histograms_carry_the_recorded_trace_id_as_an_exemplar(tracer: trace.Tracer) -> None:
    metrics = Metrics()
    metrics.graph_latency.observe(0.2)  # no span: no exemplar
    with tracer.start_as_current_span("command") as span:
        metrics.graph_latency.observe(0.02)
        trace_id = trace.format_trace_id(span.get_span_context().trace_id)
    body, content_type = metrics.exposition(OPENMETRICS_CONTENT_TYPE)
    assert content_type == OPENMETRICS_CONTENT_TYPE
    lines = [line for line in body.decode().splitlines() if "trace_id" in line]
    [line] = lines  # one exemplar: the observation made while a span was recorded
    assert line.startswith('invite_graph_request_duration_seconds_bucket{le="0.025"} 1.0 # ')
    assert f'{{trace_id="{trace_id}"}} 0.02' in line


# --- Settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "enabled"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ],
)
def test_traces_are_exported_only_when_an_exporter_is_configured(
    values: dict[str, str], enabled: bool
) -> None:
    assert isolated_settings(values).tracing_enabled is enabled


def test_the_traces_url_is_the_signal_endpoint_or_v1_traces_under_the_base() -> None:
    base = isolated_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"})
    assert base.otel_traces_url == "http://c:4318/v1/traces"
    signal = isolated_settings(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "x"}
    )
    assert signal.otel_traces_url == "x"


def test_a_protocol_that_is_not_installed_is_an_invalid_setting() -> None:
    with pytest.raises(ValidationError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        isolated_settings({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})


def test_a_collector_that_never_answers_delays_the_stop_no_longer_than_the_bound() -> None:
    """The last spans' export is waited for, within a bound: the exit never hangs on it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections are queued, never answered
        port = silent.getsockname()[1]
        traces = tracing.configure(
            enabled=True,
            service_name="s",
            version="v",
            endpoint=f"http://127.0.0.1:{port}/v1/traces",
        )
        with traces.tracer.start_as_current_span("command"):
            pass
        assert traces.shutdown(within=0.2) is False
