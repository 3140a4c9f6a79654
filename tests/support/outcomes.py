"""Outcome events as the tests and the benchmark see them, and one collector for them.

Importable without pytest: `benchmarks/` collects its outcomes with the same class.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue


@dataclass(frozen=True)
class Outcome:
    """One outcome event as it arrived: its AMQP properties and its decoded body."""

    routing_key: str
    correlation_id: str | None
    event: dict[str, Any]
    #: The AMQP message_id: the CloudEvents id of the event.
    event_id: str | None = None
    content_type: str | None = None
    #: time.monotonic() when it arrived.
    arrived: float = 0.0
    #: The AMQP headers (trace context, correlation fallback).
    headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> Outcome:
        """Any message, even one whose body is not a JSON object (the books must count it)."""
        try:
            event = json.loads(message.body)
        except ValueError:
            event = {"unparseable": message.body[:200].decode(errors="replace")}
        return cls(
            routing_key=message.routing_key or "",
            correlation_id=message.correlation_id,
            event=event if isinstance(event, dict) else {"not_an_object": event},
            event_id=message.message_id,
            content_type=message.content_type,
            arrived=time.monotonic(),
            headers=dict(message.headers or {}),
        )

    @property
    def data(self) -> dict[str, Any]:
        data = self.event.get("data")
        return data if isinstance(data, dict) else {}


class OutcomeCollector:
    """Collects outcome events from a queue; `subscribe` makes a private one on an exchange."""

    def __init__(self, queue: AbstractQueue | None = None) -> None:
        self.queue = queue
        self.outcomes: list[Outcome] = []
        self._changed = asyncio.Event()
        self._consumer_tag: str | None = None

    async def subscribe(self, channel: AbstractChannel, outcome_exchange: str) -> None:
        """Every event published to `outcome_exchange` from now on, on an exclusive queue."""
        self.queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await self.queue.bind(outcome_exchange, routing_key="#")
        self._consumer_tag = await self.queue.consume(self.on_message, no_ack=True)

    async def unsubscribe(self) -> None:
        if self.queue is not None and self._consumer_tag is not None:
            await self.queue.cancel(self._consumer_tag)
            await self.queue.delete(if_unused=False, if_empty=False)
            self._consumer_tag = None

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.received(Outcome.from_message(message))

    def received(self, outcome: Outcome) -> None:
        """Keeps `outcome`; subclasses add their own bookkeeping."""
        self.outcomes.append(outcome)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 20) -> list[Outcome]:
        """Wait until at least `count` outcomes arrived; fail the test after `timeout`."""

        async def enough() -> None:
            while len(self.outcomes) < count:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"expected {count} outcomes within {timeout}s, got {len(self.outcomes)}"
            ) from None
        return list(self.outcomes)

    def by_command(self) -> dict[str | None, list[Outcome]]:
        grouped: dict[str | None, list[Outcome]] = {}
        for outcome in self.outcomes:
            grouped.setdefault(outcome.data.get("commandId"), []).append(outcome)
        return grouped
