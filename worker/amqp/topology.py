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

With DECLARE_TOPOLOGY=false (queues and exchanges provisioned by the platform, no configure
permission) nothing is declared: `verify_topology` checks passively that each exists.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)

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


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    """An exchange as the worker declares it."""

    name: str
    type: aio_pika.ExchangeType
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue as the worker declares it."""

    name: str
    arguments: dict[str, Any]
    #: The fanout exchange it is bound to, if any.
    bound_to: str | None = None


def topology_objects(settings: Settings) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
    """Every exchange and queue the worker uses, with the arguments it expects, in order."""
    unrouted = settings.unrouted_outcome_queue
    exchanges = [
        ExchangeSpec(settings.dead_letter_exchange, aio_pika.ExchangeType.FANOUT),
        ExchangeSpec(unrouted, aio_pika.ExchangeType.FANOUT),
        ExchangeSpec(
            settings.outcome_exchange,
            aio_pika.ExchangeType.TOPIC,
            {"alternate-exchange": unrouted},
        ),
    ]
    queues = [
        QueueSpec(
            settings.dead_letter_queue,
            {"x-queue-type": "quorum"},
            bound_to=settings.dead_letter_exchange,
        ),
        QueueSpec(unrouted, {"x-queue-type": "quorum"}, bound_to=unrouted),
        QueueSpec(
            settings.command_queue,
            _quorum(
                **{
                    "x-dead-letter-exchange": settings.dead_letter_exchange,
                    "x-delivery-limit": settings.delivery_limit,
                }
            ),
        ),
        *(
            QueueSpec(
                settings.delay_queue(seconds),
                _quorum(
                    **{
                        "x-message-ttl": seconds * 1000,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": settings.command_queue,
                    }
                ),
            )
            for seconds in DELAY_BUCKETS
        ),
    ]
    return exchanges, queues


class TopologyError(Exception):
    """The broker's topology is not what the worker needs; it cannot start (exit 2)."""

    event = "topology.unusable"

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        #: What the log line names.
        self.fields = fields


class TopologyMissing(TopologyError):
    """DECLARE_TOPOLOGY=false and queues or exchanges do not exist."""

    event = "topology.missing"

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"missing: {', '.join(missing)}", missing=missing)
        self.missing = missing


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<argument>[^']*)' for (?P<kind>queue|exchange) '(?P<name>[^']*)'"
    r" in vhost '[^']*': received (?P<expected>.*) but current is (?P<found>.*)$"
)


class TopologyMismatch(TopologyError):
    """A queue or exchange exists with arguments other than the worker's."""

    event = "topology.mismatch"

    def __init__(self, reply: str) -> None:
        match = _INEQUIVALENT.search(reply)
        if match is None:
            super().__init__(reply, reply=reply)
            return
        named = f"{match['kind']} '{match['name']}'"
        super().__init__(
            f"{named}: argument {match['argument']} is {match['found']}, "
            f"the worker expects {match['expected']}",
            object=named,
            argument=match["argument"],
            expected=match["expected"],
            found=match["found"],
        )


async def declare_topology(
    channel: AbstractChannel, settings: Settings
) -> tuple[AbstractQueue, AbstractExchange, AbstractExchange]:
    """Declare (idempotently) every exchange and queue the worker uses.

    Raises `TopologyMismatch` when one exists with other arguments.
    """
    exchanges, queues = topology_objects(settings)
    declared: dict[str, AbstractExchange] = {}
    try:
        for exchange in exchanges:
            declared[exchange.name] = await channel.declare_exchange(
                exchange.name, exchange.type, durable=True, arguments=exchange.arguments or None
            )
        by_name: dict[str, AbstractQueue] = {}
        for queue in queues:
            by_name[queue.name] = await channel.declare_queue(
                queue.name, durable=True, arguments=queue.arguments
            )
            if queue.bound_to is not None:
                await by_name[queue.name].bind(declared[queue.bound_to])
    except ChannelPreconditionFailed as exc:
        raise TopologyMismatch(str(exc)) from None
    return (
        by_name[settings.command_queue],
        declared[settings.outcome_exchange],
        declared[settings.dead_letter_exchange],
    )


async def verify_topology(connection: AbstractConnection, settings: Settings) -> bool:
    """Check, without creating anything, that every queue and exchange exists as declared.

    Raises `TopologyMissing` naming whatever does not exist, and `TopologyMismatch` for one
    with other arguments. AMQP shows arguments only to a declare that may create: without
    configure permission they cannot be compared, and this returns False (True otherwise).
    Bindings cannot be checked through AMQP at all.
    """
    exchanges, queues = topology_objects(settings)
    missing: list[str] = []
    for exchange in exchanges:
        async with _channel(connection) as channel:
            try:
                await channel.declare_exchange(exchange.name, exchange.type, passive=True)
            except ChannelNotFoundEntity:
                missing.append(f"exchange '{exchange.name}'")
    for queue in queues:
        async with _channel(connection) as channel:
            try:
                await channel.declare_queue(queue.name, passive=True)
            except ChannelNotFoundEntity:
                missing.append(f"queue '{queue.name}'")
    if missing:
        raise TopologyMissing(missing)
    # Every object exists: an equivalent declare changes nothing, and a different one is
    # refused with the argument and both values.
    try:
        for exchange in exchanges:
            async with _channel(connection) as channel:
                await channel.declare_exchange(
                    exchange.name, exchange.type, durable=True, arguments=exchange.arguments or None
                )
        for queue in queues:
            async with _channel(connection) as channel:
                await channel.declare_queue(queue.name, durable=True, arguments=queue.arguments)
    except ChannelPreconditionFailed as exc:
        raise TopologyMismatch(str(exc)) from None
    except ChannelAccessRefused:
        return False
    return True


@contextlib.asynccontextmanager
async def _channel(connection: AbstractConnection) -> AsyncIterator[AbstractChannel]:
    """A channel of its own for one check: a failed declare closes its channel."""
    channel = await connection.channel()
    try:
        yield channel
    finally:
        if not channel.is_closed:
            await channel.close()


async def existing_topology(
    channel: AbstractChannel, settings: Settings
) -> tuple[AbstractQueue, AbstractExchange, AbstractExchange]:
    """The command queue, outcome and dead-letter exchanges, looked up passively."""
    return (
        await channel.get_queue(settings.command_queue, ensure=True),
        await channel.get_exchange(settings.outcome_exchange, ensure=True),
        await channel.get_exchange(settings.dead_letter_exchange, ensure=True),
    )


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
