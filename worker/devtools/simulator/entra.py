"""Entra ID's side: OIDC discovery, the client-credentials token endpoint and its errors,
and the check of the bearer tokens it issued."""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

from worker.devtools.simulator.common import _is_number, _json_response
from worker.devtools.simulator.http import Request, Response

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLOCK_SKEW_SECONDS = 300  # what Entra tolerates on client assertion times
_NO_CACHE = (("Cache-Control", "no-store, no-cache"), ("Pragma", "no-cache"))
# AADSTS code -> (HTTP status, OAuth error, description template), worded like Entra's.
_AADSTS: dict[int, tuple[int, str, str]] = {
    900561: (400, "invalid_request", "The endpoint only accepts POST requests."),
    900144: (
        400,
        "invalid_request",
        "The request body must contain the following parameter: '{name}'.",
    ),
    70003: (
        400,
        "unsupported_grant_type",
        "The app requested an unsupported grant type '{grant_type}'.",
    ),
    1002012: (
        400,
        "invalid_scope",
        "The provided value for scope {scope} is not valid. Client credential flows must have "
        "a scope value with /.default suffixed to the resource identifier (application ID URI).",
    ),
    500011: (
        400,
        "invalid_resource",
        "The resource principal named {resource} was not found in the tenant named {tenant}.",
    ),
    7000218: (
        401,
        "invalid_client",
        "The request body must contain the following parameter: 'client_assertion' or "
        "'client_secret'.",
    ),
    7000215: (
        401,
        "invalid_client",
        "Invalid client secret provided. Ensure the secret being sent in the request is the "
        "client secret value, not the client secret ID, for a secret added to app '{client_id}'.",
    ),
    90014: (400, "invalid_request", f"The field 'client_assertion_type' must be '{JWT_BEARER}'."),
    50027: (401, "invalid_client", "JWT token is invalid or malformed."),
    700021: (
        401,
        "invalid_client",
        "Client assertion application identifier doesn't match 'client_id' parameter.",
    ),
    700212: (401, "invalid_client", "The client assertion audience is not the token endpoint."),
    700024: (401, "invalid_client", "Client assertion is not within its valid time range."),
    90033: (503, "temporarily_unavailable", "A transient error has occurred. Please try again."),
    7000229: (
        400,
        "unauthorized_client",
        "The client application {client_id} is missing service principal in the tenant "
        "{tenant}. Admin consent was revoked.",
    ),
}


@dataclass(frozen=True)
class RecordedTokenRequest:
    tenant_id: str
    client_id: str
    credential: str
    """"secret", "certificate", or "none"."""
    requested_at: float
    status: int = 200


class _EntraError(Exception):
    """An Entra token-endpoint error answer: an AADSTS code and its template's fields."""

    def __init__(self, aadsts: int, **details: str) -> None:
        super().__init__(aadsts)
        self.aadsts, self.details = aadsts, details


class TokenEndpoint:
    """The token endpoint's settings, the tokens it issued and the requests it recorded."""

    def __init__(
        self,
        lock: threading.Lock,
        *,
        token_lifetime: int,
        client_secret: str | None,
        revoked_tenants: Collection[str],
    ) -> None:
        self._lock = lock
        self._token_lifetime = token_lifetime
        self._client_secret = client_secret
        self._revoked = frozenset(tenant.lower() for tenant in revoked_tenants)
        self.token_requests: list[RecordedTokenRequest] = []
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (tenant, monotonic expiry)
        #: (status, Retry-After) answered to every token request during an outage.
        self.outage: tuple[int, str | None] | None = None

    def token(self, request: Request, tenant: str, base_url: str) -> Response:
        form = request.body.decode("utf-8", "replace")
        params: dict[str, str] = {}
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("application/x-www-form-urlencoded"):
            for key, value in parse_qsl(form, keep_blank_values=True):
                params.setdefault(key, value)
        with self._lock:
            outage = self.outage
        try:
            if request.method != "POST":
                raise _EntraError(900561)
            if outage is not None:
                raise _EntraError(90033, status=str(outage[0]), retry_after=outage[1] or "")
            token = self._issue_token(tenant, params, base_url)
        except _EntraError as rejection:
            response = _entra_error(request, rejection)
        else:
            lifetime = self._token_lifetime
            answer = {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime}
            response = _json_response(200, {**answer, "access_token": token}, _NO_CACHE)
        kind = "secret" if "client_secret" in params else "none"
        kind = "certificate" if "client_assertion" in params else kind
        record = RecordedTokenRequest(
            tenant, params.get("client_id", ""), kind, time.time(), response.status
        )
        with self._lock:
            self.token_requests.append(record)
        return response

    def _issue_token(self, tenant: str, params: dict[str, str], base_url: str) -> str:
        for name in ("grant_type", "client_id", "scope"):
            if not params.get(name):
                raise _EntraError(900144, name=name)
        if params["grant_type"] != "client_credentials":
            raise _EntraError(70003, grant_type=params["grant_type"])
        scope, client_id = params["scope"].strip(), params["client_id"]
        if not scope.endswith("/.default") or " " in scope:
            raise _EntraError(1002012, scope=scope)
        if scope != GRAPH_SCOPE:
            raise _EntraError(500011, resource=scope.removesuffix("/.default"), tenant=tenant)
        if "client_assertion" in params:
            self._check_assertion(tenant, client_id, params, base_url)
        elif "client_secret" not in params:
            raise _EntraError(7000218)
        elif self._client_secret is not None and not hmac.compare_digest(
            params["client_secret"].encode(), self._client_secret.encode()
        ):
            raise _EntraError(7000215, client_id=client_id)
        if tenant.lower() in self._revoked:
            raise _EntraError(7000229, client_id=client_id, tenant=tenant)
        token = secrets.token_urlsafe(32)
        self._tokens[token] = (tenant, time.monotonic() + self._token_lifetime)
        return token

    def _check_assertion(
        self, tenant: str, client_id: str, params: dict[str, str], base_url: str
    ) -> None:
        if params.get("client_assertion_type") != JWT_BEARER:
            raise _EntraError(90014)
        claims = _jwt_claims(params["client_assertion"])
        if claims is None:
            raise _EntraError(50027)
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise _EntraError(700021)
        # MSAL signs for the token endpoint it discovered; Entra also accepts the
        # v1 endpoint and the issuer.
        root = f"{base_url}/{quote(tenant, safe='')}"
        if claims.get("aud") not in (
            f"{root}/oauth2/v2.0/token",
            f"{root}/oauth2/token",
            f"{root}/v2.0",
        ):
            raise _EntraError(700212)
        now = time.time()
        exp, nbf = claims.get("exp"), claims.get("nbf", now)
        if not (_is_number(exp) and _is_number(nbf)):
            raise _EntraError(700024)
        if exp < now - CLOCK_SKEW_SECONDS or nbf > now + CLOCK_SKEW_SECONDS:
            raise _EntraError(700024)

    def token_tenant(self, request: Request) -> tuple[str, str | None]:
        """The tenant of the bearer token ("" if unknown) and what is wrong with it, if anything."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "", "Access token is empty."
        issued = self._tokens.get(token.strip())
        if issued is None:
            return "", "CompactToken parsing failed with error code: 80049217"
        tenant, expires = issued
        if time.monotonic() >= expires:
            return tenant, "Lifetime validation failed, the token is expired."
        return tenant, None


def _openid_configuration(base_url: str, tenant: str) -> dict[str, Any]:
    root = f"{base_url}/{quote(tenant, safe='')}"
    return {
        "token_endpoint": f"{root}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
        "jwks_uri": f"{root}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": f"{root}/v2.0",
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": f"{base_url}/oidc/userinfo",
        "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
        "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "tid", "oid"],
        "tenant_region_scope": "WW",
        "cloud_instance_name": "microsoftonline.com",
        "msgraph_host": "graph.microsoft.com",
    }


def _entra_error(request: Request, rejection: _EntraError) -> Response:
    status, error, template = _AADSTS[rejection.aadsts]
    status = int(rejection.details.get("status", status))
    retry_after = rejection.details.get("retry_after")
    headers = (*_NO_CACHE, *((("Retry-After", retry_after),) if retry_after else ()))
    trace_id = str(uuid.uuid4())
    correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
    timestamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    description = template.format(**rejection.details)
    payload = {
        "error": error,
        "error_description": f"AADSTS{rejection.aadsts}: {description} Trace ID: {trace_id} "
        f"Correlation ID: {correlation_id} Timestamp: {timestamp}",
        "error_codes": [rejection.aadsts],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
    }
    return _json_response(status, payload, headers)


def _jwt_claims(token: str) -> dict[str, Any] | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None
