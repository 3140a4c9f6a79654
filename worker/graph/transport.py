"""An httpx transport on aiohttp's connection pool, for Graph requests.

httpx stays the client interface (requests, responses, the transport seam that tests use),
while aiohttp carries the bytes. `post` is the same request without httpx's request and
response objects, which the Graph client uses on its hot path: building an `httpx.Request`
parses its URL character by character, and at saturation the worker spent 1.18 ms of CPU per
command with them against 1.04 ms without. aiohttp's pool costs the same per request however
many connections are open, where httpcore's grows with them (see the README's performance
section for the measurements).

Errors keep the distinction the retry policy depends on: anything before the request body
was written is `httpx.ConnectError`/`ConnectTimeout`/`WriteError` (Graph cannot have acted);
anything after is `httpx.ReadError`/`ReadTimeout` (it may have). The moment the body is
written is reported through the request's `trace` extension, as httpcore does
(`http11.send_request_body.complete`), for the rate limiter.

The body counts as written once aiohttp's write of it has returned (`_WrittenBody`), not
through aiohttp's request tracing, which costs more per request than the rest of this
transport. A write refused on a keep-alive connection the server had already closed ("Cannot
write to closing transport") raises before that; `never_written` also looks through an
error for that failure, which aiohttp raises before any byte of the body reaches the socket.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import httpx
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import BytesPayload

Trace = Callable[[str, dict[str, Any]], Awaitable[None]]
_SENT_EVENT = "http11.send_request_body.complete"
_SKIP_AUTO_HEADERS = ("accept-encoding", "user-agent", "content-type")


class _WrittenBody(BytesPayload):
    """A request body that records, and reports to the request's trace, once aiohttp has
    written it to the connection."""

    def __init__(self, value: bytes, state: dict[str, Any]) -> None:
        super().__init__(value)
        self._state = state

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        await super().write_with_length(writer, content_length)
        if not self._state["sent"]:
            self._state["sent"] = True
            trace: Trace | None = self._state["trace"]
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
        connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl, keepalive_timeout=30)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            # httpx's own redirect handling is off for these requests; aiohttp's too.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def _request(
        self,
        method: str,
        url: str,
        headers: Any,
        body: bytes,
        *,
        trace: Trace | None,
        request: httpx.Request | None = None,
    ) -> aiohttp.ClientResponse:
        """The response whose status line arrived; errors as httpx's, by whether it was sent."""
        if self._session is None:
            self._session = self._open()
        state = {"sent": False, "trace": trace}
        try:
            return await self._session.request(
                method,
                url,
                headers=headers,
                data=_WrittenBody(body, state),
                allow_redirects=False,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
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

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._request(
            request.method,
            str(request.url),
            list(request.headers.multi_items()),
            request.content,
            trace=request.extensions.get("trace"),
            request=request,
        )
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response),
            request=request,
        )

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, trace: Trace | None
    ) -> tuple[int, Mapping[str, str], bytes | None]:
        """POST without httpx's request and response objects: status, headers and body.

        The body is None when the status line came but the body did not (the connection
        broke, or the read timed out, after it); errors before that are raised as httpx's,
        exactly as `handle_async_request` raises them.
        """
        response = await self._request("POST", url, headers, body, trace=trace)
        try:
            answer: bytes | None = await response.read()
        except (TimeoutError, aiohttp.ClientError):
            answer = None
        finally:
            response.release()
        return response.status, response.headers, answer

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
