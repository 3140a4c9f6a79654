"""The ``Simulator``: one HTTPS server routing to the Entra, Graph and admin handlers, and the
``serve``, ``run_forever`` and ``run_from_args`` entry points."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Required, TypedDict, Unpack
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from worker.devtools.certs import DEFAULT_HOSTNAMES, prepare_server_tls
from worker.devtools.simulator.admin import _admin
from worker.devtools.simulator.common import _json_response
from worker.devtools.simulator.entra import (
    RecordedTokenRequest,
    TokenEndpoint,
    _openid_configuration,
)
from worker.devtools.simulator.faults import FaultRule, FaultTable
from worker.devtools.simulator.graph import (
    InviteEndpoint,
    RecordedInvite,
    _graph_error,
    _GraphError,
    _require_method,
)
from worker.devtools.simulator.http import ConnectionAction, Request, Response

#: Largest request body read; a bigger one is answered 413 by aiohttp.
MAX_BODY_BYTES = 1024 * 1024

_WILDCARD_HOSTS = ("", "0.0.0.0", "::")  # noqa: S104 - recognised, not bound to

ReadyCallback = Callable[["Simulator"], None]


class SimulatorOptions(TypedDict, total=False):
    directory: Required[Path]
    host: str
    port: int
    latency: float
    token_lifetime: int
    client_secret: str | None
    revoked_tenants: Collection[str]


class Simulator:
    """The simulator on the running event loop. Records, faults and latency are thread-safe.

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
        self._lock = threading.Lock()
        self._entra = TokenEndpoint(
            self._lock,
            token_lifetime=token_lifetime,
            client_secret=client_secret,
            revoked_tenants=revoked_tenants,
        )
        self._fault_table = FaultTable(self._lock)
        self._graph = InviteEndpoint(self._lock, self._entra, self._fault_table)
        self._listening: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        #: Set by stop(): hanging answers end, so that the server can close.
        self._stopping = asyncio.Event()
        self._connections_accepted = 0
        self._transports: weakref.WeakSet[asyncio.Transport] = weakref.WeakSet()
        self._base_url: str | None = None
        self._ca_file: Path | None = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._listening is not None:
            raise RuntimeError("the simulator is already running")
        extra = () if self._host in (*DEFAULT_HOSTNAMES, *_WILDCARD_HOSTS) else (self._host,)
        material, context = await asyncio.to_thread(
            prepare_server_tls, self._directory, (*DEFAULT_HOSTNAMES, *extra)
        )
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._stopping.clear()
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=75, shutdown_timeout=2
        )
        await self._runner.setup()
        # A socket of our own, so that the port is known when 0 asked for any free one.
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((self._host, self._port))
        site = web.SockSite(self._runner, listening, ssl_context=context, backlog=1024)
        await site.start()
        self._listening = listening
        port = listening.getsockname()[1]
        self._base_url = f"https://{_url_host(self._host)}:{port}"
        self._ca_file = material.ca_file

    async def stop(self) -> None:
        listening, self._listening = self._listening, None
        if listening is None:
            return
        self._stopping.set()
        # Ended at once rather than by TLS's close_notify exchange, which waits on the client.
        for transport in list(self._transports):
            transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
        """TLS connections that carried a request since start (not cleared by :meth:`reset`)."""
        return self._connections_accepted

    @property
    def invites(self) -> list[RecordedInvite]:
        with self._lock:
            return list(self._graph.invites)

    @property
    def token_requests(self) -> list[RecordedTokenRequest]:
        with self._lock:
            return list(self._entra.token_requests)

    @property
    def faults(self) -> list[tuple[FaultRule, int | None]]:
        """The armed rules, each with how many more times it applies (None: forever)."""
        return self._fault_table.faults

    def set_faults(self, rules: Sequence[FaultRule]) -> None:
        self._fault_table.set_faults(rules)

    def set_token_outage(self, status: int | None, retry_after: str | None = None) -> None:
        """The token endpoint answers every request with `status` (5xx; None: normally)."""
        if status is not None and not 500 <= status <= 599:
            raise ValueError("a token outage status must be a 5xx status")
        with self._lock:
            self._entra.outage = None if status is None else (status, retry_after)

    def reset(self) -> None:
        """Forget records and faults and restore the configured latency.

        Issued tokens stay valid, as clients cache them.
        """
        with self._lock:
            self._graph.invites.clear()
            self._entra.token_requests.clear()
            self._fault_table.armed = []
            self._entra.outage = None
        self.latency = self._initial_latency

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None and request.transport not in self._transports:
            self._transports.add(request.transport)
            self._connections_accepted += 1
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        ours = Request(
            method=request.method,
            path=request.raw_path.partition("?")[0],
            query=request.query_string,
            headers=headers,
            body=await request.read(),
            keep_alive=request.keep_alive,
        )
        outcome = await self._dispatch(ours)
        if outcome is ConnectionAction.HANG:
            await self._stopping.wait()
            if request.transport is not None:
                request.transport.abort()  # stopped: the connection ends unanswered
            raise web.HTTPServiceUnavailable
        if outcome is ConnectionAction.RESET:
            _reset(request)
            raise web.HTTPServiceUnavailable  # never written: the connection is gone
        response = web.Response(
            status=outcome.status, body=outcome.body, headers=CIMultiDict(outcome.headers)
        )
        if outcome.close:
            response.force_close()
        return response

    async def _dispatch(self, request: Request) -> Response | ConnectionAction:
        segments = [unquote(segment) for segment in request.path[1:].split("/")]
        try:
            match segments:
                case ["v1.0", "communications", "calls", call_id, "participants", "invite"] if (
                    call_id
                ):
                    _require_method(request, "POST")
                    return await self._graph.invite(
                        request, call_id, self.base_url, self.graph_base_url, self.latency
                    )
                case ["_simulator", name]:
                    return _admin(self, request, name)
                case [tenant, "v2.0", ".well-known", "openid-configuration"] if tenant:
                    _require_method(request, "GET")
                    return _json_response(200, _openid_configuration(self.base_url, tenant))
                case [tenant, "discovery", "v2.0", "keys"] if tenant:
                    return _json_response(200, {"keys": []})
                case [tenant, "oauth2", "v2.0", "token"] if tenant:
                    return self._entra.token(request, tenant, self.base_url)
            raise _GraphError(404, "ResourceNotFound", f"No resource at {request.path}.")
        except _GraphError as rejection:
            return _graph_error(request, rejection, self.base_url)


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


def _reset(request: web.Request) -> None:
    """A TCP reset instead of an answer: SO_LINGER 0, then abort the transport."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _url_host(host: str) -> str:
    if host in _WILDCARD_HOSTS:
        host = "::1" if ":" in host else "127.0.0.1"
    return f"[{host}]" if ":" in host else host
