"""A delivery lost with its channel: nothing unsent is sent, nothing finished is published.

The handler with fake tokens and a fake Graph; the delivery's `Ownership` is marked lost the
way the consumer's channel-close callback marks it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Callable

from tests.support.fakes import FakeGraph, FakeTokens
from tests.support.harness import command
from tests.unit.test_handler import handler, refused
from worker.core.handler import Delivery, Handled, InviteHandler
from worker.core.outcomes import OutcomeKind
from worker.core.ownership import Ownership


def delivery() -> Delivery:
    body = command(command_id=str(uuid.uuid4()))
    return Delivery(json.dumps(body).encode(), "application/json", None)


def redelivery(of: Delivery) -> Delivery:
    """The same message again, on a channel of its own (a fresh ownership)."""
    return dataclasses.replace(of, delivery_count=1, ownership=Ownership())


class GatedTokens(FakeTokens):
    """Hands out tokens only once `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def token(self, tenant_id: str) -> str:
        await self.gate.wait()
        return await super().token(tenant_id)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never {what}")


def abandoned_unsent(result: Handled) -> None:
    assert result.abandoned, result
    assert (result.event, result.retry_in, result.outcome_kept) == (None, None, False)


async def test_a_delivery_lost_while_waiting_for_a_slot_is_not_sent() -> None:
    graph = FakeGraph(latency=0.1)
    shared = handler(graph, GRAPH_MAX_IN_FLIGHT=1)
    first, second = delivery(), delivery()
    running = asyncio.create_task(shared.handle(first))
    await until(lambda: graph.in_flight == 1, "sent the first")
    waiting = asyncio.create_task(shared.handle(second))
    await asyncio.sleep(0.02)
    second.ownership.lose()
    abandoned_unsent(await waiting)
    assert (await running).event is not None
    assert len(graph.sent) == 1
    assert shared.slots.in_use == 0


async def test_a_delivery_lost_while_waiting_for_the_rate_limit_is_not_sent_nor_takes_a_grant() -> (
    None
):
    graph = FakeGraph()
    shared = handler(graph, GRAPH_TENANT_RATE_LIMIT=1)
    assert (await shared.handle(delivery())).event is not None
    lost, after = delivery(), delivery()
    waiting = asyncio.create_task(shared.handle(lost))
    behind = asyncio.create_task(shared.handle(after))
    await asyncio.sleep(0.2)  # both wait for the window, the lost one first
    lost.ownership.lose()
    abandoned_unsent(await waiting)
    result = await behind
    assert result.event is not None
    assert result.event.kind is OutcomeKind.ACCEPTED
    # The grant the lost one would have had went to the command behind it.
    assert [request.client_request_id for request, _ in graph.sent][1:] == [
        result.event.data.command_id
    ]


async def test_a_delivery_lost_while_waiting_for_a_token_is_not_sent() -> None:
    graph, tokens = FakeGraph(), GatedTokens()
    shared = handler(graph, tokens)
    lost = delivery()
    waiting = asyncio.create_task(shared.handle(lost))
    await asyncio.sleep(0.02)
    lost.ownership.lose()
    tokens.gate.set()
    abandoned_unsent(await waiting)
    assert graph.sent == []


async def test_a_delivery_lost_between_retries_is_not_sent_again() -> None:
    graph = FakeGraph(failures=[refused(503)])
    shared = handler(graph, RETRY_BASE_DELAY=0.2)
    lost = delivery()
    waiting = asyncio.create_task(shared.handle(lost))
    await until(lambda: len(graph.sent) == 1 and graph.in_flight == 0, "the first attempt")
    lost.ownership.lose()
    result = await waiting
    abandoned_unsent(result)
    assert len(graph.sent) == 1


async def test_a_delivery_lost_while_graph_answers_publishes_nothing_and_is_replayed_later() -> (
    None
):
    graph = FakeGraph(latency=0.1)
    shared = handler(graph)
    lost = delivery()
    running = asyncio.create_task(shared.handle(lost))
    await until(lambda: graph.in_flight == 1, "sent it")
    lost.ownership.lose()
    result = await running
    assert result.abandoned
    assert result.outcome_kept
    assert result.event is None
    assert result.command is not None
    remembered = shared.settled.get(result.command.command_id)
    assert remembered is not None
    assert not remembered.confirmed
    again = await shared.handle(redelivery(lost))
    assert again.replayed
    assert again.event is remembered.event
    assert len(graph.sent) == 1


async def test_a_delivery_lost_after_the_handler_returned_is_abandoned_and_kept() -> None:
    graph = FakeGraph()
    shared: InviteHandler = handler(graph)
    message = delivery()
    result = await shared.handle(message)
    assert result.event is not None
    assert not result.abandoned
    message.ownership.lose()  # before the consumer published it
    late = await shared.abandon_if_lost(message, result)
    assert late.abandoned
    assert late.outcome_kept
    assert late.event is None
    assert result.command is not None
    remembered = shared.settled.get(result.command.command_id)
    assert remembered is not None
    assert (remembered.event, remembered.confirmed) == (result.event, False)


async def test_a_delivery_lost_before_it_started_calls_nothing() -> None:
    graph, tokens = FakeGraph(), FakeTokens()
    lost = delivery()
    lost.ownership.lose()
    abandoned_unsent(await handler(graph, tokens).handle(lost))
    assert (graph.sent, tokens.requests) == ([], [])


async def test_a_retry_whose_delivery_is_lost_before_its_copy_is_published_counts_as_none() -> None:
    """`invite_retries_scheduled_total{where="broker"}` counts delay-queue copies published."""
    graph = FakeGraph(failures=[refused(429, retry_after=5.0)])
    shared = handler(graph, RETRY_IN_PROCESS_MAX=0)
    message = delivery()
    result = await shared.handle(message)
    assert result.retry_in is not None
    message.ownership.lose()  # before the consumer published the delayed copy
    late = await shared.abandon_if_lost(message, result)
    assert late.abandoned
    assert late.retry_in is None
    assert shared.metrics.retries_scheduled.value("broker") == 0
