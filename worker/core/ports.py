"""The core's ports: what the handler needs from the outside, implemented by the edges.

`worker.graph.tokens.MsalTokenProvider` implements `TokenProvider` and
`worker.graph.client.GraphClient` implements `InviteSender`; `worker.fleet.RedisSharedState`
implements `SharedState`, the fleet-wide state that is optional (REDIS_URL); tests pass
small fakes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from worker.core.commands import Command
from worker.core.invite import GraphAccepted, InviteRequest
from worker.core.outcomes import OutcomeEvent


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


class ClaimVerdict(enum.Enum):
    """What the fleet's shared state says to a process about to send a command's request."""

    #: Send now: the record says *sending* by this process and the tenant's window has a grant.
    GRANTED = "granted"
    #: The tenant's one-second window is full, or a 429's pause (or its probe) is not over:
    #: ask again after `wait` seconds.
    WAIT = "wait"
    #: Another live process holds the command: never send; come back later.
    BUSY = "busy"
    #: A process that died was sending it: Graph may have acted (the ambiguous outcome).
    ORPHANED = "orphaned"
    #: Settled by some process: its event (when never confirmed) and fingerprint.
    SETTLED = "settled"


@dataclass(frozen=True, slots=True)
class SendClaim:
    verdict: ClaimVerdict
    #: Seconds to wait before asking again (WAIT, BUSY).
    wait: float = 0.0
    #: Of a settled command: its fingerprint, and its event unless the broker confirmed it.
    fingerprint: bytes | None = None
    event: OutcomeEvent | None = None


class SharedState(Protocol):
    """The fleet's idempotency records and tenant budgets (`worker.fleet.RedisSharedState`).

    Every call that must reach the shared state raises `SharedStateUnavailable` when it
    cannot; `release`, `throttle` and `settle` instead keep what they could not write and
    write it once the shared state answers again.
    """

    @property
    def available(self) -> bool: ...

    def on_availability_change(self, callback: Callable[[bool], None]) -> None: ...

    async def begin_send(self, command: Command, *, take_orphaned: bool) -> SendClaim:
        """Claim the command for this process and take a grant of its tenant's budget."""
        ...

    async def release(self, command: Command, *, may_have_acted: bool) -> None:
        """This process no longer sends the command: free again, or orphaned when Graph
        may have acted on a request that got no answer."""
        ...

    async def throttle(self, tenant_id: str, retry_after: float) -> None:
        """A 429: pause the tenant on every process for `retry_after` seconds."""
        ...

    async def settle(self, command: Command, event: OutcomeEvent, *, confirmed: bool) -> None:
        """The command's outcome, published (`confirmed`) or not."""
        ...
