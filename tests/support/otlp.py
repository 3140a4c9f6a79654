"""A local OTLP/HTTP trace receiver: what the worker's real exporter sends, decoded.

It accepts `POST /v1/traces` with a protobuf `ExportTraceServiceRequest` (opentelemetry-proto)
and keeps every span, flattened to the fields the tests and the benchmark look at. Importable
without pytest: `benchmarks/` runs the worker against it with tracing on.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind is None:
        return None
    return getattr(value, kind)


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as exported; ids in lowercase hex, as in a `traceparent`."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    status: str
    status_message: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    #: (trace id, span id, attributes) of each link.
    links: list[tuple[str, str, dict[str, Any]]]
    resource: dict[str, Any]
    start_ns: int = 0
    end_ns: int = 0

    def describe(self) -> str:
        """One line: name, ids, parent, kind, status and attributes."""
        return (
            f"{self.name} [{self.kind}] trace={self.trace_id} span={self.span_id} "
            f"parent={self.parent_span_id or '-'} status={self.status}"
            f"{':' + self.status_message if self.status_message else ''} "
            f"attributes={self.attributes} events={self.events} links={self.links}"
        )


@dataclass
class OtlpReceiver:
    """Listens on 127.0.0.1 (a free port) and keeps what it receives.

    With `keep` False it only counts the spans (a sink for the benchmark, where flattening
    every span would load the machine the measured worker runs on).
    """

    keep: bool = True
    spans: list[ReceivedSpan] = field(default_factory=list)
    span_count: int = 0
    requests: int = 0
    _runner: web.AppRunner | None = None
    _port: int = 0

    @property
    def endpoint(self) -> str:
        """The base endpoint (OTEL_EXPORTER_OTLP_ENDPOINT): the exporter adds `/v1/traces`."""
        assert self._port, "the receiver is not listening"
        return f"http://127.0.0.1:{self._port}"

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.requests += 1
        self.span_count += sum(
            len(scope.spans) for spans in export.resource_spans for scope in spans.scope_spans
        )
        for resource_spans in export.resource_spans if self.keep else ():
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=_KINDS.get(span.kind, str(span.kind)),
                            status=_STATUS.get(span.status.code, str(span.status.code)),
                            status_message=span.status.message,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            events=[
                                (e.name, {a.key: _value(a.value) for a in e.attributes})
                                for e in span.events
                            ],
                            links=[
                                (
                                    link.trace_id.hex(),
                                    link.span_id.hex(),
                                    {a.key: _value(a.value) for a in link.attributes},
                                )
                                for link in span.links
                            ],
                            resource=resource,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.name == name]

    def in_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return sorted(
            (span for span in self.spans if span.trace_id == trace_id), key=lambda s: s.start_ns
        )
