"""Per-tenant rate limiting: never more than N Graph requests in any one-second window.

A sliding log rather than a token bucket: a bucket of N tokens refilled at N/s lets 2N
requests through in one second (a full bucket, then its refill), and Graph counts requests
in windows. The log keeps the last N grants. Each grant is stamped with the moment its
request was actually written to the wire (the Graph client reports it), not the moment it
was granted, because what Graph counts is arrivals: a request that waited for a fresh TLS
connection after its grant would otherwise arrive closer to its successors than the log
believes. A new grant waits until the oldest of the last N was sent more than a window ago.

A 429 from Graph throttles the whole tenant (`throttle`): nothing is granted before its
Retry-After has passed, the tenant's limit is halved, and it then grows back by a tenth of
the configured limit per second without another 429.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping

from worker.core.ownership import Ownership


class Grant:
    """Permission to send one request; stamp it with `mark_sent` when the request is out."""

    __slots__ = ("_limiter", "sent_at")

    def __init__(self, limiter: SlidingWindowLimiter) -> None:
        self._limiter = limiter
        self.sent_at: float | None = None

    def mark_sent(self) -> None:
        """Record that the request left now; later calls keep the first time."""
        if self.sent_at is None:
            self.sent_at = self._limiter.clock()
            self._limiter.stamped.set()


class SlidingWindowLimiter:
    """At most `limit` requests sent in any `window` seconds, granted in arrival order."""

    def __init__(
        self,
        limit: int,
        *,
        window: float = 1.0,
        margin: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        # The margin absorbs the jitter between writing a request and the far end
        # registering its arrival.
        self._span = window + margin
        self.clock = clock
        self._grants: deque[Grant] = deque(maxlen=limit)
        self._lock = asyncio.Lock()
        self.stamped = asyncio.Event()
        self._blocked_until = 0.0
        self._reduced_limit = limit
        self._recovery_step = max(1.0, limit / 10)

    def throttle(self, retry_after: float) -> None:
        """Graph answered 429: pause the tenant for `retry_after` seconds and halve its rate."""
        now = self.clock()
        self._reduced_limit = max(1, self.current_limit() // 2)
        self._blocked_until = max(self._blocked_until, now + retry_after)

    def blocked_for(self) -> float:
        """Seconds until the tenant may be sent anything again after a 429."""
        return max(0.0, self._blocked_until - self.clock())

    def current_limit(self) -> int:
        """The limit in force: the configured one, or less while recovering from a 429."""
        if self._reduced_limit >= self.limit:
            return self.limit
        recovering_for = max(0.0, self.clock() - self._blocked_until)
        grown = self._reduced_limit + int(recovering_for * self._recovery_step)
        if grown >= self.limit:
            self._reduced_limit = self.limit
        return min(self.limit, grown)

    def delay(self) -> float:
        """Seconds until a grant is possible: 0 if one is free, inf while the oldest is unsent."""
        blocked = self.blocked_for()
        limit = self.current_limit()
        if len(self._grants) < limit:
            return blocked
        sent_at = self._grants[-limit].sent_at
        if sent_at is None:
            return math.inf
        return max(blocked, sent_at + self._span - self.clock())

    async def acquire(self) -> Grant:
        """Wait for a grant. The caller must call `mark_sent` on it, also when not sending."""
        grant = await self.acquire_unless_paused(math.inf)
        assert grant is not None  # noqa: S101 - with no bound, acquiring only waits
        return grant

    async def acquire_unless_paused(
        self, max_blocked: float, owner: Ownership | None = None
    ) -> Grant | None:
        """Wait for a grant; None when a 429 blocks the tenant longer than `max_blocked`.

        Raises `DeliveryLost` instead of taking a grant once `owner` is lost: the grant
        stays free for the next waiter.
        """
        # The lock makes waiters take grants in arrival order, and keeps a waiter from
        # being overtaken by a newcomer that found a free slot first.
        async with self._lock:
            while True:
                if owner is not None:
                    owner.check()
                if (wait := self.delay()) <= 0:
                    break
                if self.blocked_for() > max_blocked:
                    # A long pause after a 429: the caller hands the command to the broker
                    # instead of holding its in-flight slot through the pause.
                    return None
                if math.isinf(wait):
                    self.stamped.clear()
                    await self.stamped.wait()
                else:
                    await asyncio.sleep(wait)
            grant = Grant(self)
            self._grants.append(grant)
        return grant


class TenantRateLimits:
    """One `SlidingWindowLimiter` per tenant, created on first use.

    Every tenant gets `limit` unless `overrides` names its own.
    """

    def __init__(
        self, limit: int, *, overrides: Mapping[str, int] | None = None, margin: float = 0.02
    ) -> None:
        self._limit = limit
        self._overrides = dict(overrides or {})
        self._margin = margin
        self._limiters: dict[str, SlidingWindowLimiter] = {}

    def for_tenant(self, tenant_id: str) -> SlidingWindowLimiter:
        limiter = self._limiters.get(tenant_id)
        if limiter is None:
            limit = self._overrides.get(tenant_id, self._limit)
            limiter = SlidingWindowLimiter(limit, margin=self._margin)
            self._limiters[tenant_id] = limiter
        return limiter
