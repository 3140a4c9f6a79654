"""Graph misbehaving under load: 429 storms, 503 bursts, hanging requests, reset connections.

Each scenario pre-loads a few hundred commands, runs the real worker process against the
simulator with a fault armed, and checks the books: every command settled exactly once, Graph
called no more often than the retry policy allows, and the event's `attempts` equal to the calls
the simulator saw.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from tests.faults.harness import Books, Scenario
from worker.devtools.simulator import FaultRule, SimulatorThread

pytestmark = pytest.mark.integration

COMMANDS = 200
#: Seconds the simulator takes to answer each invite.
LATENCY = 0.05


@pytest.mark.timeout(90)
async def test_a_429_storm_with_retry_after_ends_accepted_within_the_attempt_budget(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    max_attempts = 8
    async with Scenario(
        "429 storm (Retry-After: 1)",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        RETRY_MAX_ATTEMPTS=max_attempts,
        # A one-second Retry-After is longer than this: those retries go through a delay queue.
        RETRY_IN_PROCESS_MAX=0.5,
    ) as scenario:
        # A 429 holds back its whole tenant for the Retry-After (and halves its rate): with one
        # tenant the storm would drain at one request a second. Ten tenants, as in production.
        sent = await scenario.publish_commands(COMMANDS, tenants=10)
        simulator.latency = LATENCY
        simulator.set_faults([FaultRule(status=429, retry_after="1", remaining=100)])
        await scenario.start_worker()
        books = await scenario.finish(timeout=60)

    assert not books.check(max_calls=max_attempts)
    throttled = [s for s in sent if any(c.status == 429 for c in books.calls_for(s.key))]
    assert len(throttled) > 1
    assert sum(1 for i in books.invites if i.status == 429) == 100
    for command in sent:
        outcome = books.first_outcome(command.key)
        statuses = [c.status for c in books.calls_for(command.key)]
        if statuses[-1] == 200:
            assert outcome.routing_key == "invite.accepted"
        else:
            # Only a command throttled on every attempt may fail, and it says why.
            assert statuses == [429] * max_attempts
            assert (outcome.routing_key, outcome.data["httpStatus"]) == ("invite.failed", 429)
    assert max(books.calls_by_command().values()) > 1


@pytest.mark.timeout(90)
async def test_retries_through_delay_queues_stop_once_the_elapsed_budget_is_spent(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    """README: no attempt starts later than RETRY_MAX_ELAPSED after the first delivery. Every
    retry here goes through a delay queue, so the budget is measured with the first-received
    time the retry copy carries in its headers."""
    budget, tenants = 8.0, 5
    async with Scenario(
        "429 forever, delay-queue retries until RETRY_MAX_ELAPSED",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        RETRY_MAX_ELAPSED=budget,
        RETRY_MAX_ATTEMPTS=12,
        RETRY_IN_PROCESS_MAX=0.5,
    ) as scenario:
        # One command per tenant, so that one tenant's throttling does not pace another's.
        sent = await scenario.publish_commands(tenants, tenants=tenants)
        simulator.set_faults(
            [FaultRule(call_id=s.call_id, status=429, retry_after="1") for s in sent]
        )
        await scenario.start_worker()
        books = await scenario.finish(timeout=60)

    assert not books.check(max_calls=12)
    for command in sent:
        outcome = books.first_outcome(command.key)
        assert (outcome.routing_key, outcome.data["httpStatus"]) == ("invite.failed", 429)
        calls = books.calls_for(command.key)
        span = calls[-1].arrived_monotonic - calls[0].arrived_monotonic
        # Retry-After is one second: the last attempt starts in the budget's last 2.5 seconds.
        assert budget - 2.5 <= span <= budget, (
            f"{command.key}: {len(calls)} attempts over {span:.1f}s; the retry budget is "
            f"{budget}s from the first delivery (is x-invite-first-received-ms carried exactly?)"
        )


@pytest.mark.timeout(90)
async def test_a_503_burst_opens_the_circuit_then_all_settle_once_at_full_concurrency_again(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    max_attempts = 5
    async with Scenario(
        "503 burst",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        RETRY_MAX_ATTEMPTS=max_attempts,
    ) as scenario:
        sent = await scenario.publish_commands(COMMANDS)
        simulator.latency = LATENCY
        simulator.set_faults([FaultRule(status=503, remaining=60)])
        worker = await scenario.start_worker()
        books = await scenario.finish(timeout=60)

    assert not books.check(max_calls=max_attempts)
    assert sum(1 for i in books.invites if i.status == 503) == 60
    for command in sent:
        outcome = books.first_outcome(command.key)
        statuses = [c.status for c in books.calls_for(command.key)]
        if statuses[-1] == 200:
            assert outcome.routing_key == "invite.accepted"
        else:
            assert statuses == [503] * max_attempts
            assert (outcome.routing_key, outcome.data["reason"]) == (
                "invite.failed",
                "graph_refused",
            )
            assert outcome.data["httpStatus"] == 503
    # Five 503s in a row open the circuit: the worker stopped consuming for a while.
    states = [line.get("state") for line in worker.events("graph.circuit")]
    assert "open" in states
    assert states[-1] == "closed"
    # Once it closed again, the worker must work at full width again (README: up to
    # GRAPH_MAX_IN_FLIGHT requests in flight, prefetch twice that), not one command at a time.
    last_503 = max(i.arrived_monotonic for i in books.invites if i.status == 503)
    after = sorted(i.arrived_monotonic for i in books.invites if i.arrived_monotonic > last_503)
    assert len(after) >= COMMANDS // 4
    overlapping = sum(1 for a, b in pairwise(after) if b - a < LATENCY / 2)
    assert overlapping > len(after) / 2, (
        f"after the circuit closed, only {overlapping} of {len(after)} Graph requests arrived "
        f"while the previous one ({LATENCY}s latency) was still in flight: the worker "
        "handles one command at a time"
    )


@pytest.mark.timeout(90)
async def test_requests_hanging_past_the_read_timeout_fail_as_no_answer_after_one_call(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    async with Scenario(
        "Graph hangs past the timeout",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        GRAPH_READ_TIMEOUT=1,
    ) as scenario:
        sent = await scenario.publish_commands(COMMANDS)
        hanging = {s.key for s in sent[::10]}
        simulator.latency = LATENCY
        simulator.set_faults(
            [FaultRule(call_id=s.call_id, hang=True) for s in sent if s.key in hanging]
        )
        await scenario.start_worker()
        books = await scenario.finish(timeout=60)

    assert not books.check(max_calls=1)
    _assert_ambiguous_failures(books, hanging, "hang")


@pytest.mark.timeout(90)
async def test_connections_reset_mid_request_fail_as_no_answer_after_one_call(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    resets = 20
    async with Scenario(
        "connection reset mid-request",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
    ) as scenario:
        await scenario.publish_commands(COMMANDS)
        simulator.latency = LATENCY
        simulator.set_faults([FaultRule(reset=True, remaining=resets)])
        await scenario.start_worker()
        books = await scenario.finish(timeout=60)

    assert not books.check(max_calls=1)
    reset = {i.client_request_id or "" for i in books.invites if i.status == "reset"}
    assert len(reset) == resets
    _assert_ambiguous_failures(books, reset, "reset")


def _assert_ambiguous_failures(books: Books, ambiguous: set[str], status: str) -> None:
    """Sent and unanswered: failed as `graph_no_answer`, never retried; the rest accepted."""
    for key in books.sent:
        outcome = books.first_outcome(key)
        calls = [c.status for c in books.calls_for(key)]
        if key in ambiguous:
            assert calls == [status], key
            assert outcome.routing_key == "invite.failed", key
            assert outcome.data["reason"] == "graph_no_answer", key
            assert outcome.data["httpStatus"] is None, key
            assert outcome.data["attempts"] == 1, key
        else:
            assert calls == [200], key
            assert outcome.routing_key == "invite.accepted", key
