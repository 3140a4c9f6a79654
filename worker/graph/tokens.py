"""App-only tokens for Microsoft Graph from Entra ID, through MSAL.

MSAL is synchronous (it uses `requests`), so every call into it runs in a worker thread,
never on the event loop. One `ConfidentialClientApplication` per tenant is built on first
use and kept; a per-tenant lock lets one caller refresh a tenant's token while the others
wait for its result. Tokens are held here until shortly before MSAL itself would refresh
them, so that the usual request takes its token without leaving the event loop.

A 5xx from the token endpoint reaches us as MSAL's `MsalServiceError` ("HTTP Error: 503"),
without Entra's answer: the HTTP client keeps the last error answer of each tenant's token
endpoint, so that the `TokenUnavailable` raised for it carries Entra's error, description and
Retry-After. It is transient: the handler retries it within its budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import msal
from msal.exceptions import MsalServiceError

from worker.core.errors import TokenUnavailable
from worker.core.ports import TokenProvider
from worker.core.retry import parse_retry_after
from worker.observability.metrics import Metrics
from worker.settings import Settings

GRAPH_SCOPES = ["https://graph.microsoft.com/.default"]
# MSAL serves a cached token until five minutes before it expires; refreshing here at the
# same point means the token handed out is always one MSAL would still hand out.
_REFRESH_BEFORE_EXPIRY = 300.0
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at: float


@dataclass(frozen=True, slots=True)
class EntraFailure:
    """An error answer (5xx) of Entra ID's token endpoint, as far as it could be read."""

    status: int
    error: str
    description: str
    retry_after: float | None

    @classmethod
    def of(cls, response: httpx.Response) -> EntraFailure:
        try:
            document = json.loads(response.content)
        except (ValueError, RecursionError):
            document = None
        document = document if isinstance(document, dict) else {}
        error, description = document.get("error"), document.get("error_description")
        return cls(
            response.status_code,
            error if isinstance(error, str) and error else f"http_{response.status_code}",
            _short(description)
            if isinstance(description, str)
            else f"the token endpoint answered HTTP {response.status_code}",
            parse_retry_after(response.headers.get("retry-after")),
        )

    def as_error(self) -> TokenUnavailable:
        return TokenUnavailable(
            self.error, self.description, transient=True, retry_after=self.retry_after
        )


def client_credential(settings: Settings) -> str | dict[str, str]:
    """MSAL's `client_credential` from the Azure SDK's environment variables."""
    if settings.azure_client_certificate_path is not None:
        pem = settings.azure_client_certificate_path.read_text()
        blocks = {m.group(1): m.group(0) for m in _PEM_BLOCK.finditer(pem)}
        key = next((v for k, v in blocks.items() if k.endswith("PRIVATE KEY")), None)
        certificate = blocks.get("CERTIFICATE")
        if key is None or certificate is None:
            raise ValueError(
                "AZURE_CLIENT_CERTIFICATE_PATH must hold a PEM certificate and its private key"
            )
        # With the certificate given, MSAL computes its SHA-256 thumbprint itself.
        credential = {"private_key": key, "public_certificate": certificate}
        if settings.azure_client_certificate_password is not None:
            credential["passphrase"] = settings.azure_client_certificate_password.get_secret_value()
        return credential
    if settings.azure_client_secret is not None:
        return settings.azure_client_secret.get_secret_value()
    raise ValueError("set AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH")


class MsalHttpClient:
    """MSAL's HTTP seam, on httpx: trust and timeouts come from Settings alone.

    MSAL's default `requests` session lets REQUESTS_CA_BUNDLE from the environment override
    the CA it was given; this client trusts exactly the bundle the settings name.
    """

    def __init__(self, *, ca_file: str | None, timeout: float) -> None:
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_file) if ca_file else True
        )
        self._client = httpx.Client(verify=verify, timeout=timeout, trust_env=False)
        self._lock = threading.Lock()
        self._failures: dict[str, EntraFailure] = {}

    def last_failure(self, url_part: str) -> EntraFailure | None:
        """The last 5xx answer of an endpoint whose URL contains `url_part`, if any."""
        with self._lock:
            return next((f for url, f in self._failures.items() if url_part in url), None)

    def _noted(self, url: str, response: httpx.Response) -> httpx.Response:
        with self._lock:
            if response.status_code >= 500:
                self._failures[url] = EntraFailure.of(response)
            else:
                self._failures.pop(url, None)
        return response

    def post(
        self,
        url: str,
        params: dict[str, str] | None = None,
        data: dict[str, str] | str | None = None,
        headers: dict[str, str] | None = None,
        **_: Any,
    ) -> httpx.Response:
        if isinstance(data, str):
            response = self._client.post(url, params=params, content=data, headers=headers)
        else:
            response = self._client.post(url, params=params, data=data, headers=headers)
        return self._noted(url, response)

    def get(
        self,
        url: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        **_: Any,
    ) -> httpx.Response:
        return self._noted(url, self._client.get(url, params=params, headers=headers))

    def close(self) -> None:
        self._client.close()


@contextlib.contextmanager
def map_msal_errors(failure: Callable[[], EntraFailure | None] = lambda: None) -> Iterator[None]:
    """MSAL's and its HTTP client's exceptions as `TokenUnavailable`, keeping the cause.

    `failure` names the token endpoint's last error answer, for MSAL's `MsalServiceError`
    (a 5xx), which does not carry it.
    """
    try:
        yield
    except MsalServiceError as exc:  # a 5xx from the token endpoint (or MSAL's throttle)
        known = failure()
        if known is not None:
            raise known.as_error() from exc
        raise TokenUnavailable(
            "identity_provider_unavailable", _short(str(exc)), transient=True
        ) from exc
    except ValueError as exc:  # MSAL's word for a failed authority discovery
        raise TokenUnavailable("authority_discovery_failed", _short(str(exc))) from exc
    except httpx.HTTPError as exc:  # no answer, or a 5xx that MSAL raises for
        raise TokenUnavailable(
            "identity_provider_unreachable", type(exc).__name__, transient=True
        ) from exc


class MsalTokenProvider(TokenProvider):
    """Tokens for any number of tenants of one multi-tenant app registration."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._client_id = settings.azure_client_id
        self._credential = client_credential(settings)
        self._authority_host = settings.azure_authority_host
        self._instance_discovery = settings.authority_is_microsoft
        ca_file = settings.token_ca_file
        self._http = MsalHttpClient(
            ca_file=str(ca_file) if ca_file else None,
            timeout=settings.graph_connect_timeout + settings.graph_read_timeout,
        )
        self._clock = clock
        self._apps: dict[str, Any] = {}
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._refusals: dict[str, tuple[TokenUnavailable, float]] = {}
        self._refusal_backoff = settings.token_failure_backoff

    async def token(self, tenant_id: str) -> str:
        cached = self._tokens.get(tenant_id)
        if cached is not None and self._clock() < cached.refresh_at:
            return cached.value
        self._raise_recent_refusal(tenant_id)
        lock = self._locks.setdefault(tenant_id, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(tenant_id)
            if cached is not None and self._clock() < cached.refresh_at:
                return cached.value
            self._raise_recent_refusal(tenant_id)
            try:
                result = await asyncio.to_thread(self._acquire, tenant_id)
            except TokenUnavailable as refusal:
                self._metrics.token_acquisitions.inc("failure", tenant_id)
                if not refusal.transient:
                    # A refusal (consent revoked, bad credential) stands for a while: the
                    # tenant's other commands fail at once, without a thread each.
                    self._refusals[tenant_id] = (refusal, self._clock() + self._refusal_backoff)
                raise
            self._refusals.pop(tenant_id, None)
            self._metrics.token_acquisitions.inc("success", tenant_id)
            token = result["access_token"]
            expires_in = float(result.get("expires_in", 0))
            lifetime = max(expires_in - _REFRESH_BEFORE_EXPIRY, expires_in / 2)
            if "refresh_on" in result:
                lifetime = min(lifetime, float(result["refresh_on"]) - time.time())
            self._tokens[tenant_id] = _Token(token, self._clock() + max(lifetime, 0.0))
            return str(token)

    def _raise_recent_refusal(self, tenant_id: str) -> None:
        refusal = self._refusals.get(tenant_id)
        if refusal is not None:
            if self._clock() < refusal[1]:
                raise refusal[0]
            del self._refusals[tenant_id]

    async def invalidate(self, tenant_id: str) -> None:
        self._tokens.pop(tenant_id, None)
        app = self._apps.get(tenant_id)
        if app is not None:
            # MSAL would otherwise answer the next request from its own cache.
            await asyncio.to_thread(app.remove_tokens_for_client)

    def _acquire(self, tenant_id: str) -> dict[str, Any]:
        """Runs in a worker thread: MSAL blocks on network I/O."""
        with map_msal_errors(lambda: self._http.last_failure(f"/{tenant_id}/")):
            app = self._apps.get(tenant_id)
            if app is None:
                app = msal.ConfidentialClientApplication(
                    self._client_id,
                    client_credential=self._credential,
                    authority=f"{self._authority_host}/{tenant_id}",
                    instance_discovery=self._instance_discovery,
                    http_client=self._http,
                )
                self._apps[tenant_id] = app
            result: dict[str, Any] = app.acquire_token_for_client(scopes=GRAPH_SCOPES)
        if "access_token" not in result:
            raise TokenUnavailable(
                str(result.get("error", "unknown_error")),
                _short(str(result.get("error_description", ""))),
            )
        return result

    def close(self) -> None:
        self._http.close()


def _short(text: str, limit: int = 300) -> str:
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return first_line if len(first_line) <= limit else first_line[: limit - 1] + "…"
