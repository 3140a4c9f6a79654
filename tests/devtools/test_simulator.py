"""The Graph simulator itself, driven by the real MSAL and httpx over TLS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msal
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from worker.cli import build_parser
from worker.devtools.certs import generate_tls_material, load_or_generate_tls_material
from worker.devtools.simulator import (
    GRAPH_SCOPE,
    FaultRule,
    Simulator,
    SimulatorThread,
)

CLIENT_ID = "0b8c3b1e-7f55-4d43-9a36-1c5b0b8f1e21"
SECRET = "simulator-test-secret"
TENANT = "11111111-1111-4111-8111-111111111111"
OTHER_TENANT = "22222222-2222-4222-8222-222222222222"
REVOKED_TENANT = "33333333-3333-4333-8333-333333333333"
PARTICIPANTS = [
    {
        "@odata.type": "#microsoft.graph.invitationParticipantInfo",
        "identity": {"@odata.type": "#microsoft.graph.identitySet", "user": {"id": "u-1"}},
    }
]


@pytest.fixture(autouse=True)
def _no_ca_bundle_override(monkeypatch: pytest.MonkeyPatch) -> None:
    # requests lets these variables override the `verify=` MSAL passes to its session.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest_asyncio.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Simulator]:
    async with Simulator(
        directory=tmp_path, client_secret=SECRET, revoked_tenants=[REVOKED_TENANT]
    ) as simulator:
        yield simulator


@pytest_asyncio.fixture
async def client(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(verify=_trust(sim.ca_file), timeout=5.0) as http:
        yield http


def _trust(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def _msal_app(
    sim: Simulator | SimulatorThread, credential: str | dict[str, str], tenant: str = TENANT
) -> Any:
    return msal.ConfidentialClientApplication(
        CLIENT_ID,
        client_credential=credential,
        authority=f"{sim.authority_host}/{tenant}",
        instance_discovery=False,
        verify=str(sim.ca_file),
    )


async def _acquire(
    sim: Simulator, credential: str | dict[str, str], tenant: str = TENANT
) -> dict[str, Any]:
    # MSAL blocks; run it off the loop that serves it.
    def acquire() -> dict[str, Any]:
        result: dict[str, Any] = _msal_app(sim, credential, tenant).acquire_token_for_client(
            scopes=[GRAPH_SCOPE]
        )
        return result

    return await asyncio.to_thread(acquire)


async def _token(sim: Simulator, tenant: str = TENANT) -> str:
    result = await _acquire(sim, SECRET, tenant)
    token: str = result["access_token"]
    return token


def _invite_url(sim: Simulator | SimulatorThread, call_id: str) -> str:
    return f"{sim.graph_base_url}/communications/calls/{call_id}/participants/invite"


async def _invite(
    client: httpx.AsyncClient,
    sim: Simulator,
    token: str,
    call_id: str = "call-1",
    **kwargs: Any,
) -> httpx.Response:
    kwargs.setdefault("json", {"participants": PARTICIPANTS})
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    return await client.post(_invite_url(sim, call_id), headers=headers, **kwargs)


def _assert_graph_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["request-id"]
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["innerError"]["request-id"] == response.headers["request-id"]
    assert error["innerError"]["date"]
    return error


async def _raw_exchange(sim: Simulator, data: bytes) -> bytes:
    """Send raw bytes over TLS and read until the simulator closes the connection."""
    host, port = sim.base_url.removeprefix("https://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=_trust(sim.ca_file), server_hostname=host
    )
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def _self_signed_certificate() -> dict[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "invite-worker test app")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "private_key": private_pem.decode(),
        "public_certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }


def _unsigned_assertion(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'PS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


# --- Entra ID: discovery and the client-credentials grant ---------------------------


@pytest.mark.asyncio
async def test_msal_secret_credential_gets_a_token_and_then_uses_its_cache(sim: Simulator) -> None:
    def acquire_twice() -> tuple[dict[str, Any], dict[str, Any]]:
        app = _msal_app(sim, SECRET)
        first = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])
        second = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])
        return first, second

    first, second = await asyncio.to_thread(acquire_twice)

    assert first["token_type"] == "Bearer"
    assert first["expires_in"] == 3600
    assert first["token_source"] == "identity_provider"
    assert second["token_source"] == "cache"
    assert second["access_token"] == first["access_token"]
    [request] = sim.token_requests
    assert (request.tenant_id, request.client_id, request.credential) == (
        TENANT,
        CLIENT_ID,
        "secret",
    )
    assert request.status == 200
    assert abs(request.requested_at - time.time()) < 10


@pytest.mark.asyncio
async def test_msal_certificate_credential_gets_a_token(sim: Simulator) -> None:
    result = await _acquire(sim, _self_signed_certificate())

    assert "access_token" in result, result
    [request] = sim.token_requests
    assert request.credential == "certificate"
    assert request.client_id == CLIENT_ID


@pytest.mark.asyncio
async def test_wrong_secret_gets_invalid_client_through_msal(sim: Simulator) -> None:
    result = await _acquire(sim, "not-the-secret")

    assert result["error"] == "invalid_client"
    assert result["error_description"].startswith("AADSTS7000215: Invalid client secret")
    assert result["error_codes"] == [7000215]
    assert {"timestamp", "trace_id", "correlation_id"} <= result.keys()
    assert [r.status for r in sim.token_requests] == [401]


@pytest.mark.asyncio
async def test_revoked_tenant_gets_unauthorized_client_other_tenants_do_not(
    sim: Simulator,
) -> None:
    revoked = await _acquire(sim, SECRET, REVOKED_TENANT)
    other = await _acquire(sim, SECRET, OTHER_TENANT)

    assert revoked["error"] == "unauthorized_client"
    assert revoked["error_codes"] == [7000229]
    assert "access_token" in other
    assert [(r.tenant_id, r.status) for r in sim.token_requests] == [
        (REVOKED_TENANT, 400),
        (OTHER_TENANT, 200),
    ]


@pytest.mark.asyncio
async def test_discovery_document_points_msal_at_this_simulator(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    response = await client.get(f"{sim.base_url}/{TENANT}/v2.0/.well-known/openid-configuration")

    config = response.json()
    root = f"{sim.base_url}/{TENANT}"
    assert config["issuer"] == f"{root}/v2.0"
    assert config["token_endpoint"] == f"{root}/oauth2/v2.0/token"
    assert config["authorization_endpoint"] == f"{root}/oauth2/v2.0/authorize"
    assert config["jwks_uri"].startswith(sim.base_url)
    assert "code" in config["response_types_supported"]


@pytest.mark.asyncio
async def test_token_endpoint_checks_scope_and_client_assertion_claims(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    endpoint = f"{sim.base_url}/{TENANT}/oauth2/v2.0/token"
    base = {"grant_type": "client_credentials", "client_id": CLIENT_ID}
    good_claims = {"aud": endpoint, "iss": CLIENT_ID, "sub": CLIENT_ID, "exp": time.time() + 600}

    def assertion(**claims: Any) -> dict[str, str]:
        return {
            **base,
            "scope": GRAPH_SCOPE,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": _unsigned_assertion({**good_claims, **claims}),
        }

    cases = [
        ({**base, "scope": "https://graph.microsoft.com/User.Read", "client_secret": SECRET}, 400),
        ({**base, "scope": "https://vault.azure.net/.default", "client_secret": SECRET}, 400),
        ({**base, "scope": GRAPH_SCOPE}, 401),
        (assertion(aud="https://login.microsoftonline.com/x/oauth2/v2.0/token"), 401),
        (assertion(iss="someone-else"), 401),
        (assertion(exp=time.time() - 3600), 401),
        ({**assertion(), "client_assertion": "not-a-jwt"}, 401),
        ({**base, "grant_type": "password", "scope": GRAPH_SCOPE}, 400),
        (assertion(), 200),
    ]
    for form, status in cases:
        response = await client.post(endpoint, data=form)
        assert response.status_code == status, (form, response.text)
        if status != 200:
            assert response.json()["error_codes"][0] > 0
    assert "access_token" in response.json()


# --- Graph: the invite endpoint --------------------------------------------------------


@pytest.mark.asyncio
async def test_invite_with_an_issued_token_answers_a_running_operation(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    token = await _token(sim)
    body = {"participants": PARTICIPANTS, "clientContext": "ctx-42"}

    response = await _invite(
        client, sim, token, "call-7", json=body, headers={"client-request-id": "crid-1"}
    )

    assert response.status_code == 200
    operation = response.json()
    assert operation == {
        "@odata.type": "#microsoft.graph.inviteParticipantsOperation",
        "id": operation["id"],
        "status": "Running",
        "clientContext": "ctx-42",
        "resultInfo": None,
        "participants": PARTICIPANTS,
    }
    assert response.headers["Location"] == (
        f"{sim.graph_base_url}/communications/calls/call-7/operations/{operation['id']}"
    )
    assert response.headers["request-id"]
    assert response.headers["client-request-id"] == "crid-1"
    assert response.headers["content-type"] == "application/json"
    [invite] = sim.invites
    assert (invite.tenant_id, invite.call_id, invite.client_request_id) == (
        TENANT,
        "call-7",
        "crid-1",
    )
    assert (invite.body, invite.status) == (body, 200)
    assert invite.arrived_monotonic <= time.monotonic()


@pytest.mark.asyncio
async def test_invite_without_client_context_answers_null_and_no_client_request_id(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    response = await _invite(client, sim, await _token(sim))

    assert response.json()["clientContext"] is None
    assert "client-request-id" not in response.headers
    assert sim.invites[0].client_request_id is None


@pytest.mark.asyncio
async def test_unknown_missing_and_expired_tokens_get_graph_shaped_401(
    tmp_path: Path, sim: Simulator, client: httpx.AsyncClient
) -> None:
    unknown = await _invite(client, sim, "made-up-token", headers={"client-request-id": "c-9"})
    missing = await client.post(_invite_url(sim, "call-1"), json={"participants": PARTICIPANTS})

    error = _assert_graph_error(unknown, 401, "InvalidAuthenticationToken")
    assert error["innerError"]["client-request-id"] == "c-9"
    _assert_graph_error(missing, 401, "InvalidAuthenticationToken")
    assert [(i.tenant_id, i.status) for i in sim.invites] == [("", 401), ("", 401)]

    # Same directory: the CA there is reused, so the client trusts this simulator too.
    async with Simulator(directory=tmp_path, token_lifetime=0) as short:
        expired = await _invite(client, short, await _token(short))
        _assert_graph_error(expired, 401, "InvalidAuthenticationToken")
        assert "expired" in expired.json()["error"]["message"]
        assert short.invites[0].tenant_id == TENANT


@pytest.mark.asyncio
async def test_invalid_invite_bodies_get_graph_shaped_400_and_415(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    token = await _token(sim)
    as_text: dict[str, Any] = {"content": b"{}", "headers": {"Content-Type": "text/plain"}}
    bad_json: dict[str, Any] = {"content": b"{no", "headers": {"Content-Type": "application/json"}}

    assert (await _invite(client, sim, token, **as_text)).status_code == 415
    _assert_graph_error(await _invite(client, sim, token, **bad_json), 400, "BadRequest")
    bodies: list[dict[str, Any]] = [
        {"participants": []},
        {"participants": "everyone"},
        {},
        {"participants": PARTICIPANTS, "clientContext": "x" * 257},
        {"participants": PARTICIPANTS, "clientContext": 7},
    ]
    for body in bodies:
        response = await _invite(client, sim, token, json=body)
        _assert_graph_error(response, 400, "BadRequest")
    ok = await _invite(
        client, sim, token, json={"participants": PARTICIPANTS, "clientContext": "x" * 256}
    )
    assert ok.status_code == 200
    assert [i.status for i in sim.invites] == [415, 400, 400, 400, 400, 400, 400, 200]


@pytest.mark.asyncio
async def test_unknown_route_and_wrong_method_get_graph_shaped_errors(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    _assert_graph_error(await client.get(f"{sim.graph_base_url}/me"), 404, "ResourceNotFound")
    wrong_method = await client.get(_invite_url(sim, "call-1"))
    _assert_graph_error(wrong_method, 405, "MethodNotAllowed")
    assert sim.invites == []


# --- Fault injection -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_429_rule_answers_retry_after_and_stops_after_remaining(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    token = await _token(sim)
    sim.set_faults([FaultRule(status=429, retry_after="2.128", remaining=2)])

    statuses = []
    for _ in range(3):
        response = await _invite(client, sim, token)
        statuses.append(response.status_code)
        if response.status_code == 429:
            _assert_graph_error(response, 429, "TooManyRequests")
            assert response.headers["Retry-After"] == "2.128"

    assert statuses == [429, 429, 200]
    assert [i.status for i in sim.invites] == [429, 429, 200]


@pytest.mark.asyncio
async def test_rules_match_on_call_and_tenant_and_the_first_match_wins(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    token_a, token_b = await _token(sim, TENANT), await _token(sim, OTHER_TENANT)
    sim.set_faults(
        [
            FaultRule(call_id="call-x", tenant_id=OTHER_TENANT, status=404, code="NotFound"),
            FaultRule(call_id="call-x", status=403, code="Forbidden", message="Missing role"),
        ]
    )

    forbidden = await _invite(client, sim, token_a, "call-x")
    not_found = await _invite(client, sim, token_b, "call-x")
    fine = await _invite(client, sim, token_b, "call-y")

    assert _assert_graph_error(forbidden, 403, "Forbidden")["message"] == "Missing role"
    _assert_graph_error(not_found, 404, "NotFound")
    assert fine.status_code == 200
    assert [(i.tenant_id, i.status) for i in sim.invites] == [
        (TENANT, 403),
        (OTHER_TENANT, 404),
        (OTHER_TENANT, 200),
    ]


@pytest.mark.asyncio
async def test_delay_rule_and_global_latency_delay_the_answer(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    token = await _token(sim)
    sim.set_faults([FaultRule(call_id="slow", delay=0.5)])
    sim.latency = 0.05

    started = time.monotonic()
    slow = await _invite(client, sim, token, "slow")
    slow_elapsed = time.monotonic() - started
    started = time.monotonic()
    other = await _invite(client, sim, token, "fast")
    other_elapsed = time.monotonic() - started

    assert (slow.status_code, other.status_code) == (200, 200)
    assert slow_elapsed >= 0.55
    # Only the latency, not the other call's rule, delays this one.
    assert 0.05 <= other_elapsed < 0.5


@pytest.mark.asyncio
async def test_hang_rule_makes_the_client_time_out(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    token = await _token(sim)
    sim.set_faults([FaultRule(call_id="stuck", hang=True)])

    with pytest.raises(httpx.ReadTimeout):
        await _invite(client, sim, token, "stuck", timeout=httpx.Timeout(5.0, read=0.3))

    assert [(i.call_id, i.status) for i in sim.invites] == [("stuck", "hang")]
    assert (await _invite(client, sim, token, "other")).status_code == 200


@pytest.mark.asyncio
async def test_a_hanging_connection_does_not_hold_up_stop(tmp_path: Path) -> None:
    simulator = Simulator(directory=tmp_path)
    await simulator.start()
    token = await _token(simulator)
    simulator.set_faults([FaultRule(hang=True)])
    async with httpx.AsyncClient(verify=_trust(simulator.ca_file)) as http:
        pending = asyncio.create_task(_invite(http, simulator, token))
        for _ in range(500):
            if simulator.invites:
                break
            await asyncio.sleep(0.01)

        started = time.monotonic()
        await simulator.stop()

        assert time.monotonic() - started < 1.0
        with pytest.raises(httpx.TransportError):
            await pending


@pytest.mark.asyncio
async def test_reset_rule_makes_httpx_raise_a_transport_error(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    token = await _token(sim)
    sim.set_faults([FaultRule(call_id="doomed", reset=True)])

    with pytest.raises(httpx.TransportError):
        await _invite(client, sim, token, "doomed")

    assert [(i.call_id, i.status) for i in sim.invites] == [("doomed", "reset")]
    assert (await _invite(client, sim, token, "other")).status_code == 200


def test_fault_rules_refuse_contradictions() -> None:
    with pytest.raises(ValueError, match="hang or reset"):
        FaultRule(hang=True, reset=True)
    with pytest.raises(ValueError, match="status"):
        FaultRule(status=200)
    with pytest.raises(ValueError, match="retry_after"):
        FaultRule(status=429, retry_after="1\r\nX-Injected: yes")


# --- HTTP/1.1 behaviour --------------------------------------------------------------


@pytest.mark.asyncio
async def test_keep_alive_serves_50_sequential_requests_on_one_connection(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    token = await _token(sim)
    before = sim.connections_accepted

    for _ in range(50):
        assert (await _invite(client, sim, token)).status_code == 200

    assert sim.connections_accepted - before == 1
    assert len(sim.invites) == 50


@pytest.mark.asyncio
async def test_connection_close_is_honoured(sim: Simulator) -> None:
    answer = await _raw_exchange(
        sim, b"GET /_simulator/latency HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" in head
    assert json.loads(body) == {"seconds": 0.0}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /x HTTP/1.1\r\nBad Header: x\r\n\r\n", b"400"),
        (b"GET /x HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", b"400"),
        (b"GET /x HTTP/2.0\r\nHost: x\r\n\r\n", b"505"),
        (b"GET /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
        (b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"411"),
        (b"POST /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", b"413"),
        (b"\xff\xfe /x HTTP/1.1\r\n\r\n", b"400"),
        (b"GET /x HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    ],
    ids=[
        "garbage",
        "space-in-field-name",
        "obsolete-line-folding",
        "http-2",
        "negative-length",
        "conflicting-lengths",
        "chunked",
        "body-too-large",
        "non-ascii-method",
        "head-too-large",
    ],
)
async def test_malformed_http_gets_an_error_and_the_server_keeps_serving(
    sim: Simulator, client: httpx.AsyncClient, request_bytes: bytes, status: bytes
) -> None:
    """aiohttp.web frames the requests: what it cannot serve gets a 4xx, never a crash."""
    answer = await _raw_exchange(sim, request_bytes)

    # `status` is what a strict server answers; aiohttp answers some of these differently
    # (an HTTP/2.0 request line is served as such), but always with a client error.
    assert re.match(rb"HTTP/\d\.\d 4\d\d ", answer), (status, answer[:80])
    assert (await client.get(f"{sim.base_url}/_simulator/invites")).status_code == 200


@pytest.mark.asyncio
async def test_a_body_over_one_mebibyte_gets_413_not_a_reset(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        _invite_url(sim, "call-1"),
        content=b"x" * (2 * 1024 * 1024),
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 413
    assert sim.invites == []


# --- Admin interface and ways to run it -----------------------------------------------


@pytest.mark.asyncio
async def test_admin_routes_record_and_control_the_simulator(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    admin = f"{sim.base_url}/_simulator"
    token = await _token(sim)
    rules = [{"call_id": "busy", "status": 503, "retry_after": 1, "remaining": 1}]

    assert (await client.put(f"{admin}/faults", json=rules)).json() == {"faults": 1}
    assert (await client.put(f"{admin}/latency", json={"seconds": 0.05})).status_code == 200
    busy = await _invite(client, sim, token, "busy")
    _assert_graph_error(busy, 503, "ServiceUnavailable")
    assert busy.headers["Retry-After"] == "1"
    assert (await client.get(f"{admin}/faults")).json()[0]["remaining"] == 0
    assert sim.latency == 0.05

    invites = (await client.get(f"{admin}/invites")).json()
    tokens = (await client.get(f"{admin}/tokens")).json()
    assert [(i["call_id"], i["status"], i["tenant_id"]) for i in invites] == [("busy", 503, TENANT)]
    assert invites[0]["body"] == {"participants": PARTICIPANTS}
    assert [(t["tenant_id"], t["credential"]) for t in tokens] == [(TENANT, "secret")]

    bad_field = await client.put(f"{admin}/faults", json=[{"status": 503, "colour": "red"}])
    bad_type = await client.put(f"{admin}/faults", json=[{"hang": "yes"}])
    bad_latency = await client.put(f"{admin}/latency", json={"seconds": -1})
    for response in (bad_field, bad_type, bad_latency):
        _assert_graph_error(response, 400, "BadRequest")

    assert (await client.post(f"{admin}/reset")).status_code == 200
    assert sim.invites == []
    assert sim.token_requests == []
    assert sim.latency == 0.0
    assert (await _invite(client, sim, token, "busy")).status_code == 200


def test_simulator_thread_serves_sync_msal_and_httpx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SimulatorThread(directory=tmp_path, client_secret=SECRET) as sim:
        result = _msal_app(sim, SECRET).acquire_token_for_client(scopes=[GRAPH_SCOPE])
        sim.set_faults([FaultRule(call_id="busy", status=429, retry_after="1")])
        sim.latency = 0.01
        with httpx.Client(verify=_trust(sim.ca_file)) as http:
            headers = {"Authorization": f"Bearer {result['access_token']}"}
            body = {"participants": PARTICIPANTS}
            busy = http.post(_invite_url(sim, "busy"), json=body, headers=headers)
            ok = http.post(_invite_url(sim, "call-1"), json=body, headers=headers)

        assert (busy.status_code, ok.status_code) == (429, 200)
        assert [i.status for i in sim.invites] == [429, 200]
        assert len(sim.token_requests) == 1
        assert sim.connections_accepted == 2
        assert sim.base_url == sim.authority_host
        sim.reset()
        assert sim.invites == []


def test_cli_prints_a_ready_line_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    defaults = build_parser().parse_args(["simulator"])
    assert (defaults.host, defaults.port, defaults.directory) == (
        "127.0.0.1",
        8443,
        Path(".simulator"),
    )
    script = (
        "import sys\nfrom worker.cli import main\nsys.exit(main(['simulator', *sys.argv[1:]]))\n"
    )
    args = ["--port", "0", "--directory", str(tmp_path), "--revoked-tenant", REVOKED_TENANT]
    with subprocess.Popen(  # noqa: S603 - a fixed command line
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
        text=True,
    ) as process:
        assert process.stdout is not None
        ready = json.loads(process.stdout.readline())
        assert ready["event"] == "simulator.ready"
        assert ready["graph_base_url"] == f"{ready['base_url']}/v1.0"
        assert ready["authority_host"] == ready["base_url"]
        ca_file = Path(ready["ca_file"])
        assert ca_file.is_absolute()
        with httpx.Client(verify=_trust(ca_file)) as http:
            assert http.get(f"{ready['base_url']}/_simulator/invites").json() == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert process.stdout.read() == ""


# --- TLS material ---------------------------------------------------------------------


@pytest.fixture
def material_dir(tmp_path: Path) -> Path:
    return tmp_path / "tls"


def test_server_certificate_covers_loopback_names_and_is_issued_by_the_ca(
    material_dir: Path,
) -> None:
    material = generate_tls_material(material_dir)

    ca = x509.load_pem_x509_certificate(material.ca_file.read_bytes())
    cert = x509.load_pem_x509_certificate(material.cert_file.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=30, hours=1)
    assert material.key_file.stat().st_mode & 0o077 == 0


def test_sound_material_is_reused_and_other_hostnames_get_a_new_set(material_dir: Path) -> None:
    first = generate_tls_material(material_dir)
    ca_pem = first.ca_file.read_bytes()

    assert load_or_generate_tls_material(material_dir) == first
    assert first.ca_file.read_bytes() == ca_pem
    load_or_generate_tls_material(material_dir, ("127.0.0.1", "sim.example"))
    assert first.ca_file.read_bytes() != ca_pem
