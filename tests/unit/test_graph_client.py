"""What the Graph client makes of Graph's answers, through an injected httpx transport."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.support.harness import isolated_settings
from worker.core.errors import GraphNoAnswer, GraphRefused, GraphUnreachable
from worker.core.invite import InviteRequest
from worker.graph.client import GraphClient

REQUEST = InviteRequest("t1", "/communications/calls/c1/participants/invite", b"{}", "cmd-1")


def client(handler: Callable[[httpx.Request], httpx.Response]) -> GraphClient:
    return GraphClient(isolated_settings({}), transport=httpx.MockTransport(handler))


async def test_a_200_becomes_accepted_with_operation_location_and_request_id() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            headers={"location": "https://g/op/1", "request-id": "r-1"},
            json={"id": "op-1", "status": "Running"},
        )

    accepted = await client(answer).invite(REQUEST, "tok")
    assert (accepted.operation_id, accepted.operation_status) == ("op-1", "Running")
    assert (accepted.location, accepted.request_id) == ("https://g/op/1", "r-1")
    [request] = seen
    assert str(request.url) == (
        "https://graph.microsoft.com/v1.0/communications/calls/c1/participants/invite"
    )
    assert request.headers["authorization"] == "Bearer tok"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["client-request-id"] == "cmd-1"


async def test_an_error_status_becomes_refused_with_graphs_code_and_message() -> None:
    body = {"error": {"code": "Forbidden", "message": "no role", "innerError": {}}}
    graph = client(lambda _: httpx.Response(403, headers={"request-id": "r-2"}, json=body))
    with pytest.raises(GraphRefused) as info:
        await graph.invite(REQUEST, "tok")
    assert (info.value.status, info.value.code, info.value.message) == (403, "Forbidden", "no role")
    assert info.value.request_id == "r-2"


async def test_an_error_without_a_graph_body_is_still_refused_with_its_status() -> None:
    graph = client(lambda _: httpx.Response(502, content=b"<html>bad gateway</html>"))
    with pytest.raises(GraphRefused) as info:
        await graph.invite(REQUEST, "tok")
    assert info.value.status == 502
    assert info.value.code is None


async def test_a_connect_error_is_unreachable_and_a_read_timeout_is_no_answer() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def silent(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(GraphUnreachable):
        await client(refuse).invite(REQUEST, "tok")
    with pytest.raises(GraphNoAnswer):
        await client(silent).invite(REQUEST, "tok")


async def test_a_success_body_that_is_not_json_still_counts_as_accepted() -> None:
    graph = client(lambda _: httpx.Response(200, content=b"not json"))
    accepted = await graph.invite(REQUEST, "tok")
    assert (accepted.status, accepted.operation_id, accepted.operation_status) == (200, None, None)
