"""Several worker processes sharing Redis behave as one worker: real processes, real faults.

Each scenario runs two or three `invite-worker run` processes on one queue with REDIS_URL
set and a key prefix of its own, and checks the books: every command one outcome, nobody
rung twice, the tenant's budget and a 429's pause held across the fleet.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL
from tests.faults.harness import Books, Scenario
from tests.faults.test_connection_loss import cut
from tests.support.redis_server import spare_port, start_redis
from worker.devtools.simulator import FaultRule, SimulatorThread

pytestmark = pytest.mark.integration

#: A dead process's commands wait this long for it (REDIS_LEASE), then count as orphaned.
LEASE = 3
#: Seconds the simulator's arrival stamps may lag behind the write (it shares the GIL of
#: this test process, not the workers').
SCHEDULING_SLACK = 0.05


def fleet(prefix: str, url: str = REDIS_URL) -> dict[str, object]:
    return {"REDIS_URL": url, "REDIS_KEY_PREFIX": prefix, "REDIS_LEASE": LEASE}


def nobody_rung_twice(books: Books) -> None:
    twice = books.invited_twice()
    assert not twice, f"{len(twice)} command(s) carried out twice by Graph: {twice[:5]}"


def one_outcome_each(books: Books) -> None:
    """Every command has exactly one outcome event (one event id, however often published)."""
    for key in books.sent:
        ids = {o.event_id for o in books.outcomes_for(key)}
        assert len(ids) == 1, f"{key}: {len(ids)} outcome events"


@pytest.mark.timeout(150)
async def test_a_worker_killed_mid_run_has_its_commands_finished_by_the_fleet_ringing_nobody_twice(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path, redis_prefix: str
) -> None:
    commands = 200
    async with Scenario(
        "fleet: SIGKILL one of two workers, Graph 300 ms",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        **fleet(redis_prefix),
    ) as scenario:
        await scenario.publish_commands(commands)
        simulator.latency = 0.3
        first = await scenario.start_worker()
        await scenario.start_worker()
        await scenario.wait_for_outcomes(commands // 3, timeout=60)
        scenario.crash_worker(first)
        books = await scenario.finish(timeout=90)

    print(
        f"\nambiguous failures (the dead worker's requests in flight): {books.ambiguous_failures}"
    )
    nobody_rung_twice(books)
    one_outcome_each(books)
    # A request the dead worker had in flight is answered `graph_no_answer`, not sent again.
    assert books.ambiguous_failures <= scenario.settings.graph_max_in_flight
    assert not books.check(max_calls=1, attempts_match_calls=False)


@pytest.mark.timeout(150)
async def test_a_worker_cut_from_the_broker_hands_its_answered_commands_to_the_fleet_unrepeated(
    amqp_url: str,
    fault_vhost: str,
    simulator: SimulatorThread,
    tmp_path: Path,
    redis_prefix: str,
) -> None:
    commands = 300
    async with Scenario(
        "fleet: one of two workers cut from the broker",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        GRAPH_TENANT_RATE_LIMIT=20,
        **fleet(redis_prefix),
    ) as scenario:
        await scenario.publish_commands(commands)
        simulator.latency = 0.1
        first = await scenario.start_worker()
        await scenario.start_worker()
        await scenario.wait_for_outcomes(commands // 4, timeout=60)
        await cut(fault_vhost, first)
        books = await scenario.finish(timeout=90)

    assert first.events("broker.connection_lost"), "the worker's connection was not cut"
    nobody_rung_twice(books)
    one_outcome_each(books)
    assert not books.check(
        max_calls=1,
        same_id_duplicates=scenario.settings.prefetch_count,
        attempts_match_calls=False,
    )
    assert {o.routing_key for o in books.outcomes} == {"invite.accepted"}


@pytest.mark.timeout(120)
async def test_a_settled_command_published_again_to_another_worker_is_acknowledged_not_sent(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path, redis_prefix: str
) -> None:
    commands = 30
    async with Scenario(
        "fleet: settled commands re-published to another worker",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        **fleet(redis_prefix),
    ) as scenario:
        sent = await scenario.publish_commands(commands)
        first = await scenario.start_worker()
        await scenario.wait_for_outcomes(commands, timeout=60)
        await scenario.stop_worker(first)
        second = await scenario.start_worker()
        for again in sent:
            await scenario.publish(again)
        await scenario.wait_until(
            lambda: len(second.events("command.settled")) >= commands,
            timeout=60,
            what="the second worker settling the re-published commands",
        )
        books = await scenario.finish(timeout=60)

    assert len(books.invites) == commands
    assert len(books.outcomes) == commands  # the second worker published nothing
    assert not books.check(max_calls=1)


@pytest.mark.timeout(120)
async def test_three_workers_share_one_tenant_budget_and_use_all_of_it(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path, redis_prefix: str
) -> None:
    limit, commands = 30, 240
    async with Scenario(
        "fleet: three workers, one tenant limit of 30/s",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        GRAPH_TENANT_RATE_LIMIT=limit,
        **fleet(redis_prefix),
    ) as scenario:
        for _ in range(3):
            await scenario.start_worker()
        await scenario.publish_commands(commands)
        books = await scenario.finish(timeout=90)

    arrivals = sorted(i.arrived_monotonic for i in books.invites)
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[limit:], strict=False)]
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    print(f"\n{len(arrivals)} invites at {rate:.1f}/s; shortest {limit + 1}: {min(gaps):.3f} s")
    # No one-second window holds limit+1 arrivals (as in the single-process limiter test).
    assert min(gaps) >= 1.0 - SCHEDULING_SLACK
    assert rate >= 0.9 * limit
    assert not books.check(max_calls=1)


@pytest.mark.timeout(120)
async def test_a_429_on_one_worker_pauses_the_tenant_on_every_worker(
    amqp_url: str, simulator: SimulatorThread, tmp_path: Path, redis_prefix: str
) -> None:
    commands, retry_after = 300, 2.0
    async with Scenario(
        "fleet: a 429 on one of three workers pauses all",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        GRAPH_TENANT_RATE_LIMIT=30,
        RETRY_IN_PROCESS_MAX=5,
        **fleet(redis_prefix),
    ) as scenario:
        for _ in range(3):
            await scenario.start_worker()
        await scenario.publish_commands(commands)
        await scenario.wait_for_outcomes(20, timeout=60)
        simulator.set_faults(
            [FaultRule(status=429, retry_after=str(int(retry_after)), remaining=1)]
        )
        books = await scenario.finish(timeout=90)

    [throttled] = [i for i in books.invites if i.status == 429]
    # Requests already granted when the 429 was answered may still arrive just after it.
    during = [
        i
        for i in books.invites
        if throttled.arrived_monotonic + 0.2
        < i.arrived_monotonic
        < throttled.arrived_monotonic + retry_after - SCHEDULING_SLACK
    ]
    print(f"\ninvites during the {retry_after:.0f} s pause, on any worker: {len(during)}")
    assert not during
    assert not books.check(max_calls=2, attempts_match_calls=False)
    assert {o.routing_key for o in books.outcomes} == {"invite.accepted"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """A redis-server of the test's own on a spare port, which the test may kill."""
    port = spare_port()
    servers = [start_redis(port, tmp_path)]
    yield port, servers
    for server in servers:
        server.kill()
        server.wait()


@pytest.mark.timeout(150)
async def test_redis_killed_and_restarted_mid_run_loses_nothing_and_rings_nobody_twice(
    amqp_url: str,
    simulator: SimulatorThread,
    tmp_path: Path,
    own_redis: tuple[int, list[subprocess.Popen[bytes]]],
) -> None:
    port, servers = own_redis
    commands = 300
    async with Scenario(
        "fleet: Redis killed and restarted mid-run",
        amqp_url=amqp_url,
        simulator=simulator,
        directory=tmp_path,
        GRAPH_TENANT_RATE_LIMIT=40,
        **fleet("restart:", f"redis://127.0.0.1:{port}/0"),
    ) as scenario:
        await scenario.publish_commands(commands)
        simulator.latency = 0.05
        workers = [await scenario.start_worker() for _ in range(2)]
        await scenario.wait_for_outcomes(commands // 3, timeout=60)
        servers[0].kill()
        servers[0].wait()
        await scenario.wait_until(
            lambda: all(w.events("redis.unavailable") for w in workers),
            timeout=30,
            what="both workers noticing Redis is away",
        )
        calls_while_away = len(simulator.invites)
        await asyncio.sleep(3)
        calls_after_pause = len(simulator.invites)
        servers.append(start_redis(port, tmp_path))
        books = await scenario.finish(timeout=90)

    print(f"\nGraph calls while Redis was away: {calls_after_pause - calls_while_away}")
    assert all(w.events("redis.available") for w in workers)
    # Nothing is sent without a record: the in-flight requests at the kill, and no more.
    assert calls_after_pause - calls_while_away <= 2 * scenario.settings.graph_max_in_flight
    nobody_rung_twice(books)
    one_outcome_each(books)
    assert not books.check(max_calls=1, attempts_match_calls=False)
    assert {o.routing_key for o in books.outcomes} == {"invite.accepted"}
