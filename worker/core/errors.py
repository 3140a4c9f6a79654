"""Why a command did not end in `invite.accepted`, and what that means for its message.

The exception tree, each leaf with the outcome event it produces::

    InviteError
    ├── InvalidCommand        invite.rejected   (the input can never succeed)
    ├── DeadlinePassed        invite.expired
    ├── TokenUnavailable      invite.failed     (transient when Entra ID is unreachable or 5xx)
    ├── GraphError            invite.failed     (after retries, when transient)
    │   ├── GraphRefused          Graph answered with an error status
    │   │   └── GraphAmbiguous        500, 502 or 504: Graph may have acted
    │   ├── GraphUnreachable      not sent: connect error, pool timeout
    │   └── GraphNoAnswer         sent, and no answer came (timeout, reset): Graph may have acted
    └── RedeliveredTooOften   invite.failed     (a poison message: it kept coming back)

`worker.core.outcomes.outcome_for` maps an error to its outcome kind, and
`worker.core.settlement.settlement_for` is the one place that decides what becomes of the
message. Third-party errors (httpx, aiohttp, MSAL) are mapped to these at one boundary per
edge, keeping the cause: `worker.graph.client.map_graph_errors` and
`worker.graph.tokens.map_msal_errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

#: Why an `invite.failed` event failed.
FailureReason = Literal[
    "graph_refused",
    "graph_unreachable",
    "graph_no_answer",
    "graph_ambiguous",
    "token_unavailable",
    "redelivered_too_often",
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a command: where (a JSON path), and what."""

    field: str
    problem: str


class InviteError(Exception):
    """Base of every error that decides a command's outcome."""


class InvalidCommand(InviteError):
    """The message is not a valid command; retrying cannot help."""

    def __init__(self, problems: list[Problem], *, command: dict[str, Any] | None = None):
        super().__init__("; ".join(f"{p.field}: {p.problem}" for p in problems))
        self.problems = problems
        #: The decoded body, when it was a JSON object: ids are echoed from it when present.
        self.command = command


class DeadlinePassed(InviteError):
    """The command's deadline passed before Graph could be called (again)."""


class TokenUnavailable(InviteError):
    """Entra ID did not issue a token for the tenant (consent revoked, bad credential...)."""

    def __init__(
        self,
        error: str,
        description: str,
        *,
        transient: bool = False,
        retry_after: float | None = None,
    ):
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        #: Entra ID could not be reached or answered 5xx, as opposed to refusing.
        self.transient = transient
        #: Seconds from Entra ID's Retry-After header, when it sent one.
        self.retry_after = retry_after


class GraphError(InviteError):
    """Graph did not accept the invite."""

    reason: ClassVar[FailureReason] = "graph_refused"
    status: int | None = None
    code: str | None = None
    request_id: str | None = None


class GraphRefused(GraphError):
    """Graph answered with an error status (4xx, 5xx)."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        request_id: str | None,
        *,
        retry_after: float | None = None,
    ):
        super().__init__(f"HTTP {status} {code or ''}: {message}".strip())
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        #: Seconds from Graph's Retry-After header, when it sent one.
        self.retry_after = retry_after


class GraphAmbiguous(GraphRefused):
    """Graph answered 500, 502 or 504 to the invite: like a timeout after sending, it may
    have acted (a gateway timing out does not stop the service behind it)."""

    reason: ClassVar[FailureReason] = "graph_ambiguous"


class GraphUnreachable(GraphError):
    """Not sent: the connection failed before the request could reach Graph."""

    reason: ClassVar[FailureReason] = "graph_unreachable"


class GraphNoAnswer(GraphError):
    """The request was sent and no answer came back (timeout, reset); Graph may have acted."""

    reason: ClassVar[FailureReason] = "graph_no_answer"


class RedeliveredTooOften(InviteError):
    """The broker delivered the message more often than allowed: it keeps failing."""

    def __init__(self, deliveries: int, *, crashed: bool = False):
        super().__init__(
            f"handling crashed {deliveries} times"
            if crashed
            else f"delivered {deliveries} times without being settled"
        )
        self.deliveries = deliveries
        #: Counted by the worker's crash counter rather than the broker's deliveries.
        self.crashed = crashed


class SharedStateUnavailable(Exception):
    """The fleet's shared state (Redis) did not answer: no request is sent without a record.

    Not an `InviteError`: it says nothing about the command, which goes back to the broker
    to be tried again once the shared state answers.
    """
