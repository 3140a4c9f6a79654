"""Outcome events: one CloudEvents 1.0 envelope per command, published to the outcome exchange.

The models here are the published contract (their JSON Schemas live in `schemas/`);
`accepted` and `from_error` build an event from what happened to a command, and `outcome_for`
names the kind a failure ends in. Pure: no I/O.
"""

from __future__ import annotations

import enum
import functools
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.core.commands import Command
from worker.core.errors import (
    DeadlinePassed,
    FailureReason,
    GraphError,
    GraphRefused,
    InvalidCommand,
    InviteError,
    RedeliveredTooOften,
    TokenUnavailable,
)
from worker.observability.tracing import current_headers


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


_CAMEL = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


class _Data(BaseModel):
    model_config = ConfigDict(
        frozen=True, populate_by_name=True, extra="forbid", alias_generator=_camel
    )
    command_id: str | None = Field(description="The command's commandId (None if unreadable).")
    call_id: str | None
    tenant_id: str | None
    client_context: str | None
    attempts: int = Field(description="Graph requests made for this command.")
    duration_ms: float = Field(description="From the command's arrival to its outcome.")


class AcceptedData(_Data):
    """Graph answered 200: the invitation is under way (not yet answered by the person)."""

    operation_id: str | None
    operation_status: str | None = Field(description="As Graph wrote it, e.g. 'Running'.")
    location: str | None = Field(description="URI of the inviteParticipantsOperation.")
    request_id: str | None = Field(description="Graph's request-id header.")
    client_request_id: str


class FailedData(_Data):
    """Graph refused the invite for good, could not be reached, or no token was issued."""

    reason: FailureReason
    http_status: int | None
    error_code: str | None
    error_message: str
    request_id: str | None
    client_request_id: str | None


class ProblemModel(BaseModel):
    model_config = _CAMEL
    field: str
    problem: str


class RejectedData(_Data):
    """The command is invalid; it was dead-lettered."""

    problems: list[ProblemModel]


class ExpiredData(_Data):
    """The deadline passed before Graph was called."""

    deadline: datetime | None


OutcomeData = AcceptedData | FailedData | RejectedData | ExpiredData


def _absent(value: object) -> bool:
    return value is None


class OutcomeEvent(BaseModel):
    """A CloudEvents 1.0 structured-mode JSON envelope."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    source: str
    type: OutcomeKind = Field(description="Equal to the AMQP routing key.")
    subject: str | None = Field(description="The commandId.")
    time: datetime
    datacontenttype: Literal["application/json"] = "application/json"
    data: OutcomeData
    #: CloudEvents' distributed-tracing extension: the context the event was made in (the
    #: command's span), left out when there is none.
    traceparent: str | None = Field(
        None,
        description="W3C Trace Context `traceparent` of the command's handling "
        "(CloudEvents distributed-tracing extension); absent when the command had no trace.",
        pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        exclude_if=_absent,
    )
    tracestate: str | None = Field(
        None,
        description="W3C Trace Context `tracestate` that came with the trace, if any.",
        exclude_if=_absent,
    )

    @property
    def kind(self) -> OutcomeKind:
        return self.type

    def to_json(self) -> bytes:
        """The event as published (and, with `REDIS_URL`, as remembered): made once."""
        return self._json

    @functools.cached_property
    def _json(self) -> bytes:
        # Kept outside the fields (pydantic ignores it in equality); the event is frozen and
        # never copied with changes, so it cannot go stale.
        return self.model_dump_json(by_alias=True).encode()


def _ids(command: Command | None, error: InviteError | None = None) -> dict[str, Any]:
    if command is not None:
        return {
            "command_id": command.command_id,
            "call_id": command.call_id,
            "tenant_id": command.tenant_id,
            "client_context": command.client_context,
        }
    # An invalid command: echo the ids it carried when they are short strings.
    raw = error.command if isinstance(error, InvalidCommand) and error.command else {}

    def echo(key: str) -> str | None:
        value = raw.get(key)
        if not isinstance(value, str) or len(value) > 256:
            return None
        # JSON may carry a lone surrogate ("\ud800"), which no UTF-8 encoder accepts.
        return value if value.isascii() or _encodable(value) else None

    return {
        "command_id": echo("commandId"),
        "call_id": echo("callId"),
        "tenant_id": echo("tenantId"),
        "client_context": echo("clientContext"),
    }


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _event(kind: OutcomeKind, data: OutcomeData, source: str) -> OutcomeEvent:
    # Made while the command is handled: its span (or the context that came with it).
    trace = current_headers()
    return OutcomeEvent(
        source=source,
        type=kind,
        subject=data.command_id,
        time=datetime.now(UTC),
        data=data,
        traceparent=trace.get("traceparent"),
        tracestate=trace.get("tracestate"),
    )


def accepted(
    command: Command,
    *,
    operation_id: str | None,
    operation_status: str | None,
    location: str | None,
    request_id: str | None,
    client_request_id: str,
    attempts: int,
    duration_ms: float,
    source: str,
) -> OutcomeEvent:
    data = AcceptedData(
        **_ids(command),
        attempts=attempts,
        duration_ms=round(duration_ms, 3),
        operation_id=operation_id,
        operation_status=operation_status,
        location=location,
        request_id=request_id,
        client_request_id=client_request_id,
    )
    return _event(OutcomeKind.ACCEPTED, data, source)


def from_error(
    error: InviteError,
    command: Command | None,
    *,
    attempts: int,
    duration_ms: float,
    client_request_id: str | None,
    source: str,
) -> OutcomeEvent:
    """The outcome event for a command that ended in `error`."""
    kind = outcome_for(error)
    common: dict[str, Any] = {
        **_ids(command, error),
        "attempts": attempts,
        "duration_ms": round(duration_ms, 3),
    }
    data: OutcomeData
    match error:
        case InvalidCommand(problems=problems):
            data = RejectedData(
                **common,
                problems=[ProblemModel(field=p.field, problem=p.problem) for p in problems],
            )
        case DeadlinePassed():
            data = ExpiredData(**common, deadline=command.deadline if command else None)
        case TokenUnavailable():
            data = FailedData(
                **common,
                reason="token_unavailable",
                http_status=None,
                error_code=error.error,
                error_message=error.description,
                request_id=None,
                client_request_id=None,
            )
        case RedeliveredTooOften():
            data = FailedData(
                **common,
                reason="redelivered_too_often",
                http_status=None,
                error_code=None,
                error_message=str(error),
                request_id=None,
                client_request_id=None,
            )
        case GraphError():
            data = FailedData(
                **common,
                reason=error.reason,
                http_status=error.status,
                error_code=error.code,
                error_message=error.message if isinstance(error, GraphRefused) else str(error),
                request_id=error.request_id,
                client_request_id=client_request_id,
            )
        case _:
            raise TypeError(f"{type(error).__name__} has no outcome event")
    return _event(kind, data, source)
