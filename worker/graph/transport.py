"""An httpx transport on aiohttp's connection pool, for Graph requests.

httpx stays the client interface (requests, responses, the transport seam that tests use),
while aiohttp carries the bytes: its pool costs the same per request however many
connections are open, where httpcore's grows with them (see the README's performance
section for the measurements).

Errors keep the distinction the retry policy depends on: anything before the request body
was written is `httpx.ConnectError`/`ConnectTimeout`/`WriteError` (Graph cannot have acted);
anything after is `httpx.ReadError`/`ReadTimeout` (it may have). The moment the body is
written is reported through the request's `trace` extension, as httpcore does
(`http11.send_request_body.complete`), for the rate limiter.

aiohttp reports a chunk as sent just before it writes it, so "sent" alone would count a
request that failed on a keep-alive connection the server had already closed ("Cannot write
to closing transport") as one Graph may have acted on. `never_written` looks through the
error for that failure, which aiohttp raises before any byte of the chunk reaches the socket.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx

Trace = Callable[[str, dict[str, Any]], Awaitable[None]]
_SENT_EVENT = "http11.send_request_body.complete"


async def _on_chunk_sent(
    _session: aiohttp.ClientSession,
    context: SimpleNamespace,
    _params: aiohttp.TraceRequestChunkSentParams,
) -> None:
    state: dict[str, Any] | None = context.trace_request_ctx
    if state is not None and not state["sent"]:
        state["sent"] = True
        trace: Trace | None = state["trace"]
        if trace is not None:
            await trace(_SENT_EVENT, {})


_CLOSING_TRANSPORT = "Cannot write to closing transport"


def never_written(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the request was refused before it was written."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, aiohttp.ClientConnectionResetError) and _CLOSING_TRANSPORT in str(
            current
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests through one aiohttp session, created on first use."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._ssl: ssl.SSLContext | bool = verify
        self._limit = max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        tracing = aiohttp.TraceConfig()
        tracing.on_request_chunk_sent.append(_on_chunk_sent)
        connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl, keepalive_timeout=30)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            trace_configs=[tracing],
            auto_decompress=False,
            # httpx's own redirect handling is off for these requests; aiohttp's too.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = self._open()
        state = {"sent": False, "trace": request.extensions.get("trace")}
        body = request.content
        try:
            response = await self._session.request(
                request.method,
                str(request.url),
                headers=list(request.headers.multi_items()),
                data=body,
                allow_redirects=False,
                trace_request_ctx=state,
                skip_auto_headers=("accept-encoding", "user-agent", "content-type"),
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc), request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            message = f"{type(exc).__name__}: {exc}"
            if not state["sent"] or never_written(exc):
                raise httpx.WriteError(message, request=request) from exc
            if isinstance(exc, asyncio.TimeoutError):
                raise httpx.ReadTimeout(message, request=request) from exc
            raise httpx.ReadError(message, request=request) from exc
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response),
            request=request,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
