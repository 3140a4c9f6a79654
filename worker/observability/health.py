"""The health endpoint: `/healthz`, `/readyz` and `/metrics` over plain HTTP.

`/healthz` answers 200 while the process and its event loop run (an answer needs the loop).
`/readyz` answers 200 only while the worker is connected to the broker, consuming, not
draining, and the circuit to Graph is not open; 503 otherwise. `/metrics` is Prometheus'
text format.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable

from worker.observability.http_server import Request, Response, serve_connection
from worker.observability.metrics import Metrics

_TEXT = ("content-type", "text/plain; charset=utf-8")
_PROMETHEUS = ("content-type", "text/plain; version=0.0.4; charset=utf-8")


class HealthServer:
    def __init__(
        self,
        *,
        port: int,
        metrics: Metrics,
        ready: Callable[[], bool],
        host: str = "0.0.0.0",  # noqa: S104 - probed by the kubelet from outside the pod
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._ready = ready
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            lambda r, w: serve_connection(r, w, self._handle, _error), self._host, self._port
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, request: Request) -> Response:
        if request.method not in {"GET", "HEAD"}:
            return Response(405, b"method not allowed\n", [_TEXT, ("allow", "GET, HEAD")])
        match request.path:
            case "/healthz":
                return Response(200, b"ok\n", [_TEXT])
            case "/readyz":
                if self._ready():
                    return Response(200, b"ready\n", [_TEXT])
                return Response(503, b"not ready\n", [_TEXT])
            case "/metrics":
                return Response(200, self._metrics.render().encode(), [_PROMETHEUS])
        return Response(404, b"not found\n", [_TEXT])


def _error(status: int, message: str) -> Response:
    return Response(status, f"{message}\n".encode(), [_TEXT], close=True)


def probe(port: int, path: str = "/healthz", timeout: float = 3.0) -> bool:
    """True when the local health endpoint answers 200 (for the container's HEALTHCHECK)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
