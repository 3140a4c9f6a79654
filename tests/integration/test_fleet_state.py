"""The fleet's shared state against a real Redis: records, fleet-wide budgets and pauses.

Several `RedisSharedState` instances in one test stand for several worker processes: each
has its own owner id and lease, and they meet only in Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.support.fleet import TENANT, make_command, outcome
from tests.support.harness import isolated_settings
from tests.support.redis_server import spare_port, start_redis
from worker.app import shared_state
from worker.core.errors import SharedStateUnavailable
from worker.core.ports import ClaimVerdict
from worker.fleet import RedisSharedState
from worker.observability.metrics import Metrics

pytestmark = pytest.mark.integration


@asynccontextmanager
async def fleet(
    url: str, prefix: str, count: int, *, limit: int = 100, lease: float = 5.0
) -> AsyncIterator[list[RedisSharedState]]:
    states = [
        RedisSharedState(
            aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1),
            prefix=prefix,
            tenant_rate_limit=limit,
            tenant_rate_limits={},
            idempotency_ttl=3600,
            lease=lease,
            probe_timeout=5.0,
        )
        for _ in range(count)
    ]
    for state in states:
        await state.start()
    try:
        yield states
    finally:
        for state in states:
            await state.close()


async def test_a_command_sent_by_one_live_process_is_never_granted_to_another(
    redis_server: str, redis_prefix: str
) -> None:
    async with fleet(redis_server, redis_prefix, 2) as (a, b):
        cmd = make_command("held")
        assert (await a.begin_send(cmd, take_orphaned=False)).verdict is ClaimVerdict.GRANTED
        assert (await b.begin_send(cmd, take_orphaned=False)).verdict is ClaimVerdict.BUSY
        # The holder itself may send again (an in-process retry).
        assert (await a.begin_send(cmd, take_orphaned=False)).verdict is ClaimVerdict.GRANTED


async def test_a_command_whose_sender_died_is_orphaned_for_the_next_process(
    redis_server: str, redis_prefix: str
) -> None:
    async with fleet(redis_server, redis_prefix, 2) as (a, b):
        cmd = make_command("orphan")
        assert (await a.begin_send(cmd, take_orphaned=False)).verdict is ClaimVerdict.GRANTED
        # The process dies: its lease is gone (as when it expires).
        await b._redis.delete(f"{redis_prefix}owner:{a.owner}")
        assert (await b.begin_send(cmd, take_orphaned=False)).verdict is ClaimVerdict.ORPHANED
        # With RETRY_AMBIGUOUS the next process takes it over.
        assert (await b.begin_send(cmd, take_orphaned=True)).verdict is ClaimVerdict.GRANTED


async def test_a_released_command_is_sent_next_unless_graph_may_have_acted_on_it(
    redis_server: str, redis_prefix: str
) -> None:
    async with fleet(redis_server, redis_prefix, 2) as (a, b):
        unsent, maybe = make_command("unsent"), make_command("maybe")
        for cmd in (unsent, maybe):
            assert (await a.begin_send(cmd, take_orphaned=False)).verdict is ClaimVerdict.GRANTED
        await a.release(unsent, may_have_acted=False)
        await a.release(maybe, may_have_acted=True)
        assert (await b.begin_send(unsent, take_orphaned=False)).verdict is ClaimVerdict.GRANTED
        assert (await b.begin_send(maybe, take_orphaned=False)).verdict is ClaimVerdict.ORPHANED


async def test_a_settled_command_gives_every_process_its_unconfirmed_event_or_nothing(
    redis_server: str, redis_prefix: str
) -> None:
    async with fleet(redis_server, redis_prefix, 2) as (a, b):
        unconfirmed, confirmed = make_command("unconfirmed"), make_command("confirmed")
        for cmd in (unconfirmed, confirmed):
            await a.begin_send(cmd, take_orphaned=False)
        event = outcome(unconfirmed)
        await a.settle(unconfirmed, event, confirmed=False)
        # As the worker does: settled before publishing, confirmed once the broker took it.
        await a.settle(confirmed, outcome(confirmed), confirmed=False)
        await a.settle(confirmed, outcome(confirmed), confirmed=True)
        await a.write_confirmations()

        replay = await b.begin_send(unconfirmed, take_orphaned=False)
        assert replay.verdict is ClaimVerdict.SETTLED
        assert replay.event is not None
        assert replay.event.id == event.id
        assert replay.fingerprint == unconfirmed.fingerprint()
        done = await b.begin_send(confirmed, take_orphaned=False)
        assert (done.verdict, done.event) == (ClaimVerdict.SETTLED, None)
        # Another command under a settled id: the fingerprint tells it apart.
        reused = make_command("confirmed", call_id="5e0d5a2c-61a4-4a8e-9d36-2f3c8e0f1b77")
        other = await b.begin_send(reused, take_orphaned=False)
        assert other.verdict is ClaimVerdict.SETTLED
        assert other.fingerprint != reused.fingerprint()


async def _grant_loop(
    state: RedisSharedState, name: str, until: float, stamps: list[float]
) -> None:
    index = 0
    while time.monotonic() < until:
        index += 1
        cmd = make_command(f"{name}-{index}")
        while True:
            claim = await state.begin_send(cmd, take_orphaned=False)
            if claim.verdict is ClaimVerdict.GRANTED:
                stamps.append(time.monotonic())
                break
            assert claim.verdict is ClaimVerdict.WAIT
            await asyncio.sleep(claim.wait)


async def test_three_processes_together_never_exceed_the_tenant_limit_in_any_second(
    redis_server: str, redis_prefix: str
) -> None:
    limit, seconds = 30, 4.0
    stamps: list[float] = []
    async with fleet(redis_server, redis_prefix, 3, limit=limit) as states:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(_grant_loop(state, f"p{n}", until, stamps) for n, state in enumerate(states))
        )
    stamps.sort()
    # Grants are stamped by Redis's clock; these are the local moments the grants arrived,
    # which lag by a round trip each: the window allows 10 ms of that jitter.
    busiest = max(
        sum(1 for t in stamps[i:] if t < start + 1.0 - 0.01) for i, start in enumerate(stamps)
    )
    rate = len(stamps) / seconds
    print(f"\n3 processes, limit {limit}/s: {len(stamps)} grants, {rate:.1f}/s, busiest {busiest}")
    assert busiest <= limit
    assert rate >= 0.9 * limit


async def test_a_429_on_one_process_pauses_the_tenant_on_all_then_one_probe_goes_first(
    redis_server: str, redis_prefix: str
) -> None:
    async with fleet(redis_server, redis_prefix, 2, limit=10) as (a, b):
        await a.throttle(TENANT, 0.5)
        paused = await b.begin_send(make_command("during"), take_orphaned=False)
        assert paused.verdict is ClaimVerdict.WAIT
        assert 0.3 < paused.wait <= 0.5
        await asyncio.sleep(paused.wait + 0.05)
        probe = make_command("probe")
        assert (await b.begin_send(probe, take_orphaned=False)).verdict is ClaimVerdict.GRANTED
        # Until the probe is answered, nobody else is granted.
        held = await a.begin_send(make_command("after"), take_orphaned=False)
        assert held.verdict is ClaimVerdict.WAIT
        await b.settle(probe, outcome(probe), confirmed=False)
        # Then the halved limit (5 of 10), growing back by one a second.
        granted = 0
        for index in range(10):
            claim = await a.begin_send(make_command(f"after-{index}"), take_orphaned=False)
            granted += claim.verdict is ClaimVerdict.GRANTED
        assert granted == 4  # the probe took the fifth grant of this second


async def test_redis_away_sends_nothing_and_keeps_the_writes_until_it_answers_again(
    tmp_path: Path,
) -> None:
    port = spare_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path)
    changes: list[bool] = []
    try:
        async with fleet(url, "away:", 1, lease=1.5) as (state,):
            state.on_availability_change(changes.append)
            cmd = make_command("in-hand")
            assert (
                await state.begin_send(cmd, take_orphaned=False)
            ).verdict is ClaimVerdict.GRANTED
            server.kill()
            server.wait()
            with pytest.raises(SharedStateUnavailable):
                await state.begin_send(make_command("new"), take_orphaned=False)
            assert not state.available
            await state.settle(cmd, outcome(cmd), confirmed=True)  # kept, not lost
            await state.write_confirmations()
            server = start_redis(port, tmp_path)
            await _eventually(lambda: state.available, 10)
            assert changes == [False, True]
            # The settle kept while Redis was away was written once it came back.
            claim = await state.begin_send(cmd, take_orphaned=False)
            assert (claim.verdict, claim.event) == (ClaimVerdict.SETTLED, None)
    finally:
        server.kill()
        server.wait()


async def _eventually(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_burst_of_calls_beyond_the_pool_waits_for_connections_instead_of_failing(
    redis_server: str, redis_prefix: str
) -> None:
    settings = isolated_settings(
        {
            "REDIS_URL": redis_server,
            "REDIS_KEY_PREFIX": redis_prefix,
            "GRAPH_MAX_IN_FLIGHT": 1,
            "GRAPH_TENANT_RATE_LIMIT": 3000,
        }
    )
    state = shared_state(settings, Metrics())
    assert state is not None
    await state.start()
    try:
        commands = [make_command(f"burst-{n}") for n in range(300)]
        claims = await asyncio.gather(*(state.begin_send(c, take_orphaned=False) for c in commands))
        assert {claim.verdict for claim in claims} == {ClaimVerdict.GRANTED}
        assert state.available
    finally:
        await state.close()
