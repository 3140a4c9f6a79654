"""Why a command did not end in `invite.accepted`, and what that means for its message.

The exception tree, each leaf with the outcome event it produces and how the command's
AMQP message is settled::

    InviteError
    ├── InvalidCommand        invite.rejected   dead-lettered (the input can never succeed)
    ├── DeadlinePassed        invite.expired    acknowledged
    ├── TokenUnavailable      invite.failed     acknowledged
    ├── GraphError            invite.failed     acknowledged
    │   ├── GraphRefused          Graph answered with an error status
    │   ├── GraphUnreachable      no answer: connect or transport error before a response
    │   └── GraphNoAnswer         the request was sent and no answer came (timeout, reset)
    └── OutcomeNotConfirmed   (none yet)        handed back to the broker (requeued)

`settlement_for` is the one place that turns an outcome into a settlement.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

#: Why an `invite.failed` event failed.
FailureReason = Literal[
    "graph_refused", "graph_unreachable", "graph_no_answer", "token_unavailable"
]


class Settlement(enum.Enum):
    """The closed set of things the worker does with a command's message."""

    ACK = "ack"
    DEAD_LETTER = "dead_letter"
    REQUEUE = "requeue"


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
    """The command's deadline passed before Graph could be called."""


class TokenUnavailable(InviteError):
    """Entra ID did not issue a token for the tenant (consent revoked, bad credential...)."""

    def __init__(self, error: str, description: str):
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


class GraphError(InviteError):
    """Graph did not accept the invite."""

    reason: ClassVar[FailureReason] = "graph_refused"
    status: int | None = None
    code: str | None = None
    request_id: str | None = None


class GraphRefused(GraphError):
    """Graph answered with an error status (4xx, 5xx)."""

    def __init__(self, status: int, code: str | None, message: str, request_id: str | None):
        super().__init__(f"HTTP {status} {code or ''}: {message}".strip())
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


class GraphUnreachable(GraphError):
    """No answer: the connection failed before a response arrived."""

    reason: ClassVar[FailureReason] = "graph_unreachable"


class GraphNoAnswer(GraphError):
    """The request was sent and no answer came back (timeout, reset); Graph may have acted."""

    reason: ClassVar[FailureReason] = "graph_no_answer"


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
        case GraphError() | TokenUnavailable():
            return OutcomeKind.FAILED
    raise TypeError(f"{type(error).__name__} has no outcome")


def settlement_for(outcome: OutcomeKind | None) -> Settlement:
    """How a command's message is settled once its outcome event is confirmed.

    None means no outcome could be confirmed: the message goes back to the broker.
    """
    match outcome:
        case OutcomeKind.REJECTED:
            return Settlement.DEAD_LETTER
        case OutcomeKind.ACCEPTED | OutcomeKind.FAILED | OutcomeKind.EXPIRED:
            return Settlement.ACK
        case None:
            return Settlement.REQUEUE
