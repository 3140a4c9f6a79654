"""The core's ports: what the handler needs from the outside, implemented by the edges.

`worker.graph.tokens.MsalTokenProvider` implements `TokenProvider` and
`worker.graph.client.GraphClient` implements `InviteSender`; tests pass small fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from worker.core.invite import GraphAccepted, InviteRequest


class TokenProvider:
    """Hands out a bearer token for a tenant, or raises `TokenUnavailable`.

    A base class rather than a Protocol so that `close()` has a default: callers close any
    provider without asking what it is (httpx's transports do the same with `aclose()`).
    """

    async def token(self, tenant_id: str) -> str:
        raise NotImplementedError

    async def invalidate(self, tenant_id: str) -> None:
        """Forget the tenant's token: Graph refused it (401)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the provider holds (connections, threads); nothing by default."""


class InviteSender(Protocol):
    """Sends one invite to Graph; raises a `GraphError` when Graph does not accept it.

    `on_sent` is called once the request has been written out, for the rate limiter.
    """

    async def invite(
        self, request: InviteRequest, token: str, on_sent: Callable[[], None]
    ) -> GraphAccepted: ...
