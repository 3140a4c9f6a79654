"""Graph's side: the call-invite endpoint, its request checks, Graph error answers and the
recorded invites."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from worker.devtools.simulator.common import _json_object, _json_response
from worker.devtools.simulator.entra import TokenEndpoint
from worker.devtools.simulator.faults import FaultRule, FaultTable
from worker.devtools.simulator.http import ConnectionAction, Request, Response

MAX_CLIENT_CONTEXT = 256
_GRAPH_CODES = {401: "InvalidAuthenticationToken", 429: "TooManyRequests", 500: "UnknownError"}
_BAD_JSON = (
    "Unable to read JSON request payload. Please ensure Content-Type header is set and "
    "payload is of valid JSON format."
)


@dataclass(frozen=True)
class RecordedInvite:
    tenant_id: str
    """The tenant of the presented token; "" when no token of this simulator was sent."""
    call_id: str
    client_request_id: str | None
    body: dict[str, Any]
    """The JSON object sent, or {} when the body was not one."""
    status: int | str
    """The HTTP status answered, or "hang" / "reset"."""
    arrived_monotonic: float
    arrived_at: float
    acted: bool = False
    """Graph carried the invite out (a 200, or a fault rule with ``act``)."""


class _GraphError(Exception):
    """A Graph error answer, raised from wherever request handling gives up."""

    def __init__(
        self, status: int, code: str, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class InviteEndpoint:
    """The invite endpoint: checks the token and the request, applies faults, records invites."""

    def __init__(self, lock: threading.Lock, tokens: TokenEndpoint, faults: FaultTable) -> None:
        self._lock = lock
        self._tokens = tokens
        self._faults = faults
        self.invites: list[RecordedInvite] = []

    async def invite(
        self, request: Request, call_id: str, base_url: str, graph_base_url: str, latency: float
    ) -> Response | ConnectionAction:
        arrived_monotonic, arrived_at = time.monotonic(), time.time()
        body = _json_object(request.body)
        tenant, token_problem = self._tokens.token_tenant(request)
        rule: FaultRule | None = None
        outcome: Response | ConnectionAction
        acted = False
        try:
            if token_problem is not None:
                raise _GraphError(401, "InvalidAuthenticationToken", token_problem)
            rule = self._faults.take_fault(call_id, tenant)
            if rule is not None and rule.act:
                # Carried out first; the error answer follows (a gateway timing out).
                _invite_outcome(request, call_id, body, None, graph_base_url)
                acted = True
            outcome = _invite_outcome(request, call_id, body, rule, graph_base_url)
            acted = acted or (isinstance(outcome, Response) and outcome.status == 200)
        except _GraphError as rejection:
            outcome = _graph_error(request, rejection, base_url)
        status = outcome.value if isinstance(outcome, ConnectionAction) else outcome.status
        sent_id = request.headers.get("client-request-id")
        record = RecordedInvite(
            tenant, call_id, sent_id, body or {}, status, arrived_monotonic, arrived_at, acted
        )
        with self._lock:
            self.invites.append(record)
        if outcome is not ConnectionAction.HANG:
            delay = latency + (rule.delay if rule is not None else 0.0)
            if delay > 0:
                await asyncio.sleep(delay)
        return outcome


def _invite_outcome(
    request: Request,
    call_id: str,
    body: dict[str, Any] | None,
    rule: FaultRule | None,
    graph_base_url: str,
) -> Response | ConnectionAction:
    if rule is not None and (rule.hang or rule.reset):
        return ConnectionAction.HANG if rule.hang else ConnectionAction.RESET
    if rule is not None and rule.status is not None:
        phrase = HTTPStatus(rule.status).phrase.replace(" ", "")
        code = rule.code or _GRAPH_CODES.get(rule.status, phrase)
        retry = () if rule.retry_after is None else (("Retry-After", rule.retry_after),)
        message = rule.message or "Injected by the Graph simulator."
        raise _GraphError(rule.status, code, message, retry)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise _GraphError(415, "UnsupportedMediaType", "Content-Type must be application/json.")
    if body is None:
        raise _GraphError(400, "BadRequest", _BAD_JSON)
    participants = body.get("participants")
    if not (isinstance(participants, list) and participants) or not all(
        isinstance(participant, dict) for participant in participants
    ):
        message = "participants must be a non-empty list of invitationParticipantInfo."
        raise _GraphError(400, "BadRequest", message)
    context = body.get("clientContext")
    if context is not None and not (
        isinstance(context, str) and len(context) <= MAX_CLIENT_CONTEXT
    ):
        message = f"clientContext must be a string of at most {MAX_CLIENT_CONTEXT} characters."
        raise _GraphError(400, "BadRequest", message)
    operation_id = str(uuid.uuid4())
    call_url = f"{graph_base_url}/communications/calls/{quote(call_id, safe='')}"
    payload = {
        "@odata.type": "#microsoft.graph.inviteParticipantsOperation",
        "id": operation_id,
        "status": "Running",
        "clientContext": context,
        "resultInfo": None,
        "participants": participants,
    }
    location = ("Location", f"{call_url}/operations/{operation_id}")
    return _graph_response(request, 200, payload, [location])


def _require_method(request: Request, method: str) -> None:
    if request.method != method:
        raise _GraphError(405, "MethodNotAllowed", f"Use {method}.", [("Allow", method)])


def _graph_response(
    request: Request | None,
    status: int,
    payload: object,
    headers: Sequence[tuple[str, str]] = (),
    request_id: str | None = None,
) -> Response:
    response = _json_response(status, payload, headers)
    # Graph's exact media type; the project's clients compare it.
    response.headers[0] = ("Content-Type", "application/json")
    response.headers.append(("request-id", request_id or str(uuid.uuid4())))
    if request is not None and (sent_id := request.headers.get("client-request-id")):
        response.headers.append(("client-request-id", sent_id))
    return response


def _graph_error(request: Request | None, rejection: _GraphError, base_url: str) -> Response:
    request_id = str(uuid.uuid4())
    sent_id = request.headers.get("client-request-id") if request is not None else None
    inner = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "request-id": request_id,
        "client-request-id": sent_id or request_id,
    }
    headers = list(rejection.headers)
    if rejection.status == 401:
        authorize = f"{base_url}/common/oauth2/v2.0/authorize"
        headers.append(("WWW-Authenticate", f'Bearer realm="", authorization_uri="{authorize}"'))
    error = {"code": rejection.code, "message": rejection.message, "innerError": inner}
    return _graph_response(request, rejection.status, {"error": error}, headers, request_id)
