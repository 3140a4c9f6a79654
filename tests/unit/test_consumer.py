"""The consumer's own bookkeeping, with fakes for the queue and the channel (no broker)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.fakes import FakeGraph, FakeTokens
from tests.unit.test_handler import handler, settings
from worker.amqp.consumer import CommandConsumer
from worker.core.circuit import CircuitState
from worker.observability.metrics import Metrics


class FakeQueue:
    """Counts the consumers started and not cancelled; each call takes a moment, like AMQP."""

    def __init__(self) -> None:
        self.consumers: set[str] = set()
        self.most = 0
        self._next = 0

    async def consume(self, callback: Any) -> str:
        await asyncio.sleep(0.01)
        self._next += 1
        tag = f"ctag-{self._next}"
        self.consumers.add(tag)
        self.most = max(self.most, len(self.consumers))
        return tag

    async def cancel(self, tag: str) -> None:
        await asyncio.sleep(0.01)
        self.consumers.discard(tag)


class FakeChannel:
    def __init__(self) -> None:
        self.prefetch: list[int] = []

    async def set_qos(self, prefetch_count: int) -> None:
        await asyncio.sleep(0.005)
        self.prefetch.append(prefetch_count)


def consumer() -> tuple[CommandConsumer, FakeQueue, FakeChannel]:
    made = CommandConsumer(settings(), handler(FakeGraph(), FakeTokens()), metrics=Metrics())
    queue, channel = FakeQueue(), FakeChannel()
    made._queue = queue  # type: ignore[assignment]
    made._consume_channel = channel  # type: ignore[assignment]
    return made, queue, channel


async def settle_background(made: CommandConsumer) -> None:
    while made._background:
        await asyncio.gather(*made._background)


async def test_overlapping_half_open_and_closed_transitions_start_one_consumer() -> None:
    made, queue, channel = consumer()
    made._on_circuit_change(CircuitState.HALF_OPEN)
    made._on_circuit_change(CircuitState.CLOSED)
    await settle_background(made)
    assert queue.most == 1
    assert len(queue.consumers) == 1
    # The closed circuit's prefetch was set last, and its consumer started after it.
    assert channel.prefetch[-1] == made._settings.prefetch_count


async def test_concurrent_starts_start_one_consumer() -> None:
    made, queue, _ = consumer()
    await asyncio.gather(made._consume(), made._consume(), made._consume())
    assert queue.most == 1
    await asyncio.gather(made._cancel(), made._consume())
    assert len(queue.consumers) == 1
