"""The AMQP edge: topology, consuming commands, publishing outcomes, settling messages.

All aio-pika translation lives here. A command's message is settled only after what it
needed published (its outcome event, its delayed retry, its dead-letter copy) is confirmed
by the broker; `errors.settlement_for` decides how.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError

from worker.amqp.topology import declare_topology, delay_bucket
from worker.core.circuit import CircuitState
from worker.core.errors import Settlement, settlement_for
from worker.core.handler import Delivery, Handled, InviteHandler
from worker.core.outcomes import OutcomeEvent
from worker.settings import Settings

log = structlog.get_logger("worker.amqp.consumer")

OUTCOME_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
#: Seconds before a command whose outcome the broker refused goes back to the queue, so
#: that a broker that keeps refusing is not hammered.
REQUEUE_DELAY = 1.0
PUBLISH_TIMEOUT = 10.0
#: Headers the worker sets on retried and dead-lettered copies of a command.
ATTEMPTS_HEADER = "x-invite-attempts"
#: Epoch milliseconds, an integer: AMQP header floats are 32-bit and would lose a minute.
FIRST_RECEIVED_HEADER = "x-invite-first-received-ms"
_BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


def _int_header(headers: dict[str, Any], name: str, upper: int) -> int:
    value = headers.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return min(max(value, 0), upper)
    return 0


def to_delivery(message: AbstractIncomingMessage) -> Delivery:
    """The handler's view of a message; headers are untrusted and checked here."""
    headers = message.headers or {}
    first_ms = headers.get(FIRST_RECEIVED_HEADER)
    now = time.time()
    # A first-received time from the future or older than a day is not believed.
    first_received = (
        first_ms / 1000
        if isinstance(first_ms, int)
        and not isinstance(first_ms, bool)
        and now - 86_400 < first_ms / 1000 <= now + 60
        else None
    )

    return Delivery(
        message.body,
        message.content_type,
        message.message_id,
        delivery_count=_int_header(headers, "x-delivery-count", 1_000_000),
        prior_attempts=_int_header(headers, ATTEMPTS_HEADER, 1_000),
        first_received=first_received,
    )


def correlation_id(handled: Handled, message_id: str | None) -> str | None:
    """The commandId, or the incoming message_id when the body carried none."""
    if handled.event is not None and handled.event.data.command_id:
        return handled.event.data.command_id
    return handled.command.command_id if handled.command else message_id


class CommandConsumer:
    """Consumes the command queue with bounded concurrency and settles every message."""

    def __init__(self, settings: Settings, handler: InviteHandler) -> None:
        self._settings = settings
        self._handler = handler
        self._metrics = handler.metrics
        self._served = settings.served_tenants
        self._queue: AbstractQueue | None = None
        self._consume_channel: AbstractChannel | None = None
        self._publish_channel: AbstractChannel | None = None
        self._outcomes: AbstractExchange | None = None
        self._dead_letters: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        self._active: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: set[asyncio.Task[Any]] = set()
        self.connected = False
        self.stopping = False
        handler.circuit.on_change = self._on_circuit_change

    @property
    def ready(self) -> bool:
        """Connected, consuming, and willing to take commands."""
        return (
            self.connected
            and self._consumer_tag is not None
            and not self.stopping
            and self._handler.circuit.allows_traffic
        )

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._publish_channel = await connection.channel(publisher_confirms=True)
        commands, self._outcomes, self._dead_letters = await declare_topology(
            self._publish_channel, self._settings
        )
        self._consume_channel = await connection.channel(publisher_confirms=False)
        await self._consume_channel.set_qos(prefetch_count=self._settings.prefetch_count)
        # Declared (passively) through the robust channel, so that the consumer is restored
        # after the connection is re-established.
        self._queue = await self._consume_channel.get_queue(commands.name, ensure=True)
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self.connected = True
        await self._consume()

    async def _consume(self) -> None:
        if self._queue is not None and self._consumer_tag is None and not self.stopping:
            self._consumer_tag = await self._queue.consume(self._on_message)

    async def _cancel(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await self._queue.cancel(tag)
            except (TimeoutError, AMQPError, ConnectionError, RuntimeError):
                log.warning("consumer.cancel_failed")

    def _on_connection_lost(self, *_: Any) -> None:
        self.connected = False
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
                await asyncio.sleep(self._handler.circuit.reopens_in())
                self._handler.circuit.half_open()
            elif state is CircuitState.HALF_OPEN:
                # One probe at a time: the rest of the backlog stays in the broker.
                await channel.set_qos(prefetch_count=1)
                await self._consume()
            else:
                # The broker applies a prefetch to consumers started after it: restart ours.
                await channel.set_qos(prefetch_count=self._settings.prefetch_count)
                await self._cancel()
                await self._consume()
        except (AMQPError, ConnectionError, RuntimeError):
            log.warning("graph.circuit_follow_failed", state=state.value)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop_consuming(self) -> None:
        """Ask the broker for no more commands; those in flight carry on."""
        self.stopping = True
        self._handler.stopping.set()
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
        # The command runs in a task of its own, shielded from the delivery task that
        # aio-pika cancels when the channel closes: a command whose invite is under way is
        # finished and remembered, so that its redelivery is not sent to Graph again.
        task = asyncio.get_running_loop().create_task(self._process(message))
        self._active.add(task)
        self._idle.clear()
        task.add_done_callback(self._done)
        await asyncio.shield(task)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._active.discard(task)
        if not self._active:
            self._idle.set()

    async def _process(self, message: AbstractIncomingMessage) -> None:
        started = time.monotonic()
        self._metrics.commands_received.inc()
        try:
            handled = await self._handler.handle(to_delivery(message))
        except Exception:
            # A bug, not a verdict on the command: hand it back. After
            # COMMAND_MAX_REDELIVERIES the command is failed and dead-lettered as poison.
            log.exception("command.crashed", message_id=message.message_id)
            await self._settle(message, Settlement.REQUEUE, None)
            return
        event = handled.event
        confirmed = True
        if handled.retry_in is not None:
            confirmed = await self._publish_retry(message, handled)
        elif event is not None:
            confirmed = await self._publish_event(
                event, correlation_id(handled, message.message_id)
            )
            if handled.command is not None:
                # Remembered before the acknowledgement: if that is lost, the redelivery
                # is recognised and not sent to Graph again.
                self._handler.settled.remember(
                    handled.command.command_id, event, confirmed=confirmed
                )
        settlement = settlement_for(
            event.kind if event is not None else None,
            confirmed=confirmed,
            retry=handled.retry_in is not None,
            poison=handled.poison,
        )
        await self._settle(message, settlement, handled)
        self._log_settled(handled, settlement, message, started)

    async def _publish(
        self, exchange: AbstractExchange | None, message: aio_pika.Message, routing_key: str
    ) -> bool:
        """Publish and wait for the broker's confirmation; False when it did not confirm."""
        if exchange is None:
            return False
        try:
            await exchange.publish(message, routing_key=routing_key, timeout=PUBLISH_TIMEOUT)
        except (TimeoutError, AMQPError, ConnectionError, RuntimeError) as exc:
            self._metrics.outcome_publish_failures.inc()
            log.warning("publish.not_confirmed", routing_key=routing_key, error=type(exc).__name__)
            return False
        return True

    async def _publish_event(self, event: OutcomeEvent, correlation: str | None) -> bool:
        message = aio_pika.Message(
            event.to_json(),
            content_type=OUTCOME_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.id,
            correlation_id=correlation,
            type=event.type.value,
            timestamp=event.time,
            app_id="invite-worker",
        )
        confirmed = await self._publish(self._outcomes, message, event.type.value)
        if confirmed:
            tenant = event.data.tenant_id
            label = tenant if tenant in self._served else "other"
            self._metrics.outcomes.inc(event.type.value, label)
        return confirmed

    def _copy(self, message: AbstractIncomingMessage, extra: dict[str, Any]) -> aio_pika.Message:
        headers = {k: v for k, v in (message.headers or {}).items() if k not in _BROKER_HEADERS}
        headers.update({k: v for k, v in extra.items() if v is not None})
        return aio_pika.Message(
            message.body,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def _publish_retry(self, message: AbstractIncomingMessage, handled: Handled) -> bool:
        assert handled.retry_in is not None  # noqa: S101 - called only for retries
        bucket = delay_bucket(handled.retry_in)
        copy = self._copy(
            message,
            {
                ATTEMPTS_HEADER: handled.attempts,
                FIRST_RECEIVED_HEADER: round(handled.first_received * 1000),
                "x-invite-last-status": handled.http_status,
                "x-invite-last-error": handled.error_type,
            },
        )
        channel = self._publish_channel
        if channel is None:
            return False
        return await self._publish(
            channel.default_exchange, copy, self._settings.delay_queue(bucket)
        )

    async def _dead_letter(self, message: AbstractIncomingMessage, handled: Handled | None) -> None:
        """Keep the command in the dead-letter queue with headers that say why."""
        extra: dict[str, Any] = {"x-invite-fault-reason": "unknown"}
        if handled is not None:
            problems = getattr(handled.event.data, "problems", None) if handled.event else None
            extra = {
                "x-invite-fault-reason": "redelivered_too_often" if handled.poison else "rejected",
                "x-invite-error-type": handled.error_type,
                ATTEMPTS_HEADER: handled.attempts,
                "x-invite-last-status": handled.http_status,
                "x-invite-request-id": handled.request_id,
                "x-invite-outcome-id": handled.event.id if handled.event else None,
                "x-invite-problems": json.dumps([f"{p.field}: {p.problem}" for p in problems])[
                    :2000
                ]
                if problems
                else None,
            }
        if await self._publish(self._dead_letters, self._copy(message, extra), ""):
            self._metrics.dead_lettered.inc(str(extra["x-invite-fault-reason"]))
            await message.ack()
        else:
            # The broker's own dead-lettering, without the headers, rather than nothing.
            await message.nack(requeue=False)

    async def _settle(
        self, message: AbstractIncomingMessage, settlement: Settlement, handled: Handled | None
    ) -> None:
        try:
            match settlement:
                case Settlement.ACK | Settlement.RETRY_LATER:
                    await message.ack()
                case Settlement.DEAD_LETTER:
                    await self._dead_letter(message, handled)
                case Settlement.REQUEUE:
                    if not self.stopping:
                        await asyncio.sleep(REQUEUE_DELAY)
                    await message.nack(requeue=True)
        except (AMQPError, ConnectionError, RuntimeError):
            # The channel is gone; the broker redelivers every unsettled message.
            log.warning("command.settle_failed", settlement=settlement.value)

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
            retry_in=handled.retry_in,
            error_type=handled.error_type,
            reason=getattr(data, "reason", None),
            error_code=getattr(data, "error_code", None),
            problems=[f"{p.field}: {p.problem}" for p in getattr(data, "problems", ())] or None,
        )
