"""The sliding-window limiter: never more than N requests sent in any window."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from worker.core.ratelimit import SlidingWindowLimiter, TenantRateLimits


async def test_no_window_holds_more_sends_than_the_limit() -> None:
    limiter = SlidingWindowLimiter(5, window=0.2, margin=0.0)
    sends: list[float] = []

    async def send() -> None:
        grant = await limiter.acquire()
        grant.mark_sent()
        sends.append(time.monotonic())

    await asyncio.gather(*(send() for _ in range(17)))
    sends.sort()
    assert len(sends) == 17
    assert all(later - earlier >= 0.2 for earlier, later in zip(sends, sends[5:], strict=False))


async def test_the_window_counts_from_when_a_request_was_sent_not_granted() -> None:
    limiter = SlidingWindowLimiter(1, window=0.2, margin=0.0)
    first = await limiter.acquire()
    # Not yet sent: the next grant cannot know when the window ends, so it waits.
    assert math.isinf(limiter.delay())
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.3)
    assert not waiter.done()
    first.mark_sent()
    sent_at = time.monotonic()
    second = await waiter
    second.mark_sent()
    assert time.monotonic() - sent_at >= 0.19


async def test_a_burst_up_to_the_limit_is_granted_without_waiting() -> None:
    limiter = SlidingWindowLimiter(10, window=60.0)
    for _ in range(10):
        (await asyncio.wait_for(limiter.acquire(), 1)).mark_sent()
    assert limiter.delay() > 59


async def test_each_tenant_has_its_own_limiter() -> None:
    limits = TenantRateLimits(1)
    (await limits.for_tenant("a").acquire()).mark_sent()
    assert limits.for_tenant("a").delay() > 0.5
    assert limits.for_tenant("b").delay() == 0.0
    assert limits.for_tenant("a") is limits.for_tenant("a")


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SlidingWindowLimiter(0)


async def test_a_throttled_tenant_gets_nothing_before_retry_after_then_a_reduced_rate() -> None:
    now = [100.0]
    limiter = SlidingWindowLimiter(10, margin=0.0, clock=lambda: now[0])
    limiter.throttle(retry_after=20.0)
    assert limiter.blocked_for() == 20.0
    assert limiter.delay() == 20.0
    assert limiter.current_limit() == 5
    now[0] += 20.0
    assert limiter.delay() == 0.0
    assert limiter.current_limit() == 5
    # A tenth of the configured limit per second without another 429.
    now[0] += 2.0
    assert limiter.current_limit() == 7
    now[0] += 10.0
    assert limiter.current_limit() == 10


async def test_while_reduced_the_window_counts_against_the_reduced_limit() -> None:
    now = [0.0]
    limiter = SlidingWindowLimiter(4, margin=0.0, clock=lambda: now[0])
    limiter.throttle(retry_after=0.0)
    assert limiter.current_limit() == 2
    for _ in range(2):
        (await limiter.acquire()).mark_sent()
    assert limiter.delay() == 1.0
