"""Traces end to end: the real broker, the simulator, and the worker's real OTLP/HTTP exporter
sending to a receiver this test runs (decoded with opentelemetry-proto)."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from tests.conftest import make_settings
from tests.support.harness import Broker, command, running_worker
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.outcomes import Outcome
from worker.devtools.simulator import FaultRule, SimulatorThread
from worker.settings import Settings

pytestmark = pytest.mark.integration


def new_id() -> str:
    return str(uuid.uuid4())


def upstream_context() -> tuple[str, str, str]:
    """(traceparent, its trace id, its span id): an upstream publisher's span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def traced_settings(simulator: SimulatorThread, receiver: OtlpReceiver, **extra: Any) -> Settings:
    return make_settings(
        simulator,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_SERVICE_NAME="invite-worker-test",
        **extra,
    )


def trace_id_of(traceparent: object) -> str:
    assert isinstance(traceparent, str), traceparent
    return traceparent.split("-")[1]


def one(spans: list[ReceivedSpan]) -> ReceivedSpan:
    assert len(spans) == 1, [span.describe() for span in spans]
    return spans[0]


def print_trace(receiver: OtlpReceiver, trace_id: str) -> None:
    """The trace as exported (shown with `pytest -s`)."""
    print(f"\ntrace {trace_id}, as the OTLP receiver decoded it:")
    for span in receiver.in_trace(trace_id):
        print("  " + span.describe())


async def test_a_command_continues_its_publishers_trace_through_graph_to_its_outcome(
    broker: Broker, simulator: SimulatorThread
) -> None:
    traceparent, trace_id, upstream_span = upstream_context()
    command_id = new_id()
    async with OtlpReceiver() as receiver:
        settings = traced_settings(simulator, receiver)
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            async with running_worker(settings, broker) as (_, collector):
                await broker.publish(
                    settings,
                    command(command_id=command_id),
                    message_id=command_id,
                    headers={"traceparent": traceparent, "tracestate": "vendor=abc"},
                )
                [outcome] = await collector.wait_for(1)
        # The worker has stopped: its batch processor exported everything on the way out.
        print_trace(receiver, trace_id)
        process = one(receiver.named(f"{settings.command_queue} process"))
        graph = one([s for s in receiver.spans if s.kind == "CLIENT"])
        token = one(receiver.named("invite.token"))
        wait = one(receiver.named("invite.wait"))
        publish = one(receiver.named(f"{settings.outcome_exchange} publish"))

    assert outcome.routing_key == "invite.accepted"
    # The command's span is the child of the publisher's context.
    assert (process.trace_id, process.parent_span_id) == (trace_id, upstream_span)
    assert process.kind == "CONSUMER"
    assert process.attributes["messaging.system"] == "rabbitmq"
    assert process.attributes["messaging.destination.name"] == settings.command_queue
    assert process.attributes["messaging.message.id"] == command_id
    assert process.attributes["messaging.message.conversation_id"] == command_id
    assert process.attributes["invite.outcome"] == "invite.accepted"
    assert [name for name, _ in process.events] == ["invite.accepted"]
    assert process.resource["service.name"] == "invite-worker-test"
    # Token, wait, the Graph request and the outcome's publish are its children.
    for child in (token, wait, graph, publish):
        assert (child.trace_id, child.parent_span_id) == (trace_id, process.span_id)
    assert graph.name.startswith("POST ")
    assert graph.attributes["http.request.method"] == "POST"
    assert graph.attributes["http.response.status_code"] == 200
    assert graph.attributes["http.request.header.client-request-id"] == [command_id]
    assert graph.attributes["http.response.header.request-id"] == [outcome.data["requestId"]]
    assert graph.attributes["server.address"] == "127.0.0.1"
    assert publish.kind == "PRODUCER"
    # The outcome carries the same trace out, in its AMQP headers and in the CloudEvent.
    assert outcome.headers["traceparent"] == f"00-{trace_id}-{publish.span_id}-01"
    assert outcome.headers["tracestate"] == "vendor=abc"
    assert outcome.event["traceparent"] == f"00-{trace_id}-{process.span_id}-01"
    assert outcome.event["tracestate"] == "vendor=abc"
    # The worker's log lines for it carry the trace id and the command span's id.
    lines = [line for line in logs if line.get("command_id") == command_id]
    assert [line["event"] for line in lines] == ["command.settled"]
    assert {(line["trace_id"], line["span_id"]) for line in lines} == {(trace_id, process.span_id)}


async def test_a_command_that_waits_in_a_delay_queue_keeps_its_trace_and_links_its_attempts(
    broker: Broker, simulator: SimulatorThread
) -> None:
    traceparent, trace_id, upstream_span = upstream_context()
    command_id = new_id()
    call_id = f"call-{uuid.uuid4().hex[:8]}"
    # A 429 asking for 3 s: longer than RETRY_IN_PROCESS_MAX, so the wait is the broker's.
    simulator.set_faults([FaultRule(call_id=call_id, status=429, retry_after="3", remaining=1)])
    async with OtlpReceiver() as receiver:
        settings = traced_settings(simulator, receiver)
        async with running_worker(settings, broker) as (_, collector):
            await broker.publish(
                settings,
                command(command_id=command_id, call_id=call_id),
                message_id=command_id,
                headers={"traceparent": traceparent},
            )
            [outcome] = await collector.wait_for(1, timeout=30)
        print_trace(receiver, trace_id)
        first, second = sorted(
            receiver.named(f"{settings.command_queue} process"), key=lambda s: s.start_ns
        )
        retry = one([s for s in receiver.spans if ".delay." in s.name])
        requests = sorted(
            (s for s in receiver.spans if s.kind == "CLIENT"), key=lambda s: s.start_ns
        )

    assert outcome.routing_key == "invite.accepted"
    assert outcome.data["attempts"] == 2
    # Both attempts are children of the publisher's context, in its trace.
    for attempt in (first, second):
        assert (attempt.trace_id, attempt.parent_span_id) == (trace_id, upstream_span)
    assert [name for name, _ in first.events] == ["invite.retry_scheduled"]
    assert first.attributes["invite.settlement"] == "retry_later"
    # The second attempt links to the first, which sent the copy through the delay queue.
    assert [(t, s) for t, s, _ in second.links] == [(trace_id, first.span_id)]
    assert (retry.parent_span_id, retry.kind) == (first.span_id, "PRODUCER")
    assert [(r.parent_span_id, r.attributes["http.response.status_code"]) for r in requests] == [
        (first.span_id, 429),
        (second.span_id, 200),
    ]
    assert requests[0].status == "ERROR"
    assert trace_id_of(outcome.headers["traceparent"]) == trace_id
    assert trace_id_of(outcome.event["traceparent"]) == trace_id


async def test_a_command_without_trace_headers_starts_a_trace_its_outcome_carries(
    broker: Broker, simulator: SimulatorThread
) -> None:
    command_id = new_id()
    async with OtlpReceiver() as receiver:
        settings = traced_settings(simulator, receiver)
        async with running_worker(settings, broker) as (_, collector):
            # A malformed traceparent is no context: a new trace, and no harm done.
            await broker.publish(
                settings,
                command(command_id=command_id),
                message_id=command_id,
                headers={"traceparent": "00-not-a-trace-at-all-01", "tracestate": "=="},
            )
            [outcome] = await collector.wait_for(1)
        process = one(receiver.named(f"{settings.command_queue} process"))

    assert outcome.routing_key == "invite.accepted"
    assert process.parent_span_id == ""
    assert trace_id_of(outcome.headers["traceparent"]) == process.trace_id
    # (The trace flags say sampled, and, for a trace id the SDK made, random.)
    assert outcome.event["traceparent"].startswith(f"00-{process.trace_id}-{process.span_id}-")


async def test_a_failed_invite_is_span_status_and_event_without_participants(
    broker: Broker, simulator: SimulatorThread
) -> None:
    phone = "+14255550123"
    command_id = new_id()
    call_id = f"call-{uuid.uuid4().hex[:8]}"
    simulator.set_faults(
        [FaultRule(call_id=call_id, status=403, code="Forbidden", message=f"no {phone}")]
    )
    participant = {"identity": {"phone": {"id": phone}}}
    async with OtlpReceiver() as receiver:
        settings = traced_settings(simulator, receiver)
        async with running_worker(settings, broker) as (_, collector):
            await broker.publish(
                settings,
                command(command_id=command_id, call_id=call_id, participants=[participant]),
                message_id=command_id,
            )
            [outcome] = await collector.wait_for(1)
            # A rejected command whose ids are the number: echoed as they came, masked.
            await broker.publish(settings, command(command_id=phone), message_id=phone)
            _, rejected = await collector.wait_for(2)
        process, _ = sorted(
            receiver.named(f"{settings.command_queue} process"), key=lambda s: s.start_ns
        )
        graph = one([s for s in receiver.spans if s.kind == "CLIENT"])
        spans = list(receiver.spans)

    assert isinstance(outcome, Outcome)
    assert outcome.routing_key == "invite.failed"
    assert rejected.routing_key == "invite.rejected"
    assert (process.status, process.status_message) == ("ERROR", "graph_refused")
    [(name, details)] = process.events
    assert name == "invite.failed"
    assert details["invite.reason"] == "graph_refused"
    assert details["http.response.status_code"] == 403
    assert (graph.status, graph.attributes["error.type"]) == ("ERROR", "403")
    # Not the number, not even Graph's error message that echoed it.
    assert "14255550123" not in repr(spans)
