"""Bodies too large to be commands are dropped as they arrive, not assembled in memory.

AMQP delivers a message whole, and aiormq assembles each body in memory before the consumer
sees it: at a prefetch of 16, bodies of 15 MiB would hold 240 MiB before `MAX_COMMAND_BYTES`
could refuse one. AMQP 0-9-1 has no per-message size limit a consumer can ask for
(RabbitMQ does not implement `basic.qos` `prefetch_size`), and neither aio-pika nor aiormq
offers one, so this module adds it at the one place it can be done: the channel's reading of
a delivery's content frames.

A delivery announcing more than `dropped_above(max_command_bytes)` bytes has its body frames
read off the channel and discarded one by one; the consumer gets an empty `DroppedBody`
that knows the announced size. The message itself is not lost: the worker rejects it with
`nack(requeue=False)`, and the broker, which still holds it whole, dead-letters it.
Bodies between `MAX_COMMAND_BYTES` and the drop threshold are kept, so that their
dead-letter copy carries the worker's headers (at most the prefetch count of them, 64 MiB at
a prefetch of 16).

The aiormq channel of each aio-pika channel is given the bounded reading when it opens,
before any consumer is restored on it (`RobustChannel._on_open`), so a reconnect keeps it.
"""

from __future__ import annotations

from typing import Any

import aiormq
from aio_pika.robust_channel import RobustChannel
from aio_pika.robust_connection import RobustConnection
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

#: Bodies up to this size are kept even when over MAX_COMMAND_BYTES (see the module text).
KEEP_UP_TO = 4 * 1024 * 1024


def dropped_above(max_command_bytes: int) -> int:
    """The body size above which a delivery's body is dropped unread."""
    return max(max_command_bytes, KEEP_UP_TO)


class DroppedBody(bytes):
    """The empty body of a delivery whose body was dropped as it arrived; `size` was announced."""

    size: int

    def __new__(cls, size: int) -> DroppedBody:
        body = super().__new__(cls)
        body.size = size
        return body


def body_size(body: bytes) -> int:
    """The size of a body as the publisher sent it, also when it was dropped."""
    return body.size if isinstance(body, DroppedBody) else len(body)


class _BoundedChannel(aiormq.Channel):
    max_body_bytes: int

    async def _read_content(self, frame: Any, header: ContentHeader) -> DeliveredMessage:
        if not isinstance(frame, spec.Basic.Deliver) or header.body_size <= self.max_body_bytes:
            return await super()._read_content(frame, header)
        left = header.body_size
        while left > 0:
            content = await self._get_frame()
            if not isinstance(content, ContentBody):
                raise ValueError(f"Unexpected frame {content!r}", content)
            left -= len(content.value)
        return DeliveredMessage(
            delivery=frame, header=header, body=DroppedBody(header.body_size), channel=self
        )


def bound_bodies(channel: aiormq.abc.AbstractChannel, max_body_bytes: int) -> None:
    """Give an open aiormq channel the bounded reading of deliveries."""
    if not isinstance(channel, aiormq.Channel):  # pragma: no cover - aiormq is the transport
        raise TypeError(f"not an aiormq channel: {channel!r}")
    # aiormq builds its channels itself (`Connection.channel`), so the class is swapped on
    # the instance; `_BoundedChannel` adds no state but one attribute.
    channel.__class__ = _BoundedChannel
    channel.max_body_bytes = max_body_bytes  # type: ignore[attr-defined]


def bounded_connection_class(max_body_bytes: int) -> type[RobustConnection]:
    """A robust connection whose channels drop delivered bodies over `max_body_bytes`."""

    class BoundedChannel(RobustChannel):
        async def _on_open(self) -> None:
            bound_bodies(await self.get_underlay_channel(), max_body_bytes)
            await super()._on_open()

    class BoundedConnection(RobustConnection):
        CHANNEL_CLASS = BoundedChannel

    return BoundedConnection
