"""Operator tools for the dead-letter queue: list what is in it, and replay commands.

`invite-worker dead-letters list` prints one JSON line per dead-lettered command with why it
is there; `invite-worker dead-letters replay --all` (or `--command-id ID`, repeatable) moves
commands back to the command queue, once the cause is fixed. A replayed command starts
afresh: the worker's fault and retry headers and the broker's x-death are removed.

Neither requeues a message to look at it: a quorum queue counts every requeue as a delivery
(RabbitMQ 4 drops a message after 20 by default), so each message looked at is published
back to the end of the dead-letter queue, confirmed, and only then acknowledged. A crash in
between leaves a dead letter twice rather than none.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from worker.settings import Settings

_DROPPED_HEADER_PREFIXES = (
    "x-invite-",
    "x-death",
    "x-first-death",
    "x-last-death",
    "x-delivery-count",
)
#: Set by the broker on delivery; a copy put back starts with none.
_DELIVERY_HEADERS = frozenset({"x-delivery-count"})


@dataclass(frozen=True, slots=True)
class DeadLetter:
    command_id: str | None
    message_id: str | None
    headers: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        why = {k: v for k, v in self.headers.items() if k.startswith("x-invite-")}
        return {"commandId": self.command_id, "messageId": self.message_id, **why}


def _command_id(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    value = document.get("commandId") if isinstance(document, dict) else None
    return value if isinstance(value, str) else None


def _dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    headers = {k: v for k, v in (message.headers or {}).items() if isinstance(k, str)}
    return DeadLetter(_command_id(message.body), message.message_id, headers)


async def _take_all(
    channel: aio_pika.abc.AbstractChannel, name: str
) -> list[AbstractIncomingMessage]:
    """Every message in the queue now, unacknowledged (so that none is lost on a crash)."""
    queue = await channel.declare_queue(name, passive=True)
    count = queue.declaration_result.message_count or 0
    taken = []
    for _ in range(count):
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            break
        taken.append(message)
    return taken


def _copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """The message with these headers, its other properties as they were."""
    return aio_pika.Message(
        message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
        headers=headers,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def _put_back(
    channel: aio_pika.abc.AbstractChannel, name: str, message: AbstractIncomingMessage
) -> None:
    """Publish the message back to the queue's end (confirmed), then acknowledge it.

    Not a requeue: a requeue counts as a delivery toward the queue's delivery limit.
    """
    headers = {
        k: v
        for k, v in (message.headers or {}).items()
        if isinstance(k, str) and k not in _DELIVERY_HEADERS
    }
    await channel.default_exchange.publish(_copy(message, headers), routing_key=name)
    await message.ack()


async def list_dead_letters(settings: Settings) -> list[DeadLetter]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        messages = await _take_all(channel, settings.dead_letter_queue)
        letters = [_dead_letter(m) for m in messages]
        for message in messages:
            await _put_back(channel, settings.dead_letter_queue, message)
    return letters


async def replay(settings: Settings, command_ids: Collection[str] | None) -> list[DeadLetter]:
    """Move dead-lettered commands (all when `command_ids` is None) to the command queue."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    replayed = []
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        messages = await _take_all(channel, settings.dead_letter_queue)
        for message in messages:
            letter = _dead_letter(message)
            if command_ids is not None and letter.command_id not in command_ids:
                await _put_back(channel, settings.dead_letter_queue, message)
                continue
            headers = {
                k: v
                for k, v in letter.headers.items()
                if not k.startswith(_DROPPED_HEADER_PREFIXES)
            }
            copy = _copy(message, headers)
            # Confirmed before the dead letter is removed: a crash in between duplicates
            # the command in the queue rather than losing it.
            await channel.default_exchange.publish(copy, routing_key=settings.command_queue)
            await message.ack()
            replayed.append(letter)
    return replayed
