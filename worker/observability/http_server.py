"""Minimal HTTP/1.1 server plumbing, for the Graph simulator and the health endpoint.

Just enough HTTP/1.1 for the clients the project uses (httpx, requests under MSAL,
curl): one request at a time per connection, keep-alive, ``Content-Length`` bodies
only, and the abrupt connection endings that fault injection needs. It never
trusts its input: anything it cannot frame safely gets an error answer and the
connection is closed, because after a framing error the next request's start is
unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
# How long and how much to keep reading after refusing a body, so the client can
# finish sending and read the answer instead of getting a reset.
LINGER_SECONDS = 0.5
LINGER_BYTES = 16 * 1024 * 1024
CLOSE_TIMEOUT_SECONDS = 2.0

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_REASONS = {status.value: status.phrase for status in HTTPStatus}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    """Still percent-encoded, without the query."""
    query: str
    headers: dict[str, str]
    """Lower-case names; repeated fields are joined with ", " as RFC 9110 allows."""
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False


class ConnectionAction(enum.Enum):
    """What a handler can ask for instead of an answer."""

    HANG = "hang"
    """Send nothing; keep the connection until the client leaves or the server stops."""
    RESET = "reset"
    """Drop the connection with a TCP reset, without answering."""


Handler = Callable[[Request], Awaitable[Response | ConnectionAction]]
ErrorResponder = Callable[[int, str], Response]


class ProtocolError(Exception):
    def __init__(self, status: int, message: str, *, linger: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.linger = linger


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    error_response: ErrorResponder,
) -> None:
    """Answer requests on one connection until either side ends it."""
    abort = False
    try:
        while True:
            try:
                request = await read_request(reader, writer)
            except ProtocolError as exc:
                response = error_response(exc.status, exc.message)
                writer.write(encode_response(response, keep_alive=False))
                await writer.drain()
                if exc.linger:
                    await _discard_input(reader)
                return
            if request is None:
                return
            try:
                result = await handler(request)
            except Exception:
                logger.exception("HTTP handler failed for %s %s", request.method, request.path)
                result = error_response(500, "The server failed to handle the request.")
                result.close = True
            if result is ConnectionAction.RESET:
                _reset(writer)
                return
            if result is ConnectionAction.HANG:
                await _discard_input(reader, seconds=None, limit=None)
                return
            keep_alive = request.keep_alive and not result.close
            writer.write(
                encode_response(result, keep_alive=keep_alive, head=request.method == "HEAD")
            )
            await writer.drain()
            if not keep_alive:
                return
    except asyncio.CancelledError:
        abort = True
        raise
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        # The client went away mid-exchange; there is nobody left to answer.
        abort = True
    finally:
        await _close(writer, abort=abort)


async def read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Request | None:
    """Read one request; ``None`` when the client closed between requests."""
    head = b""
    while not head:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise ProtocolError(400, "The request head ended early.") from None
            return None
        except asyncio.LimitOverrunError:
            raise ProtocolError(431, "The request head is too large.", linger=True) from None
        # RFC 9112 lets a server skip empty lines sent before a request line.
        head = raw.lstrip(b"\r\n")

    lines = head[:-4].split(b"\r\n")
    method, target, version = _parse_request_line(lines[0])
    headers = _parse_headers(lines[1:])
    path, query = _parse_target(target)

    connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection

    if "transfer-encoding" in headers:
        raise ProtocolError(
            411, "Transfer-Encoding is not supported; send a Content-Length.", linger=True
        )
    length = _content_length(headers.get("content-length"))
    if length > MAX_BODY_BYTES:
        raise ProtocolError(413, f"The body exceeds {MAX_BODY_BYTES} bytes.", linger=True)
    body = b""
    if length:
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(length)
    return Request(method, path, query, headers, body, keep_alive)


def encode_response(response: Response, *, keep_alive: bool, head: bool = False) -> bytes:
    status = response.status
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Date: {_http_date()}",
        f"Content-Length: {len(response.body)}",
    ]
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    if not keep_alive:
        lines.append("Connection: close")
    lines.append("\r\n")
    # Header values come from parsed latin-1 requests or validated settings; "replace"
    # only guards against a future caller passing something else.
    encoded = "\r\n".join(lines).encode("latin-1", "replace")
    return encoded if head else encoded + response.body


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise ProtocolError(400, "The request line is malformed.")
    try:
        target, version = parts[1].decode("ascii"), parts[2].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(400, "The request line is not ASCII.") from None
    matched = _VERSION.fullmatch(version)
    if matched is None:
        raise ProtocolError(400, "The HTTP version is malformed.")
    if matched.group(1) != "1":
        raise ProtocolError(505, "Only HTTP/1.x is supported.")
    # Anything newer than 1.1 in the 1.x line is answered as 1.1 (RFC 9110, section 6.2).
    return parts[0].decode("ascii"), target, "HTTP/1.0" if version == "HTTP/1.0" else "HTTP/1.1"


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        # Bare CR or LF, obsolete line folding and whitespace before the colon are
        # classic request-smuggling material; refuse them rather than guess.
        if not colon or not _TOKEN.fullmatch(name) or b"\r" in line or b"\n" in line:
            raise ProtocolError(400, "A header field is malformed.")
        if b"\x00" in value:
            raise ProtocolError(400, "A header field value contains NUL.")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise ProtocolError(400, "Conflicting Content-Length fields.")
            if key != "content-length":
                headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text
    return headers


def _parse_target(target: str) -> tuple[str, str]:
    if target.startswith(("http://", "https://")):
        try:
            parts = urlsplit(target)
        except ValueError:
            raise ProtocolError(400, "The request target is not a valid URL.") from None
        return parts.path or "/", parts.query
    if not target.startswith("/"):
        raise ProtocolError(400, "The request target must be a path.")
    path, _, query = target.partition("?")
    return path, query.partition("#")[0]


def _content_length(value: str | None) -> int:
    if value is None:
        return 0
    # isdecimal() alone would accept non-ASCII digits; the length cap keeps int() cheap.
    if not value.isascii() or not value.isdecimal() or len(value) > 18:
        raise ProtocolError(400, "Content-Length is not a valid number.")
    return int(value)


async def _discard_input(
    reader: asyncio.StreamReader,
    *,
    seconds: float | None = LINGER_SECONDS,
    limit: int | None = LINGER_BYTES,
) -> None:
    async def drain() -> None:
        received = 0
        while chunk := await reader.read(65536):
            received += len(chunk)
            if limit is not None and received > limit:
                return

    with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
        await asyncio.wait_for(drain(), seconds)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # A zero linger time makes close() send RST instead of FIN.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _close(writer: asyncio.StreamWriter, *, abort: bool) -> None:
    if abort or writer.transport.is_closing():
        writer.transport.abort()
        return
    writer.close()
    try:
        # A TLS close waits for the peer's close_notify; a silent peer must not
        # keep the task (and the server's shutdown) waiting.
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_SECONDS)
    except (TimeoutError, OSError, ssl.SSLError):
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache  # noqa: PLW0603 - formatting the date once a second is worth a global
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]
