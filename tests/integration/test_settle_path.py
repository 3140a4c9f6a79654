"""Every delivery ends settled: ids too long for AMQP, crashes while handling and settling,
and dead-letter listing that does not count as deliveries. Real broker, real simulator."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from typing import Any, cast

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from structlog.testing import capture_logs

from tests.conftest import make_settings
from tests.support.harness import Broker, command, running_worker
from tests.support.queues import wait_for_counts
from worker.amqp.publishing import CORRELATION_FALLBACK_HEADER, CRASHES_HEADER, Publisher
from worker.core.outcomes import OutcomeEvent
from worker.devtools.simulator import SimulatorThread
from worker.observability.metrics import Metrics
from worker.ops import deadletters
from worker.settings import Settings

pytestmark = pytest.mark.integration

LONG_IDS = 75
SURROGATES = 5


def new_id() -> str:
    return str(uuid.uuid4())


async def outcome_queue(broker: Broker, settings: Settings) -> aio_pika.abc.AbstractQueue:
    """A queue of the test's own bound to the outcome exchange, to read outcome headers."""
    assert broker.connection is not None
    channel = await broker.connection.channel()
    exchange = await channel.declare_exchange(
        settings.outcome_exchange,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": settings.unrouted_outcome_queue},
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key="#")
    return queue


async def take(
    queue: aio_pika.abc.AbstractQueue, count: int, timeout: float = 30
) -> list[AbstractIncomingMessage]:
    taken: list[AbstractIncomingMessage] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(taken) < count and asyncio.get_running_loop().time() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.05)
        else:
            taken.append(message)
    return taken


async def test_commands_whose_ids_do_not_fit_amqp_are_all_settled_and_the_worker_goes_on(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    settings = make_settings(simulator)
    # 256 ASCII characters, 200 two-byte ones (400 bytes), and a few lone surrogates that
    # JSON allows and UTF-8 does not: more than the prefetch (64) of each bad kind.
    long_ids = ["a" * 256, "é" * 200]
    async with running_worker(settings, broker):
        outcomes = await outcome_queue(broker, settings)
        for index in range(LONG_IDS):
            body = json.dumps({"commandId": long_ids[index % 2], "callId": "x"}).encode()
            await broker.publish(settings, body, message_id=f"long-{index}")
        for index in range(SURROGATES):
            body = json.dumps({"commandId": "\ud800" * 3, "callId": "x"}).encode()
            await broker.publish(settings, body, message_id=f"long-{LONG_IDS + index}")
        valid = new_id()
        await broker.publish(settings, command(command_id=valid), message_id=valid)
        published = await take(outcomes, LONG_IDS + SURROGATES + 1, timeout=20)
        counts = await wait_for_counts(settings.command_queue, (0, 0), timeout=15)
    assert counts == (0, 0), "(ready, unacknowledged) in the command queue"
    by_correlation = {m.correlation_id: m for m in published}
    assert len(published) == LONG_IDS + SURROGATES + 1
    assert by_correlation[valid].routing_key == "invite.accepted"
    rejected = [m for m in published if m.routing_key == "invite.rejected"]
    assert sorted(m.correlation_id or "" for m in rejected) == sorted(
        f"long-{i}" for i in range(LONG_IDS + SURROGATES)
    )
    # Too long for a correlation_id: the message_id instead, and the outcome says so.
    too_long = [m for m in rejected if json.loads(m.body)["data"]["commandId"] is not None]
    assert len(too_long) == LONG_IDS
    assert {m.headers.get(CORRELATION_FALLBACK_HEADER) for m in too_long} == {"message_id"}
    assert await broker.queue_depth(settings.dead_letter_queue) == LONG_IDS + SURROGATES


class TypeErrorPublisher(Publisher):
    """Raises what the AMQP library raises for a property that does not fit, every time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    async def publish_event(
        self,
        event: OutcomeEvent,
        correlation: str | None,
        *,
        fallback: str | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> bool:
        self.calls += 1
        raise TypeError("injected: the outcome cannot be encoded")


async def test_an_unexpected_exception_on_the_settle_path_still_settles_logs_and_counts(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    settings = make_settings(simulator, COMMAND_MAX_REDELIVERIES=1)
    publishers: list[TypeErrorPublisher] = []

    def make(
        s: Settings,
        channel: AbstractChannel,
        outcomes: AbstractExchange,
        dead: AbstractExchange,
        metrics: Metrics,
    ) -> Publisher:
        publishers.append(TypeErrorPublisher(s, channel, outcomes, dead, metrics=metrics))
        return publishers[0]

    command_id = new_id()
    with capture_logs() as logs:
        async with running_worker(settings, broker, publisher=make) as (worker, _):
            await broker.publish(settings, command(command_id=command_id), message_id=command_id)
            [dead] = await broker.drain_queue(settings.dead_letter_queue, expect=1, timeout=30)
            counts = await wait_for_counts(settings.command_queue, (0, 0))
            crashed = worker.metrics.commands_crashed
    assert counts == (0, 0), "(ready, unacknowledged) in the command queue"
    assert json.loads(dead.body)["commandId"] == command_id
    # Handled once (Graph called once), its outcome replayed once from memory, then the
    # poison outcome: each publish raised, and the broker dead-lettered the last delivery.
    assert len(simulator.invites) == 1
    assert publishers[0].calls == 3
    assert (crashed.value("settle"), crashed.value("fallback")) == (2, 1)
    assert dead.headers[CRASHES_HEADER] == 1
    # The broker's own dead-lettering: the latest death first (after the delay queue's).
    deaths = cast("list[dict[str, Any]]", dead.headers["x-death"])
    assert (deaths[0]["reason"], deaths[0]["queue"]) == ("rejected", settings.command_queue)
    lines = [line for line in logs if line["event"] == "command.crashed"]
    assert [line["stage"] for line in lines] == ["settle", "settle", "fallback"]


class ExplodingTransport(httpx.AsyncBaseTransport):
    """A Graph transport with a bug: every request raises what no one maps."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        raise ZeroDivisionError("injected handler fault")


async def test_a_command_that_crashes_the_handler_is_bounded_by_the_crash_counter(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    settings = make_settings(simulator, COMMAND_MAX_REDELIVERIES=2)
    transport = ExplodingTransport()
    command_id = new_id()
    async with running_worker(settings, broker, transport=transport) as (worker, collector):
        await broker.publish(settings, command(command_id=command_id), message_id=command_id)
        [outcome] = await collector.wait_for(1, timeout=30)
        [dead] = await broker.drain_queue(settings.dead_letter_queue, expect=1, timeout=30)
        counts = await wait_for_counts(settings.command_queue, (0, 0))
        crashes = worker.metrics.commands_crashed.value("handle")
    # The first delivery and COMMAND_MAX_REDELIVERIES more, each a fresh copy that the
    # broker delivers for the first time: its x-delivery-count never rises.
    assert transport.requests == 3
    assert crashes == 3
    assert outcome.routing_key == "invite.failed"
    assert outcome.correlation_id == command_id
    assert outcome.data["reason"] == "redelivered_too_often"
    assert outcome.data["errorMessage"] == "handling crashed 3 times"
    assert dead.headers["x-invite-fault-reason"] == "redelivered_too_often"
    assert dead.headers[CRASHES_HEADER] == 3
    assert "x-death" not in dead.headers
    assert counts == (0, 0)


async def test_listing_dead_letters_does_not_count_as_delivering_them(
    broker: Broker, simulator: SimulatorThread, rabbitmq: str
) -> None:
    settings = make_settings(simulator)
    command_id = new_id()
    async with running_worker(settings, broker) as (_, collector):
        await broker.publish(settings, command(command_id=command_id, callId="a/b"))
        await collector.wait_for(1)
        for _ in range(100):
            if await broker.queue_depth(settings.dead_letter_queue) == 1:
                break
            await asyncio.sleep(0.05)
        for _ in range(3):
            [letter] = await deadletters.list_dead_letters(settings)
            assert letter.command_id == command_id
        [dead] = await broker.drain_queue(settings.dead_letter_queue, expect=1)
    assert not dead.redelivered
    assert dead.headers.get("x-delivery-count", 0) == 0
    assert dead.headers["x-invite-fault-reason"] == "rejected"
