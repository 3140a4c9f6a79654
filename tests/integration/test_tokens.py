"""Tokens from Entra ID through the real MSAL, against the simulator's token endpoint."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.conftest import CLIENT_SECRET, make_settings
from tests.support.harness import TENANT_A, TENANT_B
from worker.core.errors import TokenUnavailable
from worker.devtools.simulator import SimulatorThread
from worker.graph.tokens import MsalTokenProvider, client_credential
from worker.observability.metrics import Metrics


def write_certificate(path: Path, password: bytes | None = None) -> Path:
    """A self-signed certificate and its private key in one PEM file, as Azure tools write."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "invite-worker-test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    path.write_bytes(key_pem + certificate.public_bytes(serialization.Encoding.PEM))
    return path


async def test_a_certificate_credential_gets_a_token(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    pem = write_certificate(tmp_path / "app.pem", password=b"pem-password")
    settings = make_settings(
        simulator,
        AZURE_CLIENT_SECRET=None,
        AZURE_CLIENT_CERTIFICATE_PATH=str(pem),
        AZURE_CLIENT_CERTIFICATE_PASSWORD="pem-password",
    )
    provider = MsalTokenProvider(settings)
    try:
        assert await provider.token(TENANT_A)
    finally:
        provider.close()
    [request] = simulator.token_requests
    assert (request.tenant_id, request.credential) == (TENANT_A, "certificate")


async def test_concurrent_callers_share_one_token_request_per_tenant(
    simulator: SimulatorThread,
) -> None:
    metrics = Metrics()
    provider = MsalTokenProvider(make_settings(simulator), metrics=metrics)
    try:
        tokens = await asyncio.gather(
            *(provider.token(tenant) for tenant in [TENANT_A] * 20 + [TENANT_B] * 20)
        )
    finally:
        provider.close()
    assert len(set(tokens[:20])) == 1
    assert len(set(tokens[20:])) == 1
    assert tokens[0] != tokens[20]
    assert sorted(r.tenant_id for r in simulator.token_requests) == [TENANT_A, TENANT_B]
    for tenant in (TENANT_A, TENANT_B):
        assert metrics.token_acquisitions.value("success", tenant) == 1


async def test_a_wrong_secret_is_token_unavailable_with_entras_error(
    simulator: SimulatorThread,
) -> None:
    provider = MsalTokenProvider(make_settings(simulator, AZURE_CLIENT_SECRET="wrong"))
    try:
        with pytest.raises(TokenUnavailable) as info:
            await provider.token(TENANT_A)
    finally:
        provider.close()
    assert info.value.error == "invalid_client"
    assert "wrong" not in str(info.value)
    assert CLIENT_SECRET not in str(info.value)


def test_a_certificate_file_without_a_key_is_refused(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    pem = tmp_path / "cert-only.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    settings = make_settings(
        simulator, AZURE_CLIENT_SECRET=None, AZURE_CLIENT_CERTIFICATE_PATH=str(pem)
    )
    with pytest.raises(ValueError, match="private key"):
        client_credential(settings)


def test_instance_discovery_is_on_only_for_microsofts_authority_hosts(
    simulator: SimulatorThread,
) -> None:
    assert not make_settings(simulator).authority_is_microsoft
    assert make_settings(
        simulator, AZURE_AUTHORITY_HOST="https://login.microsoftonline.us"
    ).authority_is_microsoft


async def test_a_refused_tenant_fails_at_once_for_a_while_and_others_are_unaffected(
    tmp_path: Path,
) -> None:
    with SimulatorThread(directory=tmp_path, revoked_tenants=[TENANT_B]) as simulator:
        provider = MsalTokenProvider(make_settings(simulator, TOKEN_FAILURE_BACKOFF=60))
        try:
            for _ in range(3):
                with pytest.raises(TokenUnavailable):
                    await provider.token(TENANT_B)
            assert await provider.token(TENANT_A)
        finally:
            provider.close()
        assert sorted(r.tenant_id for r in simulator.token_requests) == [TENANT_A, TENANT_B]
