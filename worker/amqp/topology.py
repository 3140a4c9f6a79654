"""The broker topology the worker declares: queues, exchanges, and what binds them.

The command queue is a quorum queue: it survives a broker node's loss, counts deliveries,
and dead-letters a message redelivered more than `COMMAND_DELIVERY_LIMIT` times. Delay
queues hold retries for a fixed time each, then dead-letter them back into the command
queue: a retry waits in the longest one not longer than its wait and carries the time its
next attempt may start (`x-invite-retry-at-ms`), so that it never comes back late; back
early, the handler waits the remainder in the process or sends it to a shorter delay queue.
(Fixed-TTL queues keep first-in first-out order, which a per-message TTL on one delay queue
would not: such messages expire only at the head of the queue.) Outcomes that match no
binding go to an alternate exchange and wait in `<OUTCOME_EXCHANGE>.unrouted` instead of
being dropped.
"""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from worker.settings import Settings

#: Delay queues, in seconds: a retry waits in the longest one not longer than needed.
DELAY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


def _quorum(**arguments: Any) -> dict[str, Any]:
    # At-least-once dead-lettering: nothing is dropped on its way out of a queue.
    # It requires reject-publish overflow.
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        **arguments,
    }


async def declare_topology(
    channel: AbstractChannel, settings: Settings
) -> tuple[AbstractQueue, AbstractExchange, AbstractExchange]:
    """Declare (idempotently) every exchange and queue the worker uses."""
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
        arguments=_quorum(
            **{
                "x-dead-letter-exchange": settings.dead_letter_exchange,
                "x-delivery-limit": settings.delivery_limit,
            }
        ),
    )
    for seconds in DELAY_BUCKETS:
        await channel.declare_queue(
            settings.delay_queue(seconds),
            durable=True,
            arguments=_quorum(
                **{
                    "x-message-ttl": seconds * 1000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": settings.command_queue,
                }
            ),
        )
    return commands, outcomes, dlx


def topology_names(settings: Settings) -> tuple[list[str], list[str]]:
    """The names of every queue and exchange `declare_topology` declares."""
    queues = [
        settings.command_queue,
        settings.dead_letter_queue,
        settings.unrouted_outcome_queue,
        *(settings.delay_queue(seconds) for seconds in DELAY_BUCKETS),
    ]
    exchanges = [
        settings.outcome_exchange,
        settings.dead_letter_exchange,
        settings.unrouted_outcome_queue,
    ]
    return queues, exchanges


def delay_bucket(seconds: float) -> int:
    """The longest delay queue that waits no longer than `seconds` (the shortest for less)."""
    return max((b for b in DELAY_BUCKETS if b <= seconds), default=DELAY_BUCKETS[0])
