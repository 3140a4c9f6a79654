"""Small fakes with real behaviour for the handler's seams; they record what happened."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from worker.core.errors import TokenUnavailable
from worker.core.invite import GraphAccepted, InviteRequest
from worker.core.ports import TokenProvider


class FakeTokens(TokenProvider):
    def __init__(
        self, *, refuse: set[str] | None = None, outage: TokenUnavailable | None = None
    ) -> None:
        self.refuse = refuse or set()
        #: Raised for every tenant while set: Entra ID failing (a transient error).
        self.outage = outage
        self.requests: list[str] = []
        self.invalidated: list[str] = []

    async def invalidate(self, tenant_id: str) -> None:
        self.invalidated.append(tenant_id)

    async def token(self, tenant_id: str) -> str:
        self.requests.append(tenant_id)
        if self.outage is not None:
            raise self.outage
        if tenant_id in self.refuse:
            raise TokenUnavailable("unauthorized_client", "consent was revoked")
        return f"token-for-{tenant_id}"


class FakeGraph:
    """Accepts invites after `latency` seconds, tracking how many overlap.

    `failures` are raised, in order, by the first requests, before Graph accepts.
    """

    def __init__(self, latency: float = 0.0, failures: Iterable[Exception] = ()) -> None:
        self.latency = latency
        self.failures = list(failures)
        self.sent: list[tuple[InviteRequest, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def invite(
        self, request: InviteRequest, token: str, on_sent: Callable[[], None]
    ) -> GraphAccepted:
        self.sent.append((request, token))
        on_sent()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency)
            if self.failures:
                raise self.failures.pop(0)
        finally:
            self.in_flight -= 1
        return GraphAccepted("op-1", "Running", "https://graph/op-1", "req-1", 200)
