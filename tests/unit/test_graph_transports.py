"""The Graph transports against a local server that misbehaves: what reached the wire decides.

Three paths, each through the real GraphClient, against an HTTPS asyncio server on 127.0.0.1
(the simulator's certificates) that refuses, resets, truncates or answers normally: the aiohttp
transport's own POST (the default, without httpx's request and response objects), httpx
requests on the aiohttp transport (`handle_async_request`, for any other caller of the httpx
seam), and httpx's own transport (GRAPH_HTTP_TRANSPORT=httpcore).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from tests.support.harness import isolated_settings
from worker.core.errors import GraphNoAnswer, GraphUnreachable
from worker.core.invite import InviteRequest
from worker.devtools.certs import prepare_server_tls
from worker.graph.client import GraphClient
from worker.graph.transport import AiohttpTransport, never_written

REQUEST = InviteRequest("t1", "/communications/calls/c1/participants/invite", b"{}", "cmd-1")
TRANSPORTS = ["aiohttp", "aiohttp-httpx", "httpcore"]
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _answer_200(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    body = b'{"id": "op-1", "status": "Running"}'
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    return head + await reader.readexactly(length)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    material, context = prepare_server_tls(tmp_path_factory.mktemp("tls"))
    return material.ca_file, context


@asynccontextmanager
async def server(behaviour: Behaviour, context: ssl.SSLContext) -> AsyncIterator[str]:
    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}/v1.0"
    finally:
        listener.close()


class _HttpxRequests(httpx.AsyncBaseTransport):
    """The aiohttp transport behind the httpx seam alone: the client sends httpx requests."""

    def __init__(self, inner: AiohttpTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def client(base_url: str, transport: str, ca_file: Path) -> GraphClient:
    settings = isolated_settings(
        {
            "SSL_CERT_FILE": str(ca_file),
            "GRAPH_BASE_URL": base_url,
            "GRAPH_HTTP_TRANSPORT": transport.removesuffix("-httpx"),
            "GRAPH_READ_TIMEOUT": 2,
            "GRAPH_CONNECT_TIMEOUT": 2,
        }
    )
    if transport == "aiohttp-httpx":
        inner = AiohttpTransport(
            verify=ssl.create_default_context(cafile=str(ca_file)),
            max_connections=4,
            connect_timeout=2,
            read_timeout=2,
        )
        return GraphClient(settings, transport=_HttpxRequests(inner))
    return GraphClient(settings)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_normal_answer_is_accepted_and_the_send_is_reported(
    transport: str, tls: tuple[Path, ssl.SSLContext]
) -> None:
    sent: list[bool] = []
    async with server(_answer_200, tls[1]) as url:
        graph = client(url, transport, tls[0])
        accepted = await graph.invite(REQUEST, "tok", lambda: sent.append(True))
        await graph.aclose()
    assert accepted.operation_id == "op-1"
    assert sent


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_refused_connection_is_unreachable(
    transport: str, tls: tuple[Path, ssl.SSLContext]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    graph = client(f"https://127.0.0.1:{port}/v1.0", transport, tls[0])
    with pytest.raises(GraphUnreachable):
        await graph.invite(REQUEST, "tok")
    await graph.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reset_after_the_request_was_read_is_no_answer(
    transport: str, tls: tuple[Path, ssl.SSLContext]
) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        _reset(writer)

    async with server(reset, tls[1]) as url:
        graph = client(url, transport, tls[0])
        with pytest.raises(GraphNoAnswer):
            await graph.invite(REQUEST, "tok")
        await graph.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_2xx_whose_body_is_cut_short_is_accepted_not_no_answer(
    transport: str, tls: tuple[Path, ssl.SSLContext]
) -> None:
    """The status line says Graph acted: reporting no answer would invite a second ring."""

    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b'request-id: r-9\r\ncontent-length: 500\r\n\r\n{"id": "op'
        )
        await writer.drain()
        _reset(writer)

    async with server(truncated, tls[1]) as url:
        graph = client(url, transport, tls[0])
        accepted = await graph.invite(REQUEST, "tok")
        await graph.aclose()
    assert (accepted.status, accepted.request_id, accepted.operation_id) == (200, "r-9", None)


def test_a_write_refused_on_a_closing_connection_counts_as_never_written() -> None:
    """aiohttp raises this before any byte of the chunk reaches the socket."""
    refused = aiohttp.ClientConnectionResetError("Cannot write to closing transport")
    wrapped = aiohttp.ClientOSError("write failed")
    wrapped.__cause__ = refused
    assert never_written(refused)
    assert never_written(wrapped)
    assert not never_written(aiohttp.ServerDisconnectedError())
    assert not never_written(aiohttp.ClientConnectionResetError("Connection reset by peer"))


@pytest.mark.parametrize(("transport", "built"), [("aiohttp", 0), ("aiohttp-httpx", 1)])
async def test_the_default_transport_sends_an_invite_without_building_httpx_objects(
    transport: str, built: int, tls: tuple[Path, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building an httpx request parses its URL character by character, on every invite."""
    requests: list[httpx.Request] = []
    build = httpx.Request.__init__

    def counted(request: httpx.Request, *args: Any, **kwargs: Any) -> None:
        requests.append(request)
        build(request, *args, **kwargs)

    monkeypatch.setattr(httpx.Request, "__init__", counted)
    async with server(_answer_200, tls[1]) as url:
        graph = client(url, transport, tls[0])
        accepted = await graph.invite(REQUEST, "tok")
        await graph.aclose()
    assert accepted.operation_id == "op-1"
    assert len(requests) == built
