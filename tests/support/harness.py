"""Test helpers that talk to the real broker: publish commands, collect outcome events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, Self

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from tests.support.outcomes import OutcomeCollector
from worker.amqp.topology import topology_names
from worker.app import Worker
from worker.settings import Settings

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TENANT_A = "11111111-1111-4111-8111-111111111111"
TENANT_B = "22222222-2222-4222-8222-222222222222"


class Broker:
    """A connection of the test's own to the local RabbitMQ."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self._cleanup: list[Settings] = []

    async def __aenter__(self) -> Self:
        self.connection = await aio_pika.connect_robust(self.url)
        self.channel = await self.connection.channel()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.connection is not None
        channel = await self.connection.channel()
        for settings in self._cleanup:
            queues, exchanges = topology_names(settings)
            for queue in queues:
                await channel.queue_delete(queue)
            for exchange in exchanges:
                await channel.exchange_delete(exchange)
        await self.connection.close()

    def clean_up_after(self, settings: Settings) -> None:
        self._cleanup.append(settings)

    async def publish(
        self,
        settings: Settings,
        body: bytes | dict[str, Any],
        *,
        content_type: str | None = "application/json",
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        assert self.channel is not None
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                raw,
                content_type=content_type,
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=headers,
            ),
            routing_key=settings.command_queue,
        )

    async def collector(self, settings: Settings) -> OutcomeCollector:
        """Start collecting every outcome event published to the settings' exchange."""
        assert self.connection is not None
        channel = await self.connection.channel()
        exchange = await channel.get_exchange(settings.outcome_exchange, ensure=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="#")
        collector = OutcomeCollector(queue)
        await queue.consume(collector.on_message, no_ack=True)
        return collector

    async def queue_depth(self, name: str) -> int:
        """Messages ready in a queue (not those delivered and unacknowledged)."""
        assert self.connection is not None
        channel = await self.connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        await channel.close()
        count = queue.declaration_result.message_count
        assert count is not None
        return count

    async def drain_queue(
        self, name: str, *, expect: int, timeout: float = 10
    ) -> list[AbstractIncomingMessage]:
        """Take (and acknowledge) `expect` messages from a queue, waiting for them."""
        assert self.connection is not None
        channel = await self.connection.channel()
        queue = await channel.get_queue(name, ensure=True)
        taken: list[AbstractIncomingMessage] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(taken) < expect and asyncio.get_running_loop().time() < deadline:
            message = await queue.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                taken.append(message)
        await channel.close()
        return taken


@asynccontextmanager
async def running_worker(
    settings: Settings, broker: Broker, **kwargs: Any
) -> AsyncIterator[tuple[Worker, OutcomeCollector]]:
    """A started worker and a collector of its outcomes; the worker is stopped afterwards."""
    broker.clean_up_after(settings)
    worker = Worker(settings, **kwargs)
    await worker.start()
    try:
        collector = await broker.collector(settings)
        yield worker, collector
    finally:
        await worker.stop(grace_period=5)


def command(
    *,
    command_id: str,
    call_id: str = "57dab8b1-894c-409a-b240-bd8beae78896",
    participants: Iterable[dict[str, Any]] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A valid command body; keyword arguments add or replace top-level fields."""
    body: dict[str, Any] = {
        "commandId": command_id,
        "callId": call_id,
        "participants": list(participants)
        if participants is not None
        else [{"identity": {"user": {"id": "278405a3-f568-4b3e-b684-009193463064"}}}],
    }
    body.update(fields)
    return body


class IsolatedSettings(Settings):
    """Settings from the given values alone: the machine's environment does not leak in."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def isolated_settings(values: dict[str, Any]) -> Settings:
    return IsolatedSettings.model_validate(values)
