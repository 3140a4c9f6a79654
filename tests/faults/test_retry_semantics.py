"""What a failed attempt means for the next one: ambiguous answers, a token endpoint outage,
a throttling storm, and Retry-After kept to the second through the delay queues.

The real worker process against the simulator; the books say what became of every command.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from tests.faults.harness import Scenario
from worker.devtools.simulator import FaultRule, SimulatorThread

pytestmark = pytest.mark.integration


@pytest.mark.timeout(90)
async def test_a_504_after_graph_acted_is_not_sent_again(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    """Graph does the work on every second invite and answers 504: nobody is rung twice."""
    async with Scenario(
        "504 after acting", amqp_url=amqp_url, simulator=simulator, directory=tmp_path
    ) as scenario:
        sent = await scenario.publish_commands(40)
        acted_on = {s.key for s in sent[::2]}
        # One 504 each: a retry would be accepted, and ring the person a second time.
        simulator.set_faults(
            [
                FaultRule(call_id=s.call_id, status=504, act=True, remaining=1)
                for s in sent
                if s.key in acted_on
            ]
        )
        await scenario.start_worker()
        books = await scenario.finish(timeout=60)

    assert not books.check(max_calls=1)
    acted = [sum(1 for c in books.calls_for(s.key) if c.acted) for s in sent]
    assert sum(1 for count in acted if count > 1) == 0, "commands Graph carried out twice"
    for command in sent:
        outcome = books.first_outcome(command.key)
        if command.key in acted_on:
            assert [c.status for c in books.calls_for(command.key)] == [504]
            assert (outcome.routing_key, outcome.data["reason"], outcome.data["httpStatus"]) == (
                "invite.failed",
                "graph_ambiguous",
                504,
            )
        else:
            assert outcome.routing_key == "invite.accepted"


@pytest.mark.timeout(90)
async def test_a_token_endpoint_answering_503_fails_commands_as_token_unavailable(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    max_attempts = 5
    async with Scenario(
        "token endpoint 503",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        RETRY_MAX_ATTEMPTS=max_attempts,
    ) as scenario:
        sent = await scenario.publish_commands(10)
        simulator.set_token_outage(503)
        await scenario.start_worker()
        books = await scenario.finish(timeout=60)

    token_requests = simulator.token_requests
    print(f"token requests: {len(token_requests)} for {len(sent)} commands")
    assert not books.check(max_calls=0)
    assert {r.status for r in token_requests} == {503}
    assert len(token_requests) <= len(sent) * max_attempts
    for command in sent:
        outcome = books.first_outcome(command.key)
        assert (outcome.routing_key, outcome.data["reason"]) == (
            "invite.failed",
            "token_unavailable",
        ), outcome.data
        # Entra's own error, as it answered.
        assert outcome.data["errorCode"] == "temporarily_unavailable"
        assert outcome.data["errorMessage"].startswith("AADSTS90033")


@pytest.mark.timeout(180)
async def test_a_429_storm_ends_with_every_command_accepted(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    """Every third request is throttled (Retry-After 1.5 s). Throttled attempts are not counted
    against RETRY_MAX_ATTEMPTS, set low here so that counting them would fail commands."""
    retry_after = 1.5
    async with Scenario(
        "429 storm with 300 commands all accepted",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        RETRY_MAX_ATTEMPTS=3,
        RETRY_MAX_ELAPSED=300,
        # 1.5 s is longer than this: the retries go through the 1 s delay queue, and the
        # remaining half second is waited in the process.
        RETRY_IN_PROCESS_MAX=0.5,
    ) as scenario:
        sent = await scenario.publish_commands(300, tenants=10)
        simulator.latency = 0.05
        simulator.set_faults([FaultRule(status=429, retry_after=str(retry_after), every=3)])
        await scenario.start_worker()
        books = await scenario.finish(timeout=150)

    assert not books.check(max_calls=100)
    assert sum(1 for i in books.invites if i.status == 429) > 50
    for command in sent:
        assert books.first_outcome(command.key).routing_key == "invite.accepted", command.key
        calls = books.calls_for(command.key)
        for throttled, retry in pairwise(calls):
            gap = retry.arrived_monotonic - throttled.arrived_monotonic
            # Never before Graph's Retry-After (less the latency the 429 took to arrive).
            assert gap >= retry_after - 0.1, f"{command.key}: retried after {gap:.2f}s"


@pytest.mark.timeout(90)
async def test_a_retry_after_longer_than_the_in_process_wait_is_kept_to_the_second(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    """Retry-After 3 s goes through a delay queue: the retry starts after 3 s, not after the
    5 s of the next longer queue."""
    retry_after = 3.0
    async with Scenario(
        "Retry-After 3 s through the delay queues",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        RETRY_IN_PROCESS_MAX=0.5,
    ) as scenario:
        # One command per tenant: a 429 pauses its tenant, not the others.
        sent = await scenario.publish_commands(5, tenants=5)
        simulator.set_faults(
            [
                FaultRule(call_id=s.call_id, status=429, retry_after=str(retry_after), remaining=1)
                for s in sent
            ]
        )
        await scenario.start_worker()
        books = await scenario.finish(timeout=60)

    assert not books.check(max_calls=2)
    for command in sent:
        assert books.first_outcome(command.key).routing_key == "invite.accepted"
        first, retry = books.calls_for(command.key)
        gap = retry.arrived_monotonic - first.arrived_monotonic
        assert retry_after <= gap <= retry_after + 1.0, f"{command.key}: retried after {gap:.2f}s"
