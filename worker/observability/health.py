"""The health endpoint: `/healthz`, `/readyz` and `/metrics`, served by aiohttp.web.

`/healthz` answers 200 while the process and its event loop run (an answer needs the loop).
`/readyz` answers 200 only while the worker is connected to the broker, consuming, not
draining, and the circuit to Graph is not open; 503 otherwise. `/metrics` is Prometheus'
text format, or OpenMetrics when the scraper's Accept header asks for it.

The port faces the pod network, so it is kept cheap whatever a client does: GET and HEAD
only (anything else 405), no request body is read (1 KiB at most is accepted), a small read
buffer per connection, short keep-alive and lingering times, and at most `max_connections`
open connections (more are closed as they arrive). aiohttp has no timeout for a client that
sends its headers slowly; the connection cap bounds what such clients can hold.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable

from aiohttp import web

from worker.observability.metrics import Metrics

#: Open connections at once: the kubelet and a scraper need a handful; 256 cost a few MiB.
MAX_CONNECTIONS = 256
_TEXT = "text/plain"


class _Refuse(asyncio.Protocol):
    """Closes a connection over the cap as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Capped:
    """aiohttp's protocol factory, refusing connections once `limit` are open."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self._server = server
        self._limit = limit

    def __call__(self) -> asyncio.Protocol:
        if len(self._server.connections) >= self._limit:
            return _Refuse()
        return self._server()


class HealthServer:
    def __init__(
        self,
        *,
        port: int,
        metrics: Metrics,
        ready: Callable[[], bool],
        host: str = "0.0.0.0",  # noqa: S104 - probed by the kubelet from outside the pod
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._ready = ready
        self._max_connections = max_connections
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._scrape)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=15,
            lingering_time=1.0,
            read_bufsize=4096,
            max_line_size=4096,
            max_field_size=4096,
            max_headers=32,
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None  # noqa: S101 - set by setup()
        self._server = await asyncio.get_running_loop().create_server(
            _Capped(server, self._max_connections), self._host, self._port, backlog=128
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n", content_type=_TEXT)

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n", content_type=_TEXT)
        return web.Response(status=503, text="not ready\n", content_type=_TEXT)

    async def _scrape(self, request: web.Request) -> web.Response:
        body, content_type = self._metrics.exposition(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})


def probe(port: int, path: str = "/healthz", timeout: float = 3.0) -> bool:
    """True when the local health endpoint answers 200 (for the container's HEALTHCHECK)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
