"""The Graph client: sends an `InviteRequest` over HTTPS with httpx.

`map_graph_errors` is the one place where httpx's exceptions become the core's; the aiohttp
transport under it raises httpx's, so both transports meet that one boundary.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from worker import __version__
from worker.core.errors import GraphNoAnswer, GraphUnreachable
from worker.core.invite import GraphAccepted, InviteRequest, interpret
from worker.graph.transport import AiohttpTransport
from worker.settings import Settings


def _nothing() -> None:
    return None


@contextlib.contextmanager
def map_graph_errors() -> Iterator[None]:
    """httpx's transport errors as the core's, most specific first, keeping the cause.

    Failures before the request could reach Graph are `GraphUnreachable`; failures after it was
    sent (Graph may have acted) are `GraphNoAnswer`.
    """
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise GraphUnreachable(f"{type(exc).__name__}: the request was not sent") from exc
    except (httpx.WriteError, httpx.WriteTimeout) as exc:
        # Graph cannot act on a request body it did not receive whole.
        raise GraphUnreachable(f"{type(exc).__name__}: the request was not sent") from exc
    except httpx.TransportError as exc:
        raise GraphNoAnswer(
            f"{type(exc).__name__}: the request was sent and no answer came back"
        ) from exc


class GraphClient:
    """Posts invites to `GRAPH_BASE_URL`; the transport is injectable for tests.

    Requests go straight to the transport: an invite needs none of `httpx.AsyncClient`'s
    redirect, cookie and auth machinery, and skipping it halves httpx's cost per request.
    """

    def __init__(
        self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        ca_file = settings.graph_ca_file
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        )
        slots = settings.graph_max_in_flight
        if transport is None:
            if settings.graph_http_transport == "aiohttp":
                transport = AiohttpTransport(
                    verify=verify,
                    max_connections=slots,
                    connect_timeout=settings.graph_connect_timeout,
                    read_timeout=settings.graph_read_timeout,
                )
            else:
                transport = httpx.AsyncHTTPTransport(
                    verify=verify,
                    limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
                    # Trust and proxies come from Settings, not from the environment.
                    trust_env=False,
                )
        self._transport = transport
        self._base_url = settings.graph_base_url
        self._timeout = httpx.Timeout(
            settings.graph_read_timeout,
            connect=settings.graph_connect_timeout,
            pool=settings.graph_connect_timeout,
        ).as_dict()
        self._user_agent = f"invite-worker/{__version__}"
        self._headers = {"content-type": "application/json", "user-agent": self._user_agent}

    async def invite(
        self, request: InviteRequest, token: str, on_sent: Callable[[], None] = _nothing
    ) -> GraphAccepted:
        async def trace(event: str, _info: dict[str, Any]) -> None:
            if event.endswith("send_request_body.complete"):
                on_sent()

        if isinstance(self._transport, AiohttpTransport):
            headers = {
                **self._headers,
                "authorization": f"Bearer {token}",
                "client-request-id": request.client_request_id,
            }
            with map_graph_errors():
                status, answered, body = await self._transport.post(
                    self._base_url + request.path, headers, request.body, trace
                )
            # No body after the status line: reported as `interpret` does for the other path.
            return interpret(status, answered, body or b"")
        outgoing = httpx.Request(
            "POST",
            self._base_url + request.path,
            headers={
                "authorization": f"Bearer {token}",
                "content-type": "application/json",
                "client-request-id": request.client_request_id,
                "user-agent": self._user_agent,
            },
            content=request.body,
            # The transport reports when the request body is written: the moment that counts
            # against Graph's rate limits.
            extensions={"trace": trace, "timeout": self._timeout},
        )
        with map_graph_errors():
            response = await self._transport.handle_async_request(outgoing)
        try:
            with map_graph_errors():
                body = await response.aread()
        except GraphNoAnswer:
            # The status line is Graph's answer; only the body was lost. A 2xx is reported as
            # accepted without the operation's id: calling it "no answer" would invite a
            # retry that rings the person twice. An error status keeps its meaning too.
            body = b""
        finally:
            await response.aclose()
        return interpret(response.status_code, response.headers, body)

    async def aclose(self) -> None:
        await self._transport.aclose()
