"""Per-tenant rate limiting: never more than N Graph requests in any one-second window.

A sliding log rather than a token bucket: a bucket of N tokens refilled at N/s lets 2N
requests through in one second (a full bucket, then its refill), and Graph counts requests
in windows. The log keeps the last N grants. Each grant is stamped with the moment its
request was actually written to the wire (the Graph client reports it), not the moment it
was granted, because what Graph counts is arrivals: a request that waited for a fresh TLS
connection after its grant would otherwise arrive closer to its successors than the log
believes. A new grant waits until the oldest of the last N was sent more than a window ago.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable


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

    def delay(self) -> float:
        """Seconds until a grant is possible: 0 if one is free, inf while the oldest is unsent."""
        if len(self._grants) < self.limit:
            return 0.0
        sent_at = self._grants[0].sent_at
        if sent_at is None:
            return math.inf
        return max(0.0, sent_at + self._span - self.clock())

    async def acquire(self) -> Grant:
        """Wait for a grant. The caller must call `mark_sent` on it, also when not sending."""
        # The lock makes waiters take grants in arrival order, and keeps a waiter from
        # being overtaken by a newcomer that found a free slot first.
        async with self._lock:
            while (wait := self.delay()) > 0:
                if math.isinf(wait):
                    self.stamped.clear()
                    await self.stamped.wait()
                else:
                    await asyncio.sleep(wait)
            grant = Grant(self)
            self._grants.append(grant)
        return grant


class TenantRateLimits:
    """One `SlidingWindowLimiter` per tenant, created on first use."""

    def __init__(self, limit: int, *, margin: float = 0.02) -> None:
        self._limit = limit
        self._margin = margin
        self._limiters: dict[str, SlidingWindowLimiter] = {}

    def for_tenant(self, tenant_id: str) -> SlidingWindowLimiter:
        limiter = self._limiters.get(tenant_id)
        if limiter is None:
            limiter = SlidingWindowLimiter(self._limit, margin=self._margin)
            self._limiters[tenant_id] = limiter
        return limiter
