"""The handler's decisions, with fake tokens and a fake Graph behind its seams."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.fakes import FakeGraph, FakeTokens
from tests.harness import TENANT_A, TENANT_B, command
from worker.errors import OutcomeKind
from worker.handler import Delivery, InviteHandler
from worker.settings import Settings


def settings(**values: Any) -> Settings:
    return Settings.model_validate({"AZURE_TENANT_ID": TENANT_A, **values})


def delivery(**fields: Any) -> Delivery:
    body = command(command_id=str(uuid.uuid4()), **fields)
    return Delivery(json.dumps(body).encode(), "application/json", None)


async def test_in_flight_graph_requests_never_exceed_the_setting() -> None:
    graph = FakeGraph(latency=0.05)
    handler = InviteHandler(settings(GRAPH_MAX_IN_FLIGHT=3), tokens=FakeTokens(), sender=graph)
    results = await asyncio.gather(*(handler.handle(delivery()) for _ in range(12)))
    assert {r.event.kind for r in results} == {OutcomeKind.ACCEPTED}
    assert graph.most_in_flight == 3


async def test_each_invite_carries_its_tenants_token_and_the_command_id() -> None:
    graph = FakeGraph()
    handler = InviteHandler(settings(), tokens=FakeTokens(), sender=graph)
    result = await handler.handle(delivery(tenantId=TENANT_B))
    [(request, token)] = graph.sent
    assert token == f"token-for-{TENANT_B}"
    assert request.client_request_id == result.event.data.command_id
    assert request.tenant_id == TENANT_B


async def test_an_expired_deadline_means_no_token_and_no_graph_call() -> None:
    graph, tokens = FakeGraph(), FakeTokens()
    handler = InviteHandler(settings(), tokens=tokens, sender=graph)
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    result = await handler.handle(delivery(deadline=past))
    assert result.event.kind is OutcomeKind.EXPIRED
    assert (graph.sent, tokens.requests) == ([], [])


async def test_a_deadline_that_passes_while_waiting_for_the_rate_limit_expires_the_command() -> (
    None
):
    graph = FakeGraph()
    handler = InviteHandler(settings(GRAPH_TENANT_RATE_LIMIT=1), tokens=FakeTokens(), sender=graph)
    first = await handler.handle(delivery())
    soon = (datetime.now(UTC) + timedelta(milliseconds=300)).isoformat()
    second = await handler.handle(delivery(deadline=soon))
    assert first.event.kind is OutcomeKind.ACCEPTED
    assert second.event.kind is OutcomeKind.EXPIRED
    assert len(graph.sent) == 1


async def test_a_refused_token_fails_the_command_without_calling_graph() -> None:
    graph = FakeGraph()
    handler = InviteHandler(settings(), tokens=FakeTokens(refuse={TENANT_B}), sender=graph)
    result = await handler.handle(delivery(tenantId=TENANT_B))
    assert result.event.kind is OutcomeKind.FAILED
    assert result.event.data.model_dump()["reason"] == "token_unavailable"
    assert result.attempts == 0
    assert graph.sent == []


async def test_a_redelivered_command_whose_outcome_was_not_confirmed_is_not_sent_again() -> None:
    graph = FakeGraph()
    handler = InviteHandler(settings(), tokens=FakeTokens(), sender=graph)
    message = delivery()
    first = await handler.handle(message)
    handler.remember_unpublished(first)
    again = await handler.handle(message)
    assert again.replayed
    assert again.event == first.event
    assert len(graph.sent) == 1
    handler.forget_unpublished(again)
    assert not (await handler.handle(message)).replayed
