"""Carrying out a settlement on the broker: ack, a delayed retry's ack, dead-letter, requeue.

`worker.core.settlement.settlement_for` decides; this module only acts on the decision.
"""

from __future__ import annotations

import asyncio

import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError

from worker.amqp.publishing import REQUEUE_DELAY, Publisher
from worker.core.handler import Handled
from worker.core.settlement import Settlement

log = structlog.get_logger("worker.amqp.settlement")


async def settle(
    message: AbstractIncomingMessage,
    settlement: Settlement,
    handled: Handled | None,
    *,
    publisher: Publisher,
    stopping: bool,
) -> None:
    """Carry out `settlement`; a channel that is gone leaves the message to the broker."""
    try:
        match settlement:
            case Settlement.ACK | Settlement.RETRY_LATER:
                await message.ack()
            case Settlement.DEAD_LETTER:
                await publisher.dead_letter(message, handled)
            case Settlement.REQUEUE:
                if not stopping:
                    await asyncio.sleep(REQUEUE_DELAY)
                await message.nack(requeue=True)
    except (AMQPError, ConnectionError, RuntimeError):
        # The channel is gone; the broker redelivers every unsettled message.
        log.warning("command.settle_failed", settlement=settlement.value)
