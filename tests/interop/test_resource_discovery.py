"""Finding the issuer from the API (RFC 9728) with node oidc-provider as the authorization server.

The API is ours (JWTMiddleware on uvicorn, 127.0.0.1) and names oidc-provider in its metadata;
the client is given the API's URL, a client of oidc-provider and the issuers it trusts. Its
resource identifier is its loopback URL, while oidc-provider issues tokens for its configured
default resource: so the default (no ``resource`` sent) works, and ``send_resource_as`` shows
why it is opt-in (oidc-provider refuses a resource it does not know with ``invalid_target``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from m2m_client import (
    AsyncTokenClient,
    BearerAuth,
    TokenClient,
    adiscover_resource,
    discover_resource,
    protected_resource_metadata,
)
from m2m_client.asgi import JWTMiddleware
from m2m_client.errors import TokenEndpointError, UntrustedIssuer
from m2m_client.verify import AsyncTokenVerifier
from tests._asgi_server import serve
from tests.interop.conftest import DEFAULT_RESOURCE, IdP

pytestmark = pytest.mark.interop


class _LateApp:
    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@pytest.fixture
def api(idp: IdP) -> Iterator[str]:
    """Our API, naming oidc-provider as its authorization server; yields its identifier."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def data(request: Request) -> JSONResponse:
        return JSONResponse({"client": request.state.claims.client_id})

    late = _LateApp()
    with serve(late) as base:
        verifier = AsyncTokenVerifier(issuer=idp.issuer, audience=DEFAULT_RESOURCE)
        document = protected_resource_metadata(resource=base, verifier=verifier)
        late.app = JWTMiddleware(
            Starlette(routes=[Route("/data", data)]), verifier=verifier, metadata=document
        )
        yield base


@pytest.mark.parametrize("mode", ["sync", "asyncio", "trio"])
def test_the_client_finds_oidc_provider_from_the_api_and_calls_the_api(
    mode: str, idp: IdP, api: str
) -> None:
    client_id, secret = idp.basic_client

    def sync() -> httpx.Response:
        found = discover_resource(api)
        creds = found.credentials(
            trusted_issuers=[idp.issuer], client_id=client_id, client_secret=secret
        )
        with TokenClient(creds) as tokens, httpx.Client(auth=BearerAuth(tokens)) as http:
            return http.get(f"{api}/data")

    async def asynchronous() -> httpx.Response:
        found = await adiscover_resource(api)
        creds = found.credentials(
            trusted_issuers=[idp.issuer], client_id=client_id, client_secret=secret
        )
        async with (
            AsyncTokenClient(creds) as tokens,
            httpx.AsyncClient(auth=BearerAuth(tokens)) as http,
        ):
            return await http.get(f"{api}/data")

    response = sync() if mode == "sync" else anyio.run(asynchronous, backend=mode)
    assert response.status_code == 200, response.text
    assert response.json() == {"client": client_id}


def test_sending_the_resource_is_opt_in_because_servers_refuse_one_they_do_not_know(
    idp: IdP, api: str
) -> None:
    client_id, secret = idp.basic_client
    creds = discover_resource(api).credentials(
        trusted_issuers=[idp.issuer],
        send_resource_as="resource",
        client_id=client_id,
        client_secret=secret,
    )
    with TokenClient(creds) as tokens, pytest.raises(TokenEndpointError) as info:
        tokens.get_token()
    assert info.value.error == "invalid_target"


def test_oidc_provider_is_not_trusted_because_the_api_names_it(idp: IdP, api: str) -> None:
    # The issuer as published has no trailing slash: a list with one is not a match.
    with pytest.raises(UntrustedIssuer, match="trailing slash"):
        discover_resource(api).credentials(
            trusted_issuers=[f"{idp.issuer}/"], client_id="basic-client", client_secret="x"
        )
