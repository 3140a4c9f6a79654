"""Why a command did not end in `invite.accepted`, and what that means for its message.

The exception tree, each leaf with the outcome event it produces::

    InviteError
    ├── InvalidCommand        invite.rejected   (the input can never succeed)
    ├── DeadlinePassed        invite.expired
    ├── TokenUnavailable      invite.failed     (transient when Entra ID is unreachable)
    ├── GraphError            invite.failed     (after retries, when transient)
    │   ├── GraphRefused          Graph answered with an error status
    │   ├── GraphUnreachable      not sent: connect error, pool timeout
    │   └── GraphNoAnswer         sent, and no answer came (timeout, reset): Graph may have acted
    ├── RedeliveredTooOften   invite.failed     (a poison message: it kept coming back)
    └── OutcomeNotConfirmed   (none yet)        the broker did not confirm the outcome

A command's message is settled in one of the ways of `Settlement`, and `settlement_for` is
the one place that chooses which.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

#: Why an `invite.failed` event failed.
FailureReason = Literal[
    "graph_refused",
    "graph_unreachable",
    "graph_no_answer",
    "token_unavailable",
    "redelivered_too_often",
]


class Settlement(enum.Enum):
    """The closed set of things the worker does with a command's message."""

    ACK = "ack"
    """The outcome is confirmed (or was already): remove the command."""
    DEAD_LETTER = "dead_letter"
    """The outcome is confirmed; keep the command in the dead-letter queue, with why."""
    RETRY_LATER = "retry_later"
    """Publish a copy to a delay queue that returns it to the command queue, then remove it."""
    REQUEUE = "requeue"
    """Nothing could be confirmed: hand the message back to the broker as it is."""


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

    def __init__(self, error: str, description: str, *, transient: bool = False):
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        #: Entra ID could not be reached, as opposed to refusing.
        self.transient = transient


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


class GraphUnreachable(GraphError):
    """Not sent: the connection failed before the request could reach Graph."""

    reason: ClassVar[FailureReason] = "graph_unreachable"


class GraphNoAnswer(GraphError):
    """The request was sent and no answer came back (timeout, reset); Graph may have acted."""

    reason: ClassVar[FailureReason] = "graph_no_answer"


class RedeliveredTooOften(InviteError):
    """The broker delivered the message more often than allowed: it keeps failing."""

    def __init__(self, deliveries: int):
        super().__init__(f"delivered {deliveries} times without being settled")
        self.deliveries = deliveries


class OutcomeNotConfirmed(InviteError):
    """The broker did not confirm the outcome event; the command must stay on the queue."""


class OutcomeKind(enum.StrEnum):
    """The four terminal outcomes; each value is also the event's routing key and type."""

    ACCEPTED = "invite.accepted"
    FAILED = "invite.failed"
    REJECTED = "invite.rejected"
    EXPIRED = "invite.expired"


def outcome_for(error: InviteError) -> OutcomeKind:
    """The outcome event a failed command ends in."""
    match error:
        case InvalidCommand():
            return OutcomeKind.REJECTED
        case DeadlinePassed():
            return OutcomeKind.EXPIRED
        case GraphError() | TokenUnavailable() | RedeliveredTooOften():
            return OutcomeKind.FAILED
    raise TypeError(f"{type(error).__name__} has no outcome")


def settlement_for(
    outcome: OutcomeKind | None,
    *,
    confirmed: bool,
    retry: bool = False,
    poison: bool = False,
) -> Settlement:
    """How a command's message is settled.

    `outcome` is the outcome event published for it (None when the command is not finished:
    a retry is due, or it was settled before); `confirmed` says whether the broker confirmed
    what had to be published; `poison` marks a message that kept coming back.
    """
    if not confirmed:
        return Settlement.REQUEUE
    if retry:
        return Settlement.RETRY_LATER
    if poison or outcome is OutcomeKind.REJECTED:
        return Settlement.DEAD_LETTER
    return Settlement.ACK
