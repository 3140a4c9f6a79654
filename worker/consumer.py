"""The AMQP edge: topology, consuming commands, publishing outcomes, settling messages.

All aio-pika translation lives here. A command's message is settled only after its outcome
event is confirmed by the broker; `errors.settlement_for` decides how.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from worker.errors import OutcomeNotConfirmed, Settlement, settlement_for
from worker.handler import Delivery, Handled, InviteHandler
from worker.outcomes import OutcomeEvent
from worker.settings import Settings

log = structlog.get_logger("worker.consumer")

OUTCOME_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
#: Seconds before a command whose outcome the broker refused goes back to the queue, so
#: that a broker that keeps refusing is not hammered.
REQUEUE_DELAY = 1.0
PUBLISH_TIMEOUT = 10.0


async def declare_topology(
    channel: AbstractChannel, settings: Settings
) -> tuple[AbstractQueue, AbstractExchange]:
    """Declare (idempotently) every exchange and queue the worker uses.

    The command queue is a quorum queue: it survives a broker node's loss, counts
    deliveries, and dead-letters a message redelivered more than `COMMAND_DELIVERY_LIMIT`
    times. Outcomes that match no binding go to an alternate exchange and wait in
    `<OUTCOME_EXCHANGE>.unrouted` instead of being dropped.
    """
    dlx = await channel.declare_exchange(
        settings.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead = await channel.declare_queue(
        settings.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead.bind(dlx)
    unrouted_name = settings.unrouted_outcome_queue
    unrouted = await channel.declare_exchange(
        unrouted_name, aio_pika.ExchangeType.FANOUT, durable=True
    )
    unrouted_queue = await channel.declare_queue(
        unrouted_name, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await unrouted_queue.bind(unrouted)
    outcomes = await channel.declare_exchange(
        settings.outcome_exchange,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": unrouted_name},
    )
    commands = await channel.declare_queue(
        settings.command_queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": settings.dead_letter_exchange,
            "x-delivery-limit": settings.delivery_limit,
            # At-least-once dead-lettering: a rejected command is not dropped on its way
            # to the dead-letter queue. It requires reject-publish overflow.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    return commands, outcomes


def correlation_id(handled: Handled, message_id: str | None) -> str | None:
    """The commandId, or the incoming message_id when the body carried none."""
    return handled.event.data.command_id or message_id


class CommandConsumer:
    """Consumes the command queue with bounded concurrency and settles every message."""

    def __init__(self, settings: Settings, handler: InviteHandler) -> None:
        self._settings = settings
        self._handler = handler
        self._queue: AbstractQueue | None = None
        self._outcomes: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        self._active: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.stopping = False

    async def start(self, connection: AbstractRobustConnection) -> None:
        publish_channel = await connection.channel(publisher_confirms=True)
        commands, self._outcomes = await declare_topology(publish_channel, self._settings)
        consume_channel = await connection.channel(publisher_confirms=False)
        await consume_channel.set_qos(prefetch_count=self._settings.prefetch_count)
        self._queue = await consume_channel.get_queue(commands.name, ensure=False)
        self._consumer_tag = await self._queue.consume(self._on_message)

    async def stop_consuming(self) -> None:
        """Ask the broker for no more commands; those in flight carry on."""
        self.stopping = True
        if self._queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                await self._queue.cancel(tag)
            except (TimeoutError, AMQPError, ConnectionError):
                log.warning("consumer.cancel_failed")

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
        # aio-pika runs each delivery in a task of its own.
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        self._idle.clear()
        try:
            await self._process(message)
        finally:
            self._active.discard(task)
            if not self._active:
                self._idle.set()

    async def _process(self, message: AbstractIncomingMessage) -> None:
        started = time.monotonic()
        delivery = Delivery(message.body, message.content_type, message.message_id)
        try:
            handled = await self._handler.handle(delivery)
        except Exception:
            # A bug, not a verdict on the command: hand it back. The delivery limit
            # dead-letters a command that keeps failing this way.
            log.exception("command.crashed", message_id=message.message_id)
            await self._settle(message, Settlement.REQUEUE)
            return
        try:
            await self._publish(handled.event, correlation_id(handled, message.message_id))
        except OutcomeNotConfirmed as exc:
            settlement = settlement_for(None)
            self._handler.remember_unpublished(handled)
            log.warning("outcome.not_confirmed", error=str(exc), outcome=handled.event.type.value)
        else:
            settlement = settlement_for(handled.event.kind)
            self._handler.forget_unpublished(handled)
        await self._settle(message, settlement)
        self._log_settled(handled, settlement, message, started)

    async def _publish(self, event: OutcomeEvent, correlation: str | None) -> None:
        if self._outcomes is None:
            raise OutcomeNotConfirmed("the outcome exchange is not declared")
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
        try:
            await self._outcomes.publish(
                message, routing_key=event.type.value, timeout=PUBLISH_TIMEOUT
            )
        except (TimeoutError, AMQPError, ConnectionError, RuntimeError) as exc:
            raise OutcomeNotConfirmed(f"{type(exc).__name__}: {exc}") from None

    async def _settle(self, message: AbstractIncomingMessage, settlement: Settlement) -> None:
        try:
            match settlement:
                case Settlement.ACK:
                    await message.ack()
                case Settlement.DEAD_LETTER:
                    await message.nack(requeue=False)
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
        data = handled.event.data
        log.info(
            "command.settled",
            command_id=data.command_id,
            call_id=data.call_id,
            tenant_id=data.tenant_id,
            outcome=handled.event.type.value,
            settlement=settlement.value,
            http_status=handled.http_status,
            request_id=handled.request_id,
            attempts=handled.attempts,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            message_id=message.message_id,
            redelivered=message.redelivered,
            replayed=handled.replayed,
            reason=getattr(data, "reason", None),
            error_code=getattr(data, "error_code", None),
            problems=[f"{p.field}: {p.problem}" for p in getattr(data, "problems", ())] or None,
        )
