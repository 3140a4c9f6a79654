"""The simulator's view of an HTTP exchange, independent of the server that carries it.

Its endpoints take a `Request` and give a `Response` or a `ConnectionAction`; the server
(aiohttp.web, in `server.py`) translates to and from these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
    """What an endpoint can ask for instead of an answer."""

    HANG = "hang"
    """Send nothing; keep the connection until the client leaves or the server stops."""
    RESET = "reset"
    """Drop the connection with a TCP reset, without answering."""
