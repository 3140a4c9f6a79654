"""The handler's decisions, with fake tokens and a fake Graph behind its seams."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.fakes import FakeGraph, FakeTokens
from tests.support.harness import TENANT_A, TENANT_B, command, isolated_settings
from worker.app import handler_config
from worker.core.errors import (
    GraphAmbiguous,
    GraphNoAnswer,
    GraphRefused,
    GraphUnreachable,
    TokenUnavailable,
)
from worker.core.handler import Delivery, Handled, InviteHandler
from worker.core.outcomes import OutcomeEvent, OutcomeKind
from worker.core.retry import AMBIGUOUS_STATUSES
from worker.settings import Settings


def settings(**values: Any) -> Settings:
    return isolated_settings(
        {
            "AZURE_TENANT_ID": TENANT_A,
            "ALLOWED_TENANT_IDS": f"{TENANT_A},{TENANT_B}",
            "RETRY_BASE_DELAY": 0.01,
            **values,
        }
    )


def delivery(**fields: Any) -> Delivery:
    body = command(command_id=str(uuid.uuid4()), **fields)
    return Delivery(json.dumps(body).encode(), "application/json", None)


def handler(
    graph: FakeGraph | None = None, tokens: FakeTokens | None = None, **values: Any
) -> InviteHandler:
    return InviteHandler(
        handler_config(settings(**values)),
        tokens=tokens or FakeTokens(),
        sender=graph or FakeGraph(),
    )


def event(handled: Handled) -> OutcomeEvent:
    assert handled.event is not None, handled
    return handled.event


def refused(status: int, retry_after: float | None = None) -> GraphRefused:
    """Graph's error answer, typed as `worker.core.invite.interpret` types it."""
    kind = GraphAmbiguous if status in AMBIGUOUS_STATUSES else GraphRefused
    return kind(status, "Code", "message", "req", retry_after=retry_after)


async def test_in_flight_graph_requests_never_exceed_the_setting() -> None:
    graph = FakeGraph(latency=0.05)
    shared = handler(graph, GRAPH_MAX_IN_FLIGHT=3)
    results = await asyncio.gather(*(shared.handle(delivery()) for _ in range(12)))
    assert {event(r).kind for r in results} == {OutcomeKind.ACCEPTED}
    assert graph.most_in_flight == 3


async def test_each_invite_carries_its_tenants_token_and_the_command_id() -> None:
    graph = FakeGraph()
    result = await handler(graph).handle(delivery(tenantId=TENANT_B))
    [(request, token)] = graph.sent
    assert token == f"token-for-{TENANT_B}"
    assert request.client_request_id == event(result).data.command_id
    assert request.tenant_id == TENANT_B


async def test_an_expired_deadline_means_no_token_and_no_graph_call() -> None:
    graph, tokens = FakeGraph(), FakeTokens()
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    result = await handler(graph, tokens).handle(delivery(deadline=past))
    assert event(result).kind is OutcomeKind.EXPIRED
    assert (graph.sent, tokens.requests) == ([], [])


async def test_a_deadline_that_passes_while_waiting_for_the_rate_limit_expires_the_command() -> (
    None
):
    graph = FakeGraph()
    shared = handler(graph, GRAPH_TENANT_RATE_LIMIT=1)
    first = await shared.handle(delivery())
    soon = (datetime.now(UTC) + timedelta(milliseconds=300)).isoformat()
    second = await shared.handle(delivery(deadline=soon))
    assert event(first).kind is OutcomeKind.ACCEPTED
    assert event(second).kind is OutcomeKind.EXPIRED
    assert len(graph.sent) == 1


async def test_a_refused_token_fails_the_command_without_calling_graph() -> None:
    graph = FakeGraph()
    result = await handler(graph, FakeTokens(refuse={TENANT_B})).handle(delivery(tenantId=TENANT_B))
    assert event(result).kind is OutcomeKind.FAILED
    assert event(result).data.model_dump()["reason"] == "token_unavailable"
    assert result.attempts == 0
    assert graph.sent == []


async def test_a_redelivered_command_already_settled_is_acknowledged_without_graph() -> None:
    graph = FakeGraph()
    shared = handler(graph)
    message = delivery()
    first = await shared.handle(message)
    assert first.command is not None
    await shared.remember_outcome(first.command, event(first), confirmed=True)
    again = await shared.handle(message)
    assert again.duplicate
    assert again.event is None
    assert len(graph.sent) == 1


async def test_a_redelivered_command_whose_outcome_was_not_confirmed_republishes_it() -> None:
    graph = FakeGraph()
    shared = handler(graph)
    message = delivery()
    first = await shared.handle(message)
    assert first.command is not None
    await shared.remember_outcome(first.command, event(first), confirmed=False)
    again = await shared.handle(message)
    assert again.replayed
    assert again.event == first.event
    assert len(graph.sent) == 1


async def test_a_different_command_under_a_settled_command_id_is_rejected_without_graph() -> None:
    graph = FakeGraph()
    shared = handler(graph)
    command_id = str(uuid.uuid4())
    first = await shared.handle(
        Delivery(json.dumps(command(command_id=command_id)).encode(), "application/json", None)
    )
    assert first.command is not None
    await shared.remember_outcome(first.command, event(first), confirmed=True)
    other = command(command_id=command_id, call_id="another-call")
    reused = await shared.handle(Delivery(json.dumps(other).encode(), "application/json", None))
    assert event(reused).kind is OutcomeKind.REJECTED
    problems = event(reused).data.model_dump()["problems"]
    assert problems == [
        {"field": "commandId", "problem": "was already used for a different command"}
    ]
    assert len(graph.sent) == 1
    # The first command keeps the id: its own redelivery is still a duplicate.
    await shared.remember_outcome(reused.command or first.command, event(reused), confirmed=True)
    again = await shared.handle(
        Delivery(json.dumps(command(command_id=command_id)).encode(), "application/json", None)
    )
    assert again.duplicate


async def test_a_redelivery_with_a_new_deadline_is_still_the_same_command() -> None:
    graph = FakeGraph()
    shared = handler(graph)
    command_id = str(uuid.uuid4())
    body = command(command_id=command_id)
    first = await shared.handle(Delivery(json.dumps(body).encode(), "application/json", None))
    assert first.command is not None
    await shared.remember_outcome(first.command, event(first), confirmed=True)
    later = {**body, "deadline": "2099-01-01T00:00:00Z"}
    again = await shared.handle(Delivery(json.dumps(later).encode(), "application/json", None))
    assert again.duplicate
    assert len(graph.sent) == 1


async def test_transient_failures_are_retried_in_process_and_counted() -> None:
    graph = FakeGraph(failures=[refused(503), GraphUnreachable("refused")])
    result = await handler(graph).handle(delivery())
    assert event(result).kind is OutcomeKind.ACCEPTED
    assert result.attempts == 3
    assert event(result).data.attempts == 3


async def test_a_permanent_4xx_fails_at_once() -> None:
    graph = FakeGraph(failures=[refused(404)])
    result = await handler(graph).handle(delivery())
    assert event(result).kind is OutcomeKind.FAILED
    assert (result.attempts, result.http_status) == (1, 404)


async def test_a_401_refreshes_the_token_once_and_retries_once() -> None:
    tokens = FakeTokens()
    graph = FakeGraph(failures=[refused(401), refused(401)])
    result = await handler(graph, tokens).handle(delivery())
    assert event(result).kind is OutcomeKind.FAILED
    assert result.attempts == 2
    assert tokens.invalidated == [TENANT_A]


async def test_an_ambiguous_no_answer_is_not_retried_by_default() -> None:
    graph = FakeGraph(failures=[GraphNoAnswer("ReadTimeout")])
    result = await handler(graph).handle(delivery())
    assert event(result).data.model_dump()["reason"] == "graph_no_answer"
    assert result.attempts == 1
    retrying = FakeGraph(failures=[GraphNoAnswer("ReadTimeout")])
    again = await handler(retrying, RETRY_AMBIGUOUS=True).handle(delivery())
    assert event(again).kind is OutcomeKind.ACCEPTED


async def test_attempts_stop_at_the_cap_with_the_last_status() -> None:
    graph = FakeGraph(failures=[refused(502)] * 10)
    result = await handler(graph, RETRY_MAX_ATTEMPTS=3, RETRY_AMBIGUOUS=True).handle(delivery())
    assert event(result).kind is OutcomeKind.FAILED
    assert (result.attempts, result.http_status) == (3, 502)


async def test_a_long_retry_after_goes_to_the_broker_and_throttles_the_tenant() -> None:
    graph = FakeGraph(failures=[refused(429, retry_after=20.0)])
    shared = handler(graph)
    first = await shared.handle(delivery())
    assert first.event is None
    assert first.retry_in == 20.0
    assert first.attempts == 1
    # The tenant is paused: the next command waits in the broker without calling Graph.
    second = await shared.handle(delivery())
    assert second.retry_in is not None
    assert second.retry_in > 19
    assert len(graph.sent) == 1
    # Another tenant is not affected.
    other = await shared.handle(delivery(tenantId=TENANT_B))
    assert event(other).kind is OutcomeKind.ACCEPTED


async def test_a_retried_command_carries_its_attempts_and_first_receipt() -> None:
    graph = FakeGraph(failures=[refused(503)])
    body = delivery()
    first_received = datetime.now(UTC).timestamp() - 10
    retried = Delivery(
        body.body, body.content_type, None, prior_attempts=2, first_received=first_received
    )
    result = await handler(graph).handle(retried)
    assert result.attempts == 4
    assert result.first_received == first_received


async def test_no_retry_starts_after_the_total_time_budget() -> None:
    graph = FakeGraph(failures=[refused(503)])
    body = delivery()
    old = Delivery(
        body.body,
        None,
        None,
        prior_attempts=1,
        first_received=datetime.now(UTC).timestamp() - 119.999,
    )
    result = await handler(graph).handle(old)
    assert event(result).kind is OutcomeKind.FAILED


async def test_a_retry_that_would_start_after_the_deadline_expires_the_command() -> None:
    graph = FakeGraph(failures=[refused(429, retry_after=30.0)])
    soon = (datetime.now(UTC) + timedelta(seconds=10)).isoformat()
    result = await handler(graph).handle(delivery(deadline=soon))
    assert event(result).kind is OutcomeKind.EXPIRED
    assert result.attempts == 1


async def test_a_command_delivered_too_often_is_failed_as_poison_without_graph() -> None:
    graph = FakeGraph()
    body = delivery()
    poison = Delivery(body.body, None, None, delivery_count=6)
    result = await handler(graph).handle(poison)
    assert result.poison
    assert event(result).data.model_dump()["reason"] == "redelivered_too_often"
    assert graph.sent == []


async def test_consecutive_outages_open_the_circuit_and_later_commands_wait_in_the_broker() -> None:
    graph = FakeGraph(failures=[GraphUnreachable("refused")] * 50)
    shared = handler(graph, CIRCUIT_FAILURE_THRESHOLD=3, RETRY_MAX_ATTEMPTS=10)
    results = [await shared.handle(delivery()) for _ in range(2)]
    assert not shared.circuit.allows_traffic
    assert all(r.retry_in is not None for r in results)
    sent = len(graph.sent)
    assert sent == 3
    later = await shared.handle(delivery())
    assert later.retry_in is not None
    assert len(graph.sent) == sent


async def test_shutdown_ends_an_in_process_wait_and_hands_the_retry_to_the_broker() -> None:
    graph = FakeGraph(failures=[refused(503)])
    shared = handler(graph, RETRY_BASE_DELAY=1.5, RETRY_IN_PROCESS_MAX=5)
    task = asyncio.create_task(shared.handle(delivery()))
    await asyncio.sleep(0.1)
    shared.stop()
    result = await asyncio.wait_for(task, 1)
    assert result.retry_in is not None
    assert result.attempts == 1


async def test_a_tenant_off_the_allow_list_is_rejected_without_a_token_request() -> None:
    graph, tokens = FakeGraph(), FakeTokens()
    other = "44444444-4444-4444-8444-444444444444"
    result = await handler(graph, tokens).handle(delivery(tenantId=other))
    assert event(result).kind is OutcomeKind.REJECTED
    assert event(result).data.model_dump()["problems"][0]["field"] == "tenantId"
    assert (graph.sent, tokens.requests) == ([], [])


async def test_a_tenants_own_rate_limit_overrides_the_default() -> None:
    graph = FakeGraph()
    shared = handler(graph, GRAPH_TENANT_RATE_LIMIT=100, TENANT_RATE_LIMITS={TENANT_B: 1})
    soon = (datetime.now(UTC) + timedelta(milliseconds=300)).isoformat()
    first = await shared.handle(delivery(tenantId=TENANT_B))
    other = await shared.handle(delivery(tenantId=TENANT_A, deadline=soon))
    second = await shared.handle(delivery(tenantId=TENANT_B, deadline=soon))
    assert event(first).kind is OutcomeKind.ACCEPTED
    assert event(second).kind is OutcomeKind.EXPIRED
    assert event(other).kind is OutcomeKind.ACCEPTED


# --- which failures are retried, and what they cost ----------------------------------------


async def test_a_504_is_not_retried_and_fails_as_graph_ambiguous() -> None:
    graph = FakeGraph(failures=[refused(504)])
    result = await handler(graph).handle(delivery())
    data = event(result).data.model_dump()
    assert (event(result).kind, data["reason"], data["http_status"]) == (
        OutcomeKind.FAILED,
        "graph_ambiguous",
        504,
    )
    assert (result.attempts, len(graph.sent)) == (1, 1)


async def test_throttled_answers_do_not_use_up_the_attempt_budget() -> None:
    failures = [refused(429, retry_after=0.01), refused(503)] * 3
    graph = FakeGraph(failures=failures)
    result = await handler(graph, RETRY_MAX_ATTEMPTS=2).handle(delivery())
    assert event(result).kind is OutcomeKind.ACCEPTED
    assert (result.attempts, result.throttled, len(graph.sent)) == (7, 6, 7)


async def test_a_token_outage_fails_as_token_unavailable_within_the_attempt_budget() -> None:
    outage = TokenUnavailable(
        "temporarily_unavailable", "AADSTS90033: A transient error has occurred.", transient=True
    )
    graph, tokens = FakeGraph(), FakeTokens(outage=outage)
    result = await handler(graph, tokens, RETRY_MAX_ATTEMPTS=3).handle(delivery())
    data = event(result).data.model_dump()
    assert (data["reason"], data["error_code"]) == ("token_unavailable", "temporarily_unavailable")
    assert data["error_message"].startswith("AADSTS90033")
    assert (len(tokens.requests), result.token_failures, graph.sent) == (3, 3, [])


async def test_token_failures_carried_by_a_retry_copy_count_against_the_budget() -> None:
    outage = TokenUnavailable("temporarily_unavailable", "busy", transient=True)
    tokens = FakeTokens(outage=outage)
    body = delivery()
    retried = Delivery(
        body.body,
        body.content_type,
        None,
        prior_token_failures=2,
        last_error="TokenUnavailable",
    )
    result = await handler(FakeGraph(), tokens, RETRY_MAX_ATTEMPTS=3).handle(retried)
    assert event(result).data.model_dump()["reason"] == "token_unavailable"
    assert len(tokens.requests) == 1


async def test_a_retry_that_comes_back_early_waits_until_its_retry_time() -> None:
    graph = FakeGraph()
    body = delivery()
    due = datetime.now(UTC).timestamp() + 0.3
    early = Delivery(
        body.body, body.content_type, None, prior_attempts=1, retry_at=due, last_status=429
    )
    result = await handler(graph).handle(early)
    assert event(result).kind is OutcomeKind.ACCEPTED
    assert datetime.now(UTC).timestamp() >= due
    # Too early for a wait in the process: back to a delay queue, no Graph call.
    later = Delivery(
        body.body, body.content_type, None, prior_attempts=1, retry_at=due + 10, last_status=429
    )
    again = await handler(graph).handle(later)
    assert again.retry_in is not None
    assert 9 < again.retry_in <= 10.3
    assert len(graph.sent) == 1


async def test_a_delayed_retry_carries_the_time_it_is_due_and_its_throttled_attempts() -> None:
    graph = FakeGraph(failures=[refused(429, retry_after=61.0)])
    result = await handler(graph).handle(delivery())
    assert result.retry_in == 61.0
    assert result.retry_at is not None
    assert abs(result.retry_at - (datetime.now(UTC).timestamp() + 61)) < 1
    assert (result.attempts, result.throttled) == (1, 1)


async def test_a_throttled_tenants_command_whose_deadline_falls_in_the_pause_expires_at_once() -> (
    None
):
    graph = FakeGraph(failures=[refused(429, retry_after=20.0)])
    shared = handler(graph)
    first = await shared.handle(delivery())
    assert first.retry_in == 20.0
    soon = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    second = await shared.handle(delivery(deadline=soon))
    assert event(second).kind is OutcomeKind.EXPIRED
    assert len(graph.sent) == 1


async def test_a_retry_back_after_the_elapsed_budget_fails_without_calling_graph() -> None:
    graph = FakeGraph()
    body = delivery()
    late = Delivery(
        body.body,
        body.content_type,
        None,
        prior_attempts=2,
        prior_throttled=2,
        first_received=datetime.now(UTC).timestamp() - 121,
        last_status=429,
        last_error="GraphRefused",
    )
    result = await handler(graph).handle(late)
    data = event(result).data.model_dump()
    assert (event(result).kind, data["http_status"]) == (OutcomeKind.FAILED, 429)
    assert graph.sent == []


async def test_a_retry_that_would_start_after_the_elapsed_budget_fails_at_once() -> None:
    graph = FakeGraph(failures=[refused(429, retry_after=30.0)])
    shared = handler(graph)
    first = await shared.handle(delivery())
    assert first.retry_in == 30.0
    # The tenant is paused for 30 s; this retry has 10 s of its budget left.
    body = delivery()
    retried = Delivery(
        body.body,
        body.content_type,
        None,
        prior_attempts=1,
        prior_throttled=1,
        first_received=datetime.now(UTC).timestamp() - 110,
        last_status=429,
        last_error="GraphRefused",
    )
    result = await shared.handle(retried)
    assert event(result).kind is OutcomeKind.FAILED
    assert len(graph.sent) == 1
