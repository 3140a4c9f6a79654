"""The worker in fleet mode (REDIS_URL), meeting records that other processes left in Redis.

The other process is a `RedisSharedState` of the test's own, with an owner id of its own: what
it writes is what a second pod would write.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import make_settings
from tests.support.fleet import make_command
from tests.support.fleet import outcome as accepted_event
from tests.support.harness import TENANT_A, Broker, command, running_worker
from worker.core.ports import ClaimVerdict
from worker.devtools.simulator import SimulatorThread
from worker.fleet import RedisSharedState

pytestmark = pytest.mark.integration


def other_process(url: str, prefix: str) -> RedisSharedState:
    return RedisSharedState(
        aioredis.Redis.from_url(url),
        prefix=prefix,
        tenant_rate_limit=100,
        tenant_rate_limits={},
        idempotency_ttl=3600,
        lease=5,
        probe_timeout=5,
    )


async def test_a_command_a_dead_process_was_sending_fails_as_ambiguous_without_a_second_call(
    broker: Broker, simulator: SimulatorThread, redis_server: str, redis_prefix: str
) -> None:
    settings = make_settings(simulator, REDIS_URL=redis_server, REDIS_KEY_PREFIX=redis_prefix)
    cmd = make_command(str(uuid.uuid4()), tenant_id=TENANT_A)
    body = command(command_id=cmd.command_id)
    other = other_process(redis_server, redis_prefix)
    await other.start()
    claim = await other.begin_send(cmd, take_orphaned=False)
    assert claim.verdict is ClaimVerdict.GRANTED
    await other.close()  # the process dies: its lease goes with it
    async with running_worker(settings, broker) as (_, collector):
        await broker.publish(settings, body)
        [outcome] = await collector.wait_for(1)
    assert outcome.routing_key == "invite.failed"
    assert outcome.data["reason"] == "graph_no_answer"
    assert simulator.invites == []


async def test_a_command_settled_unconfirmed_by_another_process_gets_that_event_not_a_call(
    broker: Broker, simulator: SimulatorThread, redis_server: str, redis_prefix: str
) -> None:
    settings = make_settings(simulator, REDIS_URL=redis_server, REDIS_KEY_PREFIX=redis_prefix)
    cmd = make_command(str(uuid.uuid4()), tenant_id=TENANT_A)
    body = command(command_id=cmd.command_id)
    event = accepted_event(cmd, operation_id="op-from-the-other-pod", source="urn:other-pod")
    other = other_process(redis_server, redis_prefix)
    await other.start()
    await other.begin_send(cmd, take_orphaned=False)
    await other.settle(cmd, event, confirmed=False)
    await other.close()
    async with running_worker(settings, broker) as (worker, collector):
        await broker.publish(settings, body)
        [outcome] = await collector.wait_for(1)
        trips = worker.metrics.redis_calls.value("begin_send")
    assert outcome.event_id == event.id
    assert outcome.routing_key == "invite.accepted"
    assert simulator.invites == []
    assert trips == 1


async def test_an_outcome_is_in_the_shared_record_before_it_is_published(
    broker: Broker, simulator: SimulatorThread, redis_server: str, redis_prefix: str
) -> None:
    """A process killed after publishing leaves the event to publish again, not a new one."""
    settings = make_settings(simulator, REDIS_URL=redis_server, REDIS_KEY_PREFIX=redis_prefix)
    reader = aioredis.Redis.from_url(redis_server, decode_responses=True)
    seen: list[dict[Any, Any]] = []
    async with running_worker(settings, broker) as (worker, collector):
        publisher = worker.consumer._publisher
        assert publisher is not None
        publish_event = publisher.publish_event

        async def publish_reading_the_record(event: Any, *args: Any, **kwargs: Any) -> bool:
            seen.append(await reader.hgetall(f"{redis_prefix}cmd:{event.data.command_id}"))
            return await publish_event(event, *args, **kwargs)

        publisher.publish_event = publish_reading_the_record  # type: ignore[method-assign]
        command_id = str(uuid.uuid4())
        await broker.publish(settings, command(command_id=command_id))
        [outcome] = await collector.wait_for(1)
        shared = worker.shared
        assert shared is not None
        await shared.write_confirmations()
        confirmed = await reader.hgetall(f"{redis_prefix}cmd:{command_id}")
    await reader.aclose()
    [record] = seen
    assert record["state"] == "settled"
    assert f'"id":"{outcome.event_id}"' in record["event"]
    # Once the broker confirmed it, nothing is left to publish again.
    assert (confirmed["state"], confirmed["event"]) == ("settled", "")


async def test_an_accepted_command_costs_two_calls_its_confirmation_none_of_its_own(
    broker: Broker, simulator: SimulatorThread, redis_server: str, redis_prefix: str
) -> None:
    """The claim with its grant, and the settle; the next script carries the confirmation."""
    settings = make_settings(simulator, REDIS_URL=redis_server, REDIS_KEY_PREFIX=redis_prefix)
    commands = 40
    async with running_worker(settings, broker) as (worker, collector):
        for _ in range(commands):
            await broker.publish(settings, command(command_id=str(uuid.uuid4())))
        outcomes = await collector.wait_for(commands)
        shared = worker.shared
        assert shared is not None
        calls = {
            operation: worker.metrics.redis_calls.value(operation)
            for operation in ("begin_send", "settle", "confirm", "release", "throttle", "lease")
        }
        round_trips = worker.metrics.redis_round_trips.value()
        # What no later command carried (the last ones) is written by the next lease renewal,
        # or now, on request.
        await shared.write_confirmations()
        left = worker.metrics.redis_calls.value("confirm")
    print(f"\nredis calls for {commands} accepted commands: {calls}; round trips {round_trips}")
    assert {outcome.routing_key for outcome in outcomes} == {"invite.accepted"}
    assert (calls["begin_send"], calls["settle"]) == (commands, commands)
    assert calls["release"] == calls["throttle"] == calls["confirm"] == 0
    # Calls made together share a round trip; the lease's are its own.
    assert round_trips - calls["lease"] <= 2 * commands
    assert left == 1
