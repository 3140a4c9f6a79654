"""Graph simulator: a local HTTPS stand-in for Entra ID and the Graph call-invite endpoint.

Contact-center teams use it to try their integration without a Teams tenant, and the
project's tests, demo and benchmarks run the real MSAL and httpx against it. It serves:

* ``GET /{tenant}/v2.0/.well-known/openid-configuration`` - OIDC discovery, as MSAL
  fetches it for ``authority=f"{base_url}/{tenant}"`` with ``instance_discovery=False``;
* ``POST /{tenant}/oauth2/v2.0/token`` - the client-credentials grant, with a client
  secret or a certificate (a signed JWT assertion whose signature is not checked);
* ``POST /v1.0/communications/calls/{callId}/participants/invite`` - Graph's invite,
  which accepts only unexpired tokens this simulator issued, with scriptable faults.

Every invite and token request is recorded. The records and controls are also reachable
over HTTP under ``/_simulator/`` (``GET invites``, ``GET tokens``, ``GET``/``PUT faults``,
``POST reset``, ``GET``/``PUT latency``) for out-of-process users. Those admin routes
need no token: the simulator is a local tool that binds to loopback by default, so do
not expose it on a shared network.

TLS material (a private CA and a server certificate) lives in ``directory``; clients
trust ``ca_file``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import hmac
import json
import math
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any, Required, TypedDict, TypeGuard, Unpack
from urllib.parse import parse_qsl, quote, unquote

from worker.devtools.certs import DEFAULT_HOSTNAMES, prepare_server_tls
from worker.observability.http_server import (
    CLOSE_TIMEOUT_SECONDS,
    MAX_HEAD_BYTES,
    ConnectionAction,
    Request,
    Response,
    serve_connection,
)

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_CLIENT_CONTEXT = 256
CLOCK_SKEW_SECONDS = 300  # what Entra tolerates on client assertion times
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")  # noqa: S104 - recognised, not bound to
_GRAPH_CODES = {401: "InvalidAuthenticationToken", 429: "TooManyRequests", 500: "UnknownError"}
_NO_CACHE = (("Cache-Control", "no-store, no-cache"), ("Pragma", "no-cache"))
_BAD_JSON = (
    "Unable to read JSON request payload. Please ensure Content-Type header is set and "
    "payload is of valid JSON format."
)
# AADSTS code -> (HTTP status, OAuth error, description template), worded like Entra's.
_AADSTS: dict[int, tuple[int, str, str]] = {
    900561: (400, "invalid_request", "The endpoint only accepts POST requests."),
    900144: (
        400,
        "invalid_request",
        "The request body must contain the following parameter: '{name}'.",
    ),
    70003: (
        400,
        "unsupported_grant_type",
        "The app requested an unsupported grant type '{grant_type}'.",
    ),
    1002012: (
        400,
        "invalid_scope",
        "The provided value for scope {scope} is not valid. Client credential flows must have "
        "a scope value with /.default suffixed to the resource identifier (application ID URI).",
    ),
    500011: (
        400,
        "invalid_resource",
        "The resource principal named {resource} was not found in the tenant named {tenant}.",
    ),
    7000218: (
        401,
        "invalid_client",
        "The request body must contain the following parameter: 'client_assertion' or "
        "'client_secret'.",
    ),
    7000215: (
        401,
        "invalid_client",
        "Invalid client secret provided. Ensure the secret being sent in the request is the "
        "client secret value, not the client secret ID, for a secret added to app '{client_id}'.",
    ),
    90014: (400, "invalid_request", f"The field 'client_assertion_type' must be '{JWT_BEARER}'."),
    50027: (401, "invalid_client", "JWT token is invalid or malformed."),
    700021: (
        401,
        "invalid_client",
        "Client assertion application identifier doesn't match 'client_id' parameter.",
    ),
    700212: (401, "invalid_client", "The client assertion audience is not the token endpoint."),
    700024: (401, "invalid_client", "Client assertion is not within its valid time range."),
    90033: (503, "temporarily_unavailable", "A transient error has occurred. Please try again."),
    7000229: (
        400,
        "unauthorized_client",
        "The client application {client_id} is missing service principal in the tenant "
        "{tenant}. Admin consent was revoked.",
    ),
}

ReadyCallback = Callable[["Simulator"], None]


@dataclass(frozen=True)
class FaultRule:
    """One scripted misbehaviour of the invite endpoint; the first matching rule wins.

    A rule matches on ``call_id`` and ``tenant_id`` when given (the tenant is the one
    the bearer token was issued for), only on every ``every``-th such request when that is
    given, and only ``remaining`` more times when that is not None. ``hang`` reads the
    request and never answers; ``reset`` drops the connection with a TCP reset after
    ``delay``; otherwise ``status`` picks a Graph error (else the normal answer), sent after
    ``delay`` seconds plus the simulator's latency. With ``act`` the invite is carried out
    (recorded with ``acted``) before the error is answered: a gateway timing out while
    Graph did the work.
    """

    call_id: str | None = None
    tenant_id: str | None = None
    status: int | None = None
    code: str | None = None
    message: str | None = None
    retry_after: str | None = None
    delay: float = 0.0
    hang: bool = False
    reset: bool = False
    remaining: int | None = None
    every: int | None = None
    act: bool = False

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError("every must be None or a positive number of requests")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("a fault status must be an HTTP error status (400-599)")
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError("a fault delay must be a non-negative number of seconds")
        if self.remaining is not None and self.remaining < 0:
            raise ValueError("remaining must be None or non-negative")
        if self.hang and self.reset:
            raise ValueError("a fault can hang or reset, not both")
        # The value goes verbatim into a response header.
        if self.retry_after is not None and not (
            self.retry_after.isascii() and self.retry_after.isprintable()
        ):
            raise ValueError("retry_after must be printable ASCII")

    def applies_to(self, call_id: str, tenant_id: str) -> bool:
        return (self.call_id is None or self.call_id == call_id) and (
            self.tenant_id is None or self.tenant_id.lower() == tenant_id.lower()
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


@dataclass(frozen=True)
class RecordedTokenRequest:
    tenant_id: str
    client_id: str
    credential: str
    """"secret", "certificate", or "none"."""
    requested_at: float
    status: int = 200


class SimulatorOptions(TypedDict, total=False):
    directory: Required[Path]
    host: str
    port: int
    latency: float
    token_lifetime: int
    client_secret: str | None
    revoked_tenants: Collection[str]


@dataclass(slots=True)
class _ArmedFault:
    rule: FaultRule
    remaining: int | None
    seen: int = 0


class _GraphError(Exception):
    """A Graph error answer, raised from wherever request handling gives up."""

    def __init__(
        self, status: int, code: str, message: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class _EntraError(Exception):
    """An Entra token-endpoint error answer: an AADSTS code and its template's fields."""

    def __init__(self, aadsts: int, **details: str) -> None:
        super().__init__(aadsts)
        self.aadsts, self.details = aadsts, details


class Simulator:
    """The simulator on the running event loop. Records, faults and latency are thread-safe."""

    def __init__(
        self,
        *,
        directory: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        token_lifetime: int = 3600,
        client_secret: str | None = None,
        revoked_tenants: Collection[str] = (),
    ) -> None:
        self._directory = Path(directory).absolute()
        self._host, self._port = host, port
        self._initial_latency = latency
        self.latency = latency
        self._token_lifetime = token_lifetime
        self._client_secret = client_secret
        self._revoked = frozenset(tenant.lower() for tenant in revoked_tenants)
        self._lock = threading.Lock()
        self._invites: list[RecordedInvite] = []
        self._token_requests: list[RecordedTokenRequest] = []
        self._faults: list[_ArmedFault] = []
        self._token_outage: tuple[int, str | None] | None = None
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (tenant, monotonic expiry)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._connections_accepted = 0
        self._base_url: str | None = None
        self._ca_file: Path | None = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the simulator is already running")
        extra = () if self._host in (*DEFAULT_HOSTNAMES, *_WILDCARD_HOSTS) else (self._host,)
        material, context = await asyncio.to_thread(
            prepare_server_tls, self._directory, (*DEFAULT_HOSTNAMES, *extra)
        )
        self._server = await asyncio.start_server(
            self._on_connection,
            self._host,
            self._port,
            ssl=context,
            limit=MAX_HEAD_BYTES,
            backlog=1024,
            ssl_handshake_timeout=10.0,
            ssl_shutdown_timeout=CLOSE_TIMEOUT_SECONDS,
        )
        port = self._server.sockets[0].getsockname()[1]
        self._base_url = f"https://{_url_host(self._host)}:{port}"
        self._ca_file = material.ca_file

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("the simulator has not been started")
        return self._base_url

    @property
    def graph_base_url(self) -> str:
        return f"{self.base_url}/v1.0"

    @property
    def authority_host(self) -> str:
        return self.base_url

    @property
    def ca_file(self) -> Path:
        if self._ca_file is None:
            raise RuntimeError("the simulator has not been started")
        return self._ca_file

    @property
    def latency(self) -> float:
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError("latency must be a non-negative number of seconds")
        self._latency = float(seconds)

    @property
    def connections_accepted(self) -> int:
        """TLS connections accepted since start (not cleared by :meth:`reset`)."""
        return self._connections_accepted

    @property
    def invites(self) -> list[RecordedInvite]:
        with self._lock:
            return list(self._invites)

    @property
    def token_requests(self) -> list[RecordedTokenRequest]:
        with self._lock:
            return list(self._token_requests)

    @property
    def faults(self) -> list[tuple[FaultRule, int | None]]:
        """The armed rules, each with how many more times it applies (None: forever)."""
        with self._lock:
            return [(armed.rule, armed.remaining) for armed in self._faults]

    def set_faults(self, rules: Sequence[FaultRule]) -> None:
        armed = [_ArmedFault(rule, rule.remaining) for rule in rules]
        with self._lock:
            self._faults = armed

    def set_token_outage(self, status: int | None, retry_after: str | None = None) -> None:
        """The token endpoint answers every request with `status` (5xx; None: normally)."""
        if status is not None and not 500 <= status <= 599:
            raise ValueError("a token outage status must be a 5xx status")
        with self._lock:
            self._token_outage = None if status is None else (status, retry_after)

    def reset(self) -> None:
        """Forget records and faults and restore the configured latency.

        Issued tokens stay valid, as clients cache them.
        """
        with self._lock:
            self._invites.clear()
            self._token_requests.clear()
            self._faults = []
            self._token_outage = None
        self.latency = self._initial_latency

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if self._server is None or task is None:  # the handshake finished after stop()
            writer.transport.abort()
            return
        self._connections_accepted += 1
        self._connections.add(task)
        try:
            await serve_connection(reader, writer, self._dispatch, self._protocol_error)
        except asyncio.CancelledError:
            # Only stop() cancels these tasks, and it waits for them. Letting the
            # cancellation out would make asyncio's done-callback (3.11) log an error.
            pass
        finally:
            self._connections.discard(task)

    async def _dispatch(self, request: Request) -> Response | ConnectionAction:
        segments = [unquote(segment) for segment in request.path[1:].split("/")]
        try:
            match segments:
                case ["v1.0", "communications", "calls", call_id, "participants", "invite"] if (
                    call_id
                ):
                    _require_method(request, "POST")
                    return await self._invite(request, call_id)
                case ["_simulator", name]:
                    return self._admin(request, name)
                case [tenant, "v2.0", ".well-known", "openid-configuration"] if tenant:
                    _require_method(request, "GET")
                    return _json_response(200, _openid_configuration(self.base_url, tenant))
                case [tenant, "discovery", "v2.0", "keys"] if tenant:
                    return _json_response(200, {"keys": []})
                case [tenant, "oauth2", "v2.0", "token"] if tenant:
                    return self._token(request, tenant)
            raise _GraphError(404, "ResourceNotFound", f"No resource at {request.path}.")
        except _GraphError as rejection:
            return self._graph_error(request, rejection)

    def _token(self, request: Request, tenant: str) -> Response:
        form = request.body.decode("utf-8", "replace")
        params: dict[str, str] = {}
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("application/x-www-form-urlencoded"):
            for key, value in parse_qsl(form, keep_blank_values=True):
                params.setdefault(key, value)
        with self._lock:
            outage = self._token_outage
        try:
            if request.method != "POST":
                raise _EntraError(900561)
            if outage is not None:
                raise _EntraError(90033, status=str(outage[0]), retry_after=outage[1] or "")
            token = self._issue_token(tenant, params)
        except _EntraError as rejection:
            response = _entra_error(request, rejection)
        else:
            lifetime = self._token_lifetime
            answer = {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime}
            response = _json_response(200, {**answer, "access_token": token}, _NO_CACHE)
        kind = "secret" if "client_secret" in params else "none"
        kind = "certificate" if "client_assertion" in params else kind
        record = RecordedTokenRequest(
            tenant, params.get("client_id", ""), kind, time.time(), response.status
        )
        with self._lock:
            self._token_requests.append(record)
        return response

    def _issue_token(self, tenant: str, params: dict[str, str]) -> str:
        for name in ("grant_type", "client_id", "scope"):
            if not params.get(name):
                raise _EntraError(900144, name=name)
        if params["grant_type"] != "client_credentials":
            raise _EntraError(70003, grant_type=params["grant_type"])
        scope, client_id = params["scope"].strip(), params["client_id"]
        if not scope.endswith("/.default") or " " in scope:
            raise _EntraError(1002012, scope=scope)
        if scope != GRAPH_SCOPE:
            raise _EntraError(500011, resource=scope.removesuffix("/.default"), tenant=tenant)
        if "client_assertion" in params:
            self._check_assertion(tenant, client_id, params)
        elif "client_secret" not in params:
            raise _EntraError(7000218)
        elif self._client_secret is not None and not hmac.compare_digest(
            params["client_secret"].encode(), self._client_secret.encode()
        ):
            raise _EntraError(7000215, client_id=client_id)
        if tenant.lower() in self._revoked:
            raise _EntraError(7000229, client_id=client_id, tenant=tenant)
        token = secrets.token_urlsafe(32)
        self._tokens[token] = (tenant, time.monotonic() + self._token_lifetime)
        return token

    def _check_assertion(self, tenant: str, client_id: str, params: dict[str, str]) -> None:
        if params.get("client_assertion_type") != JWT_BEARER:
            raise _EntraError(90014)
        claims = _jwt_claims(params["client_assertion"])
        if claims is None:
            raise _EntraError(50027)
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise _EntraError(700021)
        # MSAL signs for the token endpoint it discovered; Entra also accepts the
        # v1 endpoint and the issuer.
        root = f"{self.base_url}/{quote(tenant, safe='')}"
        if claims.get("aud") not in (
            f"{root}/oauth2/v2.0/token",
            f"{root}/oauth2/token",
            f"{root}/v2.0",
        ):
            raise _EntraError(700212)
        now = time.time()
        exp, nbf = claims.get("exp"), claims.get("nbf", now)
        if not (_is_number(exp) and _is_number(nbf)):
            raise _EntraError(700024)
        if exp < now - CLOCK_SKEW_SECONDS or nbf > now + CLOCK_SKEW_SECONDS:
            raise _EntraError(700024)

    async def _invite(self, request: Request, call_id: str) -> Response | ConnectionAction:
        arrived_monotonic, arrived_at = time.monotonic(), time.time()
        body = _json_object(request.body)
        tenant, token_problem = self._token_tenant(request)
        rule: FaultRule | None = None
        outcome: Response | ConnectionAction
        acted = False
        try:
            if token_problem is not None:
                raise _GraphError(401, "InvalidAuthenticationToken", token_problem)
            rule = self._take_fault(call_id, tenant)
            if rule is not None and rule.act:
                # Carried out first; the error answer follows (a gateway timing out).
                self._invite_outcome(request, call_id, body, None)
                acted = True
            outcome = self._invite_outcome(request, call_id, body, rule)
            acted = acted or (isinstance(outcome, Response) and outcome.status == 200)
        except _GraphError as rejection:
            outcome = self._graph_error(request, rejection)
        status = outcome.value if isinstance(outcome, ConnectionAction) else outcome.status
        sent_id = request.headers.get("client-request-id")
        record = RecordedInvite(
            tenant, call_id, sent_id, body or {}, status, arrived_monotonic, arrived_at, acted
        )
        with self._lock:
            self._invites.append(record)
        if outcome is not ConnectionAction.HANG:
            delay = self.latency + (rule.delay if rule is not None else 0.0)
            if delay > 0:
                await asyncio.sleep(delay)
        return outcome

    def _token_tenant(self, request: Request) -> tuple[str, str | None]:
        """The tenant of the bearer token ("" if unknown) and what is wrong with it, if anything."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "", "Access token is empty."
        issued = self._tokens.get(token.strip())
        if issued is None:
            return "", "CompactToken parsing failed with error code: 80049217"
        tenant, expires = issued
        if time.monotonic() >= expires:
            return tenant, "Lifetime validation failed, the token is expired."
        return tenant, None

    def _take_fault(self, call_id: str, tenant: str) -> FaultRule | None:
        with self._lock:
            for armed in self._faults:
                if armed.remaining != 0 and armed.rule.applies_to(call_id, tenant):
                    armed.seen += 1
                    if armed.rule.every is not None and armed.seen % armed.rule.every:
                        continue
                    if armed.remaining is not None:
                        armed.remaining -= 1
                    return armed.rule
        return None

    def _invite_outcome(
        self, request: Request, call_id: str, body: dict[str, Any] | None, rule: FaultRule | None
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
        call_url = f"{self.graph_base_url}/communications/calls/{quote(call_id, safe='')}"
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

    def _admin(self, request: Request, name: str) -> Response:  # noqa: PLR0911 - a route table
        try:
            match request.method, name:
                case "GET", "invites":
                    return _json_response(200, [asdict(record) for record in self.invites])
                case "GET", "tokens":
                    return _json_response(200, [asdict(record) for record in self.token_requests])
                case "GET", "faults":
                    armed = [asdict(rule) | {"remaining": left} for rule, left in self.faults]
                    return _json_response(200, armed)
                case "PUT", "faults":
                    rules = _json_value(request.body)
                    if not isinstance(rules, list):
                        raise ValueError("the body must be a JSON list of fault rules")
                    self.set_faults([_rule_from_json(rule) for rule in rules])
                    return _json_response(200, {"faults": len(rules)})
                case "POST", "reset":
                    self.reset()
                    return _json_response(200, {"reset": True})
                case "PUT", "latency":
                    latency = _json_value(request.body)
                    if not (isinstance(latency, dict) and _is_number(latency.get("seconds"))):
                        raise ValueError('the body must be {"seconds": <number>}')
                    self.latency = latency["seconds"]
                    return _json_response(200, {"seconds": self.latency})
                case "GET", "latency":
                    return _json_response(200, {"seconds": self.latency})
        except (ValueError, TypeError) as exc:
            raise _GraphError(400, "BadRequest", str(exc)) from None
        raise _GraphError(404, "ResourceNotFound", f"No admin route {request.method} {name}.")

    def _protocol_error(self, status: int, message: str) -> Response:
        return self._graph_error(None, _GraphError(status, "BadRequest", message))

    def _graph_error(self, request: Request | None, rejection: _GraphError) -> Response:
        request_id = str(uuid.uuid4())
        sent_id = request.headers.get("client-request-id") if request is not None else None
        inner = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "request-id": request_id,
            "client-request-id": sent_id or request_id,
        }
        headers = list(rejection.headers)
        if rejection.status == 401:
            authorize = f"{self.base_url}/common/oauth2/v2.0/authorize"
            headers.append(
                ("WWW-Authenticate", f'Bearer realm="", authorization_uri="{authorize}"')
            )
        error = {"code": rejection.code, "message": rejection.message, "innerError": inner}
        return _graph_response(request, rejection.status, {"error": error}, headers, request_id)


class SimulatorThread:
    """A :class:`Simulator` on its own event loop in a daemon thread, for sync code and for
    tests whose event loops come and go. Use as a context manager, or start()/stop()."""

    def __init__(self, **options: Unpack[SimulatorOptions]) -> None:
        self.simulator = Simulator(**options)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: Exception | None = None

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            raise RuntimeError("the simulator thread was already started")
        self._thread = threading.Thread(target=self._run, name="graph-simulator", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the simulator did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error

    def stop(self, timeout: float = 30.0) -> None:
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None or loop is None or event is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(event.set)
        thread.join(timeout)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            await self.simulator.start()
        except Exception as exc:
            self._error = exc
            return
        finally:
            self._started.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.simulator.stop()

    @property
    def base_url(self) -> str:
        return self.simulator.base_url

    @property
    def graph_base_url(self) -> str:
        return self.simulator.graph_base_url

    @property
    def authority_host(self) -> str:
        return self.simulator.authority_host

    @property
    def ca_file(self) -> Path:
        return self.simulator.ca_file

    @property
    def invites(self) -> list[RecordedInvite]:
        return self.simulator.invites

    @property
    def token_requests(self) -> list[RecordedTokenRequest]:
        return self.simulator.token_requests

    @property
    def connections_accepted(self) -> int:
        return self.simulator.connections_accepted

    @property
    def latency(self) -> float:
        return self.simulator.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self.simulator.latency = seconds

    def set_faults(self, rules: Sequence[FaultRule]) -> None:
        self.simulator.set_faults(rules)

    def set_token_outage(self, status: int | None, retry_after: str | None = None) -> None:
        self.simulator.set_token_outage(status, retry_after)

    def reset(self) -> None:
        self.simulator.reset()


async def serve(
    *,
    ready: ReadyCallback | None = None,
    stop: asyncio.Event | None = None,
    **options: Unpack[SimulatorOptions],
) -> None:
    """Run a simulator until ``stop`` is set (or the task is cancelled), then stop it."""
    async with Simulator(**options) as simulator:
        if ready is not None:
            ready(simulator)
        await (stop or asyncio.Event()).wait()


async def run_forever(
    *, ready: ReadyCallback | None = None, **options: Unpack[SimulatorOptions]
) -> None:
    """:func:`serve` until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not available on Windows event loops or outside the main thread; Ctrl-C
        # then still ends the run through KeyboardInterrupt.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await serve(ready=ready, stop=stop, **options)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def run_from_args(args: argparse.Namespace) -> int:
    """Serve for the CLI: one JSON ready line on stdout, then run until SIGINT or SIGTERM."""

    def announce(simulator: Simulator) -> None:
        ready = {
            "event": "simulator.ready",
            "base_url": simulator.base_url,
            "graph_base_url": simulator.graph_base_url,
            "authority_host": simulator.authority_host,
            "ca_file": str(simulator.ca_file),
        }
        print(json.dumps(ready), flush=True)

    await run_forever(
        ready=announce,
        directory=Path(args.directory),
        host=str(args.host),
        port=int(args.port),
        latency=float(args.latency),
        token_lifetime=int(args.token_lifetime),
        client_secret=args.client_secret,
        revoked_tenants=tuple(args.revoked_tenant or ()),
    )
    return 0


def _url_host(host: str) -> str:
    if host in _WILDCARD_HOSTS:
        host = "::1" if ":" in host else "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _require_method(request: Request, method: str) -> None:
    if request.method != method:
        raise _GraphError(405, "MethodNotAllowed", f"Use {method}.", [("Allow", method)])


def _openid_configuration(base_url: str, tenant: str) -> dict[str, Any]:
    root = f"{base_url}/{quote(tenant, safe='')}"
    return {
        "token_endpoint": f"{root}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
        "jwks_uri": f"{root}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": f"{root}/v2.0",
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": f"{base_url}/oidc/userinfo",
        "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
        "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "tid", "oid"],
        "tenant_region_scope": "WW",
        "cloud_instance_name": "microsoftonline.com",
        "msgraph_host": "graph.microsoft.com",
    }


def _json_response(
    status: int, payload: object, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, body, [("Content-Type", "application/json; charset=utf-8"), *headers])


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


def _entra_error(request: Request, rejection: _EntraError) -> Response:
    status, error, template = _AADSTS[rejection.aadsts]
    status = int(rejection.details.get("status", status))
    retry_after = rejection.details.get("retry_after")
    headers = (*_NO_CACHE, *((("Retry-After", retry_after),) if retry_after else ()))
    trace_id = str(uuid.uuid4())
    correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
    timestamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    description = template.format(**rejection.details)
    payload = {
        "error": error,
        "error_description": f"AADSTS{rejection.aadsts}: {description} Trace ID: {trace_id} "
        f"Correlation ID: {correlation_id} Timestamp: {timestamp}",
        "error_codes": [rejection.aadsts],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
    }
    return _json_response(status, payload, headers)


def _json_value(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("the JSON body is nested too deeply") from None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = _json_value(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _jwt_claims(token: str) -> dict[str, Any] | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


_RULE_FIELD_TYPES: dict[str, Callable[[object], bool]] = {
    **dict.fromkeys(
        ("call_id", "tenant_id", "code", "message", "retry_after"),
        lambda v: v is None or isinstance(v, str),
    ),
    **dict.fromkeys(
        ("status", "remaining", "every"),
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    ),
    "delay": _is_number,
    **dict.fromkeys(("hang", "reset", "act"), lambda v: isinstance(v, bool)),
}


def _rule_from_json(value: object) -> FaultRule:
    if not isinstance(value, dict):
        raise ValueError("each fault rule must be a JSON object")
    unknown = set(value) - {field.name for field in fields(FaultRule)}
    if unknown:
        raise ValueError(f"unknown fault rule fields: {sorted(unknown)}")
    if _is_number(value.get("retry_after")):
        value = {**value, "retry_after": str(value["retry_after"])}
    for name, item in value.items():
        if not _RULE_FIELD_TYPES[name](item):
            raise ValueError(f"fault rule field {name!r} has the wrong type")
    return FaultRule(**value)
