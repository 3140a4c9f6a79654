"""What tracing costs a command when it is off: the OpenTelemetry calls one command makes with
the API's no-op tracer, timed in a loop in this process.

The calls are those of `worker.amqp.consumer` (the command's span, its log ids, the outcome's
publish span and headers, the settled span's annotation) and `worker.core.handler` (the
token, wait and Graph request spans, the outcome event's trace context, the histograms'
exemplar check), made through the same helpers with the same nesting. A command that carries a
`traceparent` also pays for reading it and writing it into its outcome. The figure is CPU time
per command, to set beside the worker's CPU per command in the same run.
"""

from __future__ import annotations

import time

from opentelemetry.trace import SpanKind

from worker.observability import tracing
from worker.observability.tracing import NO_TRACER, traced

_TENANT = {"invite.tenant_id": "11111111-1111-4111-8111-111111111111"}
_PLAIN: dict[str, object] = {"x-invite-attempts": 1}
_TRACED: dict[str, object] = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "x-invite-attempts": 1,
}


def one_command(headers: dict[str, object]) -> None:
    """The no-op tracing calls of one accepted command, in the worker's order."""
    with tracing.consumed(NO_TRACER, "invite.commands process", headers) as span:
        tracing.log_ids(span.get_span_context())
        span.is_recording()
        with traced(NO_TRACER, "invite.token", attributes=_TENANT):
            pass
        tracing.started(NO_TRACER, "invite.wait", attributes=_TENANT).end()
        tracing.recording_trace_id()  # the rate-limit wait histogram
        with tracing.span(NO_TRACER, "POST", kind=SpanKind.CLIENT) as http:
            http.is_recording()
            http.set_attribute("http.response.status_code", 200)
            http.set_attribute("http.response.header.request-id", ("r",))
        tracing.recording_trace_id()  # the Graph latency histogram
        tracing.current_headers()  # the outcome event's traceparent
        with traced(NO_TRACER, "invite.outcomes publish", kind=SpanKind.PRODUCER) as publish:
            publish.is_recording()
            tracing.current_headers()
        span.is_recording()


def seconds_per_command(repeat: int = 20_000, *, with_traceparent: bool = False) -> float:
    """CPU seconds per command of the no-op tracing calls (best of three loops)."""
    headers = _TRACED if with_traceparent else _PLAIN
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(repeat):
            one_command(headers)
        best = min(best, (time.process_time() - started) / repeat)
    return best
