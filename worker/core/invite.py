"""What a command becomes on the wire to Graph, and what Graph's answer means. Pure: no I/O."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from worker.core.commands import Command
from worker.core.errors import GraphAmbiguous, GraphRefused
from worker.core.retry import AMBIGUOUS_STATUSES, parse_retry_after

_MAX_ERROR_MESSAGE = 500


@dataclass(frozen=True, slots=True)
class InviteRequest:
    """One `POST /communications/calls/{id}/participants/invite`, ready to send."""

    tenant_id: str
    path: str
    body: bytes
    #: Sent as `client-request-id`: the commandId, so that a support case can name it.
    client_request_id: str


@dataclass(frozen=True, slots=True)
class GraphAccepted:
    """Graph took the invite: an inviteParticipantsOperation is running."""

    operation_id: str | None
    operation_status: str | None
    location: str | None
    request_id: str | None
    status: int


def build_request(command: Command) -> InviteRequest:
    # The call id was validated to be path-safe; quoting it anyway keeps the path ours.
    path = f"/communications/calls/{quote(command.call_id, safe='')}/participants/invite"
    body = json.dumps(
        {"participants": command.participants, "clientContext": command.client_context},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    return InviteRequest(command.tenant_id, path, body, command.command_id)


def interpret(status: int, headers: Mapping[str, str], body: bytes) -> GraphAccepted:
    """Graph's answer as a `GraphAccepted`, or `GraphRefused` for any non-2xx status
    (`GraphAmbiguous` for the statuses after which Graph may have acted)."""
    request_id = headers.get("request-id")
    document = _json_object(body)
    if 200 <= status < 300:
        return GraphAccepted(
            operation_id=_text(document.get("id")),
            operation_status=_text(document.get("status")),
            location=headers.get("location"),
            request_id=request_id,
            status=status,
        )
    error = document.get("error")
    error = error if isinstance(error, dict) else {}
    message = _text(error.get("message")) or f"HTTP {status} without a Graph error body"
    refusal = GraphAmbiguous if status in AMBIGUOUS_STATUSES else GraphRefused
    raise refusal(
        status,
        _text(error.get("code")),
        message[:_MAX_ERROR_MESSAGE],
        request_id,
        retry_after=parse_retry_after(headers.get("retry-after")),
    )


def _json_object(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        # What orjson refuses and the standard library reads (NaN, a lone surrogate): only
        # string fields are read from it, which both parse alike.
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return {}
    return document if isinstance(document, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
