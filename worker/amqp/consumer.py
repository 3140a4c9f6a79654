"""Consuming commands: deliveries become the core's `Delivery`, its verdict a settlement.

A command's message is settled only after what it needed published (its outcome event, its
delayed retry, its dead-letter copy) is confirmed by the broker (`worker.amqp.publishing`);
`worker.core.settlement.settlement_for` decides how, `worker.amqp.settlement` carries it out.

Each delivery gets an `Ownership`, lost when its channel (or the connection) closes: the
broker has then requeued it, and the handler sends nothing more for it; what comes back
abandoned is neither published nor settled (`command.abandoned`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError
from aiormq.abc import AbstractChannel as UnderlayChannel
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer

from worker.amqp.bodies import body_size
from worker.amqp.publishing import (
    ATTEMPTS_HEADER,
    CRASHES_HEADER,
    FIRST_RECEIVED_HEADER,
    LAST_ERROR_HEADER,
    LAST_STATUS_HEADER,
    RETRY_AT_HEADER,
    THROTTLED_HEADER,
    TOKEN_FAILURES_HEADER,
    Publisher,
    fits_shortstr,
    fitted_correlation_id,
)
from worker.amqp.settlement import settle
from worker.amqp.topology import (
    declare_topology,
    delay_bucket,
    existing_topology,
    verify_topology,
)
from worker.core.circuit import CircuitState
from worker.core.handler import Delivery, Handled, InviteHandler
from worker.core.outcomes import FailedData, OutcomeEvent, OutcomeKind, RejectedData
from worker.core.ownership import Ownership
from worker.core.retry import MAX_RETRY_AFTER
from worker.core.settlement import Settlement, settlement_for
from worker.observability import tracing
from worker.observability.logs import redact
from worker.observability.metrics import Metrics
from worker.observability.tracing import NO_TRACER, fail, traced
from worker.settings import Settings

log = structlog.get_logger("worker.amqp.consumer")
#: The error types a retry copy may name in its last-error header; anything else is ignored.
_ERROR_TYPES = frozenset(
    {"GraphRefused", "GraphAmbiguous", "GraphUnreachable", "GraphNoAnswer", "TokenUnavailable"}
)


def _int_header(headers: dict[str, Any], name: str, upper: int) -> int:
    value = headers.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return min(max(value, 0), upper)
    return 0


def _epoch_header(
    headers: dict[str, Any], name: str, earliest: float, latest: float
) -> float | None:
    """An epoch-milliseconds header as seconds, when it is an integer within the bounds."""
    value = headers.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    return value / 1000 if earliest < value / 1000 <= latest else None


def to_delivery(message: AbstractIncomingMessage, ownership: Ownership | None = None) -> Delivery:
    """The handler's view of a message; headers are untrusted and checked here."""
    headers = message.headers or {}
    now = time.time()
    # A first-received time from the future or older than a day is not believed, nor a
    # retry time further ahead than the longest Retry-After the worker honours.
    first_received = _epoch_header(headers, FIRST_RECEIVED_HEADER, now - 86_400, now + 60)
    retry_at = _epoch_header(headers, RETRY_AT_HEADER, now - 86_400, now + MAX_RETRY_AFTER)
    last_status = _int_header(headers, LAST_STATUS_HEADER, 599)
    last_error = headers.get(LAST_ERROR_HEADER)

    return Delivery(
        message.body,
        message.content_type,
        message.message_id,
        body_size=body_size(message.body),
        delivery_count=_int_header(headers, "x-delivery-count", 1_000_000),
        prior_attempts=_int_header(headers, ATTEMPTS_HEADER, 1_000),
        prior_throttled=_int_header(headers, THROTTLED_HEADER, 1_000),
        prior_token_failures=_int_header(headers, TOKEN_FAILURES_HEADER, 1_000),
        first_received=first_received,
        retry_at=retry_at,
        last_status=last_status if last_status >= 400 else None,
        last_error=last_error
        if isinstance(last_error, str) and last_error in _ERROR_TYPES
        else None,
        crashes=_int_header(headers, CRASHES_HEADER, 1_000),
        ownership=ownership or Ownership(),
    )


def correlation_id(handled: Handled, message_id: str | None) -> tuple[str | None, str | None]:
    """(correlation_id, fallback): the commandId, or the message_id when there is none.

    A commandId that does not fit an AMQP short string (255 bytes of UTF-8) is replaced by
    the message_id, or left out; `fallback` then says which ("message_id" or "none").
    """
    command_id = None
    if handled.event is not None and handled.event.data.command_id:
        command_id = handled.event.data.command_id
    elif handled.command is not None:
        command_id = handled.command.command_id
    return fitted_correlation_id(command_id, message_id)


#: Builds the consumer's `Publisher` once its channel and exchanges exist.
PublisherFactory = Callable[
    [Settings, AbstractChannel, AbstractExchange, AbstractExchange, Metrics], Publisher
]


def _publisher(
    settings: Settings,
    channel: AbstractChannel,
    outcomes: AbstractExchange,
    dead_letters: AbstractExchange,
    metrics: Metrics,
) -> Publisher:
    return Publisher(settings, channel, outcomes, dead_letters, metrics=metrics)


class CommandConsumer:
    """Consumes the command queue with bounded concurrency and settles every message."""

    def __init__(
        self,
        settings: Settings,
        handler: InviteHandler,
        *,
        metrics: Metrics,
        publisher: PublisherFactory = _publisher,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self._settings = settings
        self._tracer = tracer
        #: Messaging span names: "<destination> <operation>".
        self._process_span = f"{settings.command_queue} process"
        self._publish_span = f"{settings.outcome_exchange} publish"
        self._make_publisher = publisher
        self._handler = handler
        self._metrics = metrics
        self._queue: AbstractQueue | None = None
        self._consume_channel: AbstractChannel | None = None
        self._publisher: Publisher | None = None
        self._consumer_tag: str | None = None
        #: Starting and cancelling the consumer, one at a time: never two consumers.
        self._consumer_lock = asyncio.Lock()
        #: The deliveries being handled, each with the channel it came on.
        self._owned: dict[Ownership, UnderlayChannel | None] = {}
        self._active: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: set[asyncio.Task[None]] = set()
        self.connected = False
        self.stopping = False
        handler.on_circuit_change(self._on_circuit_change)
        handler.on_shared_state_change(self._on_shared_state_change)

    @property
    def ready(self) -> bool:
        """Connected, consuming, and willing to take commands."""
        return (
            self.connected
            and self._consumer_tag is not None
            and not self.stopping
            and self._handler.takes_traffic
        )

    async def start(self, connection: AbstractRobustConnection) -> None:
        if self._settings.declare_topology:
            publish_channel = await connection.channel(publisher_confirms=True)
            commands, outcomes, dead_letters = await declare_topology(
                publish_channel, self._settings
            )
        else:
            if not await verify_topology(connection, self._settings):
                log.warning("topology.arguments_not_checked", reason="no configure permission")
            publish_channel = await connection.channel(publisher_confirms=True)
            commands, outcomes, dead_letters = await existing_topology(
                publish_channel, self._settings
            )
        self._publisher = self._make_publisher(
            self._settings, publish_channel, outcomes, dead_letters, self._metrics
        )
        self._consume_channel = await connection.channel(publisher_confirms=False)
        await self._consume_channel.set_qos(prefetch_count=self._settings.prefetch_count)
        # Declared (passively) through the robust channel, so that the consumer is restored
        # after the connection is re-established.
        self._queue = await self._consume_channel.get_queue(commands.name, ensure=True)
        self._consume_channel.close_callbacks.add(self._on_channel_closed)
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self.connected = True
        await self._consume()

    async def _consume(self) -> None:
        async with self._consumer_lock:
            await self._consume_unlocked()

    async def _cancel(self) -> None:
        async with self._consumer_lock:
            await self._cancel_unlocked()

    async def _consume_unlocked(self) -> None:
        if (
            self._queue is not None
            and self._consumer_tag is None
            and not self.stopping
            and self._handler.shared_state_available
        ):
            self._consumer_tag = await self._queue.consume(self._on_message)

    async def _cancel_unlocked(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await self._queue.cancel(tag)
            except (TimeoutError, AMQPError, ConnectionError, RuntimeError):
                log.warning("consumer.cancel_failed")

    def _on_channel_closed(self, *_: Any) -> None:
        # The broker requeued every unacknowledged message of the closed channel.
        for ownership, channel in self._owned.items():
            if channel is None or channel.is_closed:
                ownership.lose()

    def _on_connection_lost(self, *_: Any) -> None:
        self.connected = False
        # Every delivery in hand came on the connection that is gone.
        for ownership in self._owned:
            ownership.lose()
        if not self.stopping:
            log.warning("broker.connection_lost")

    def _on_reconnected(self, *_: Any) -> None:
        self.connected = True
        self._metrics.broker_reconnects.inc()
        log.info("broker.reconnected")

    def _on_circuit_change(self, state: CircuitState) -> None:
        log.warning("graph.circuit", state=state.value)
        self._spawn(self._follow_circuit(state))

    async def _follow_circuit(self, state: CircuitState) -> None:
        channel = self._consume_channel
        if channel is None:
            return
        try:
            if state is CircuitState.OPEN:
                await self._cancel()
                await asyncio.sleep(self._handler.circuit_reopens_in())
                self._handler.probe_circuit()
                return
            # Each step whole, in the order of the changes (the lock is first come, first
            # served): a half-open step cannot start a second consumer beside a closed one's.
            async with self._consumer_lock:
                if state is CircuitState.HALF_OPEN:
                    # One probe at a time: the rest of the backlog stays in the broker.
                    await channel.set_qos(prefetch_count=1)
                    await self._consume_unlocked()
                else:
                    # The broker applies a prefetch to consumers started after it: restart.
                    await channel.set_qos(prefetch_count=self._settings.prefetch_count)
                    await self._cancel_unlocked()
                    await self._consume_unlocked()
        except (AMQPError, ConnectionError, RuntimeError):
            log.warning("graph.circuit_follow_failed", state=state.value)

    def _on_shared_state_change(self, available: bool) -> None:
        # Without its shared state the worker takes no new commands; those in hand go back
        # to the broker (the handler sends nothing without a record).
        if not available:
            self._spawn(self._cancel())
        elif self._handler.takes_traffic:  # an open circuit resumes consuming itself
            self._spawn(self._consume())

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop_consuming(self) -> None:
        """Ask the broker for no more commands; those in flight carry on."""
        self.stopping = True
        self._handler.stop()
        await self._cancel()
        for task in list(self._background):
            task.cancel()

    async def drain(self, grace_period: float) -> int:
        """Wait up to `grace_period` seconds for in-flight commands; returns how many remain."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_period)
        return len(self._active)

    async def abandon(self) -> None:
        """Cancel the commands still in flight; they stay unsettled for redelivery."""
        for task in list(self._active):
            task.cancel()
        await asyncio.gather(*self._active, return_exceptions=True)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # The command runs in a task of its own, which this callback starts and does not
        # await: aio-pika cancels its delivery tasks when the channel closes, and a command
        # whose invite is under way must be finished and remembered, so that its redelivery
        # is not sent to Graph again. (A plain function would not help: aio-pika wraps it in
        # a coroutine that awaits what it returns.)
        ownership = Ownership()
        try:
            self._owned[ownership] = message.channel
        except RuntimeError:  # the channel closed before the command could start
            self._owned[ownership] = None
            ownership.lose()
        task = asyncio.get_running_loop().create_task(self._process(message, ownership))
        self._active.add(task)
        self._idle.clear()
        task.add_done_callback(lambda done: self._done(done, ownership))

    def _done(self, task: asyncio.Task[None], ownership: Ownership) -> None:
        self._owned.pop(ownership, None)
        self._active.discard(task)
        if not self._active:
            self._idle.set()

    async def _process(self, message: AbstractIncomingMessage, ownership: Ownership) -> None:
        # The command's span lives as long as its handling, in this task, not as long as
        # aio-pika's callback (which returns once this task has started). Its parent is the
        # context the message carries; without one (or with a malformed one) a new trace.
        with tracing.consumed(self._tracer, self._process_span, message.headers) as span:
            ids = tracing.log_ids(span.get_span_context())
            if ids:
                # This task's context only: every line logged while handling it joins the trace.
                structlog.contextvars.bind_contextvars(**ids)
            if span.is_recording():
                span.set_attributes(self._message_attributes(message))
            await self._process_in_span(message, ownership, span)

    def _message_attributes(self, message: AbstractIncomingMessage) -> dict[str, str | int]:
        """The consumed message, by the messaging conventions (ids only, never the body)."""
        attributes: dict[str, str | int] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": self._settings.command_queue,
            "messaging.rabbitmq.destination.routing_key": message.routing_key or "",
            "messaging.message.body.size": body_size(message.body) or len(message.body),
        }
        if message.delivery_tag is not None:
            attributes["messaging.rabbitmq.message.delivery_tag"] = message.delivery_tag
        if message.message_id and fits_shortstr(message.message_id):
            attributes["messaging.message.id"] = redact(message.message_id)
        return attributes

    async def _process_in_span(
        self, message: AbstractIncomingMessage, ownership: Ownership, span: Span
    ) -> None:
        started = time.monotonic()
        self._metrics.commands_received.inc()
        publisher = self._publisher
        assert publisher is not None  # noqa: S101 - messages arrive only after start()
        delivery: Delivery | None = None
        handled: Handled | None = None
        try:
            delivery = to_delivery(message, ownership)
            try:
                handled = await self._handler.handle(delivery)
            except Exception:
                # A bug, not a verdict on the command: it comes back with the crash counted,
                # and after COMMAND_MAX_REDELIVERIES crashes it is failed as poison.
                self._crashed("handle", message)
                if ownership.lost:
                    return  # the broker has handed it to another consumer already
                handled = self._handler.after_crash(delivery)
            # Lost after the handler returned: still nothing is published for it.
            handled = await self._handler.abandon_if_lost(delivery, handled)
            if handled.command is not None:
                structlog.contextvars.bind_contextvars(command_id=handled.command.command_id)
            if handled.abandoned:
                self._log_abandoned(handled, message)
                span.add_event("invite.abandoned", {"invite.outcome_kept": handled.outcome_kept})
                return
            settlement = await self._carry_out(message, handled, publisher)
        except Exception:
            # Publishing or settling raised what nothing expected: the message is settled
            # all the same, never left unacknowledged holding a prefetch slot.
            self._crashed("settle", message)
            settlement, handled = await self._after_settle_crash(
                message, delivery, handled, publisher
            )
        if handled is not None:
            _annotate(span, handled, settlement)
            self._log_settled(handled, settlement, message, started)

    def _crashed(self, stage: str, message: AbstractIncomingMessage) -> None:
        self._metrics.commands_crashed.inc(stage)
        log.exception("command.crashed", stage=stage, message_id=message.message_id)

    async def _carry_out(
        self, message: AbstractIncomingMessage, handled: Handled, publisher: Publisher
    ) -> Settlement:
        """Publish what `handled` needs, then settle the message as the one rule says."""
        event = handled.event
        confirmed = True
        if handled.retry_in is not None:
            confirmed = await self._publish_retry(message, handled, publisher)
        elif event is not None:
            if handled.command is not None:
                # Remembered before it is published: if this process dies after publishing
                # and before the acknowledgement, the redelivery publishes this same event
                # again (its id unchanged) instead of calling Graph or failing it anew.
                await self._handler.remember_outcome(handled.command, event, confirmed=False)
            correlation, fallback = correlation_id(handled, message.message_id)
            with traced(self._tracer, self._publish_span, kind=SpanKind.PRODUCER) as span:
                if span.is_recording():
                    span.set_attributes(
                        {
                            **_publish_attributes(self._settings.outcome_exchange),
                            "messaging.rabbitmq.destination.routing_key": event.type.value,
                            "messaging.message.id": event.id,
                            "cloudevents.event_id": event.id,
                            "cloudevents.event_type": event.type.value,
                        }
                    )
                    if correlation is not None:
                        span.set_attribute("messaging.message.conversation_id", redact(correlation))
                # The outcome carries the trace on: its headers name this span.
                confirmed = await publisher.publish_event(
                    event, correlation, fallback=fallback, trace=tracing.current_headers()
                )
                if not confirmed:
                    fail(span, "not_confirmed")
            if handled.command is not None and confirmed:
                await self._handler.remember_outcome(handled.command, event, confirmed=True)
        settlement = settlement_for(
            event.kind if event is not None else None,
            confirmed=confirmed,
            retry=handled.retry_in is not None,
            poison=handled.poison,
        )
        await self._settle(message, settlement, handled, publisher)
        return settlement

    async def _publish_retry(
        self, message: AbstractIncomingMessage, handled: Handled, publisher: Publisher
    ) -> bool:
        """The delayed copy, in the same trace: its parent stays the command's, and the next
        attempt links to this one."""
        assert handled.retry_in is not None  # noqa: S101 - called only for retries
        attempt = trace.get_current_span()
        parent = tracing.extract(message.headers)
        carried = tracing.headers_of(
            trace.get_current_span(parent).get_span_context()
            if parent is not None
            else attempt.get_span_context()
        )
        previous = tracing.headers_of(attempt.get_span_context()) if attempt.is_recording() else {}
        headers: dict[str, str | None] = {
            tracing.TRACEPARENT: carried.get(tracing.TRACEPARENT),
            tracing.TRACESTATE: carried.get(tracing.TRACESTATE),
            tracing.PREVIOUS_ATTEMPT_HEADER: previous.get(tracing.TRACEPARENT),
        }
        queue = self._settings.delay_queue(delay_bucket(handled.retry_in))
        with traced(self._tracer, f"{queue} publish", kind=SpanKind.PRODUCER) as span:
            if span.is_recording():
                span.set_attributes(
                    {
                        **_publish_attributes(queue),
                        "invite.retry_in_s": handled.retry_in,
                    }
                )
            confirmed = await publisher.publish_retry(message, handled, headers)
            if confirmed:
                self._metrics.retries_scheduled.inc("broker")
            else:
                fail(span, "not_confirmed")
        return confirmed

    async def _after_settle_crash(
        self,
        message: AbstractIncomingMessage,
        delivery: Delivery | None,
        handled: Handled | None,
        publisher: Publisher,
    ) -> tuple[Settlement, Handled | None]:
        """Settle a message whose settling crashed: as a crash, or dead-lettered by the broker."""
        try:
            if delivery is None:
                raise RuntimeError("the delivery could not be read")
            if handled is not None and handled.command is not None and handled.event is not None:
                # Its outcome was not published: a redelivery publishes it, without Graph.
                await self._handler.remember_outcome(
                    handled.command, handled.event, confirmed=False
                )
            fallback = self._handler.after_crash(delivery)
            return await self._carry_out(message, fallback, publisher), fallback
        except Exception:
            self._crashed("fallback", message)
            # The broker dead-letters it (the command queue's x-dead-letter-exchange).
            with contextlib.suppress(Exception):
                await message.nack(requeue=False)
            return Settlement.DEAD_LETTER, handled

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        settlement: Settlement,
        handled: Handled | None,
        publisher: Publisher,
    ) -> None:
        await settle(message, settlement, handled, publisher=publisher, stopping=self.stopping)

    def _log_abandoned(self, handled: Handled, message: AbstractIncomingMessage) -> None:
        self._metrics.commands_abandoned.inc("kept" if handled.outcome_kept else "unsent")
        command = handled.command
        log.warning(
            "command.abandoned",
            command_id=command.command_id if command else None,
            call_id=command.call_id if command else None,
            tenant_id=command.tenant_id if command else None,
            outcome_kept=handled.outcome_kept,
            attempts=handled.attempts,
            message_id=message.message_id,
            redelivered=message.redelivered,
        )

    def _log_settled(
        self,
        handled: Handled,
        settlement: Settlement,
        message: AbstractIncomingMessage,
        started: float,
    ) -> None:
        command = handled.command
        data = handled.event.data if handled.event is not None else None
        log.info(
            "command.settled",
            command_id=command.command_id if command else data.command_id if data else None,
            call_id=command.call_id if command else data.call_id if data else None,
            tenant_id=command.tenant_id if command else data.tenant_id if data else None,
            outcome=handled.event.type.value if handled.event else None,
            settlement=settlement.value,
            http_status=handled.http_status,
            request_id=handled.request_id,
            attempts=handled.attempts,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            message_id=message.message_id,
            redelivered=message.redelivered,
            duplicate=handled.duplicate,
            replayed=handled.replayed,
            crashes=handled.crashes or None,
            correlation_id_fallback=correlation_id(handled, message.message_id)[1],
            retry_in=handled.retry_in,
            error_type=handled.error_type,
            # isinstance, not getattr with a default: a missing attribute of a pydantic model
            # raises inside pydantic, which costs more than the rest of the line.
            reason=data.reason if isinstance(data, FailedData) else None,
            error_code=data.error_code if isinstance(data, FailedData) else None,
            problems=[f"{p.field}: {p.problem}" for p in data.problems]
            if isinstance(data, RejectedData) and data.problems
            else None,
        )


def _publish_attributes(destination: str) -> dict[str, str]:
    """A publish span's messaging attributes (the conventions' names), for `destination`."""
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": destination,
    }


def _annotate(span: Span, handled: Handled, settlement: Settlement) -> None:
    """What became of the command, on its span: ids, the outcome as an event and a status.

    Never the participants or the command's body: ids, counts, Graph's status and codes.
    """
    if not span.is_recording():
        return
    command = handled.command
    event = handled.event
    data = event.data if event is not None else None
    command_id = command.command_id if command else data.command_id if data else None
    tenant_id = command.tenant_id if command else data.tenant_id if data else None
    attributes: dict[str, str | int | bool] = {
        "invite.settlement": settlement.value,
        "invite.attempts": handled.attempts,
    }
    # A rejected command's ids are echoed as they came: masked like a log line's.
    if command_id is not None and fits_shortstr(command_id):
        attributes["messaging.message.conversation_id"] = redact(command_id)
    if tenant_id is not None and fits_shortstr(tenant_id):
        attributes["invite.tenant_id"] = redact(tenant_id)
    if command is not None:
        attributes["invite.call_id"] = command.call_id
    for flag in ("duplicate", "replayed", "poison"):
        if getattr(handled, flag):
            attributes[f"invite.{flag}"] = True
    if handled.crashes:
        attributes["invite.crashes"] = handled.crashes
    span.set_attributes(attributes)
    if handled.retry_in is not None:
        retry: dict[str, str | int | float] = {"invite.retry_in_s": handled.retry_in}
        if handled.http_status is not None:
            retry["http.response.status_code"] = handled.http_status
        if handled.error_type is not None:
            retry["error.type"] = handled.error_type
        span.add_event("invite.retry_scheduled", retry)
    if event is not None:
        _outcome_event(span, handled, event)


def _outcome_event(span: Span, handled: Handled, event: OutcomeEvent) -> None:
    """The outcome as a span event (kind, reason, Graph's status and code) and status."""
    data = event.data
    span.set_attribute("invite.outcome", event.type.value)
    details: dict[str, str | int] = {"cloudevents.event_id": event.id}
    reason = getattr(data, "reason", None)
    status = getattr(data, "http_status", None)
    code = getattr(data, "error_code", None)
    if reason is not None:
        details["invite.reason"] = reason
    if status is not None:
        details["http.response.status_code"] = status
    if isinstance(code, str) and len(code) <= 100:
        details["invite.error_code"] = code
    problems = getattr(data, "problems", None)
    if problems is not None:
        details["invite.problems"] = len(problems)
    span.add_event(event.type.value, details)
    if event.type is not OutcomeKind.ACCEPTED:
        fail(span, handled.error_type or event.type.value, reason or event.type.value)
