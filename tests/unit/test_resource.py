"""RFC 9728 on the calling side: an API's issuer from its URL alone (m2m_client/_resource.py).

End to end on 127.0.0.1: a Starlette API protected by our own JWTMiddleware (uvicorn) serves
its metadata; LocalIssuer issues the tokens. Given only the API's URL, the client credentials
and the issuers it trusts, the client discovers the issuer, gets a token and calls the API.
The attacks (an API naming an issuer of its choosing, a document for another resource, path
insertion) are played against real servers that record every request they get, so "nothing
was sent there" is counted, not assumed. The sans-IO reading of documents is tested alone.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from m2m_client import (
    AsyncTokenClient,
    BearerAuth,
    ResourceMetadata,
    TokenClient,
    adiscover_resource,
    discover_resource,
    protected_resource_metadata,
)
from m2m_client._http import HttpAnswer
from m2m_client._resource import interpret_resource_metadata, resource_metadata_url
from m2m_client.asgi import JWTMiddleware
from m2m_client.errors import (
    ConfigurationError,
    DiscoveryError,
    ResourceMetadataError,
    UntrustedIssuer,
)
from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier
from m2m_client.verify._metadata import metadata_url
from tests._asgi_server import serve
from tests.faults._faults import Fault, FaultServer

WORKER, SECRET = "prm-worker", "prm-worker-secret-5d1"
WELL_KNOWN = "/.well-known/oauth-protected-resource"
MODES = ["sync", "asyncio", "trio"]


def discover(mode: str, resource: str, **options: Any) -> ResourceMetadata:
    """discover_resource, or adiscover_resource on the asyncio or trio backend."""
    if mode == "sync":
        return discover_resource(resource, **options)
    return anyio.run(functools.partial(adiscover_resource, resource, **options), backend=mode)


# --- a real protected API ----------------------------------------------------------------------


class _LateApp:
    """The API app, set once uvicorn has its port (the resource identifier names the port)."""

    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def protected_api(
    issuer_url: str, resource: str, authorization_servers: list[str] | None = None
) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def data(request: Request) -> JSONResponse:
        claims = request.state.claims
        return JSONResponse({"client": claims.client_id, "aud": claims.get("aud")})

    verifier = AsyncTokenVerifier(issuer=issuer_url, audience=resource)
    document = protected_resource_metadata(
        resource=resource, verifier=verifier, authorization_servers=authorization_servers
    )
    app = Starlette(routes=[Route("/data", data), Route("/v1/data", data)])
    return JWTMiddleware(app, verifier=verifier, metadata=document)


@pytest.fixture
def issuer(local_issuer: LocalIssuer) -> LocalIssuer:
    return local_issuer


@pytest.fixture
def attacker() -> Iterator[FaultServer]:
    """A would-be authorization server: records every request, answers none usefully."""
    with FaultServer() as server:
        yield server


OTHER_AUDIENCE = "https://other.example.com"


@contextmanager
def running_api(
    issuer: LocalIssuer, path: str = "", authorization_servers: list[str] | None = None
) -> Iterator[str]:
    """A protected API on uvicorn; yields its resource identifier (base URL + ``path``).

    The worker's first audience is another API's, so a token request that does not name this
    resource gets a token this API refuses: what ``send_resource_as`` changes is observable.
    """
    late = _LateApp()
    with serve(late) as base:
        resource = base + path
        late.app = protected_api(issuer.url, resource, authorization_servers)
        issuer.add_client(WORKER, SECRET, audiences=[OTHER_AUDIENCE, resource])
        yield resource


def call_api(mode: str, resource: str, trusted: list[str], **fields: Any) -> httpx.Response:
    """The whole user story: the API's URL, the client credentials, the trusted issuers."""

    def sync() -> httpx.Response:
        api = discover_resource(resource)
        creds = api.credentials(
            trusted_issuers=trusted, client_id=WORKER, client_secret=SECRET, **fields
        )
        with TokenClient(creds) as tokens, httpx.Client(auth=BearerAuth(tokens)) as http:
            return http.get(f"{resource}/data")

    async def asynchronous() -> httpx.Response:
        api = await adiscover_resource(resource)
        creds = api.credentials(
            trusted_issuers=trusted, client_id=WORKER, client_secret=SECRET, **fields
        )
        async with (
            AsyncTokenClient(creds) as tokens,
            httpx.AsyncClient(auth=BearerAuth(tokens)) as http,
        ):
            return await http.get(f"{resource}/data")

    return sync() if mode == "sync" else anyio.run(asynchronous, backend=mode)


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_client_finds_the_issuer_from_the_api_url_gets_a_token_and_calls_the_api(
    mode: str, issuer: LocalIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with running_api(issuer) as resource:
        response = call_api(mode, resource, [issuer.url], send_resource_as="resource")
    assert response.status_code == 200, response.text
    assert response.json() == {"client": WORKER, "aud": resource}
    assert caplog.records  # the flow logged (discovery, token) ...
    assert all(SECRET not in record.getMessage() for record in caplog.records)  # ... no secret


@pytest.mark.parametrize("send_resource_as", ["resource", "audience"])
def test_the_resource_is_sent_only_when_asked_and_as_the_parameter_asked(
    send_resource_as: str, issuer: LocalIssuer
) -> None:
    with running_api(issuer) as resource:
        # Not asked: the server picks the client's default audience, which this API refuses.
        assert call_api("sync", resource, [issuer.url]).status_code == 401
        asked = call_api("sync", resource, [issuer.url], send_resource_as=send_resource_as)
    assert asked.status_code == 200, asked.text
    assert asked.json()["aud"] == resource


def test_credentials_name_the_trusted_issuer_and_the_resource_only_as_asked(
    issuer: LocalIssuer,
) -> None:
    with running_api(issuer) as resource:
        api = discover_resource(resource)
    plain = api.credentials(trusted_issuers=issuer.url, client_id=WORKER, client_secret=SECRET)
    assert (plain.issuer, plain.token_url, plain.resource, plain.audience) == (
        issuer.url,
        None,
        None,
        None,
    )
    as_audience = api.credentials(
        trusted_issuers=[issuer.url],
        send_resource_as="audience",
        client_id=WORKER,
        client_secret=SECRET,
    )
    assert (as_audience.audience, as_audience.resource) == (resource, None)
    assert SECRET not in repr(as_audience)
    assert SECRET not in repr(api)
    assert api.authorization_servers == (issuer.url,)
    assert api.bearer_methods_supported == ("header",)
    assert api.url == f"{resource}{WELL_KNOWN}"


@pytest.mark.parametrize("mode", MODES)
def test_an_api_naming_only_an_untrusted_issuer_gets_no_request_sent_there(
    mode: str, issuer: LocalIssuer, attacker: FaultServer
) -> None:
    rogue = f"{attacker.url}/"
    with running_api(issuer, authorization_servers=[rogue]) as resource:
        api = discover(mode, resource)
        with pytest.raises(UntrustedIssuer) as info:
            api.credentials(trusted_issuers=[issuer.url], client_id=WORKER, client_secret=SECRET)
    assert info.value.authorization_servers == (rogue,)
    assert isinstance(info.value, DiscoveryError)  # callers catching discovery failures see it
    assert "no credential was sent" in str(info.value)
    assert SECRET not in str(info.value)
    assert attacker.requests == []


def test_of_several_named_issuers_the_trusted_one_is_used_and_the_others_get_nothing(
    issuer: LocalIssuer, attacker: FaultServer
) -> None:
    rogue = f"{attacker.url}/"
    with running_api(issuer, authorization_servers=[rogue, issuer.url]) as resource:
        response = call_api("sync", resource, [issuer.url], send_resource_as="resource")
    assert response.status_code == 200, response.text
    assert attacker.requests == []


def test_a_trusted_issuer_whose_own_metadata_names_another_issuer_gets_no_credential(
    attacker: FaultServer,
) -> None:
    # The API names a server the caller trusts, but that server's metadata claims another
    # issuer (a mix-up): the token client's discovery refuses it before any token request.
    trusted = f"{attacker.url}/"
    attacker.faults["/.well-known/openid-configuration"] = Fault.json(
        {"issuer": "https://elsewhere.example.com/", "token_endpoint": f"{attacker.url}/token"}
    )
    attacker.faults[WELL_KNOWN + "/api"] = Fault.json(
        {"resource": f"{attacker.url}/api", "authorization_servers": [trusted]}
    )
    api = discover_resource(f"{attacker.url}/api")
    creds = api.credentials(trusted_issuers=[trusted], client_id=WORKER, client_secret=SECRET)
    with TokenClient(creds) as tokens, pytest.raises(DiscoveryError, match="elsewhere"):
        tokens.get_token()
    assert attacker.count("/token") == 0
    assert all(SECRET not in r.headers.get("authorization", "") for r in attacker.requests)


# --- path insertion (RFC 9728 §3.1) against real servers ------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_resource_with_a_path_is_read_from_the_inserted_well_known_path(
    mode: str, issuer: LocalIssuer
) -> None:
    with running_api(issuer, path="/v1") as resource:
        api = discover(mode, resource)
        assert api.resource == resource
        assert api.url == resource.replace("/v1", f"{WELL_KNOWN}/v1")
        # The host's root has no document for this resource: not found, not borrowed.
        root = resource.removesuffix("/v1")
        with pytest.raises(ResourceMetadataError, match="no protected resource metadata"):
            discover(mode, root)
        response = call_api(mode, resource, [issuer.url], send_resource_as="resource")
    assert response.status_code == 200, response.text


def test_two_resources_on_one_host_each_get_their_own_document(attacker: FaultServer) -> None:
    host = attacker.url
    attacker.faults[WELL_KNOWN] = Fault.json(
        {"resource": host, "authorization_servers": ["https://a.example.com/"]}
    )
    attacker.faults[f"{WELL_KNOWN}/tenant-b"] = Fault.json(
        {"resource": f"{host}/tenant-b", "authorization_servers": ["https://b.example.com/"]}
    )
    assert discover_resource(host).authorization_servers == ("https://a.example.com/",)
    assert discover_resource(f"{host}/tenant-b").authorization_servers == (
        "https://b.example.com/",
    )
    assert [r.path for r in attacker.requests] == [WELL_KNOWN, f"{WELL_KNOWN}/tenant-b"]


@pytest.mark.parametrize("mode", MODES)
def test_a_document_served_for_a_resource_but_describing_another_is_refused(
    mode: str, attacker: FaultServer
) -> None:
    # Tenant B's path serves tenant A's document (copied, or a proxy's mistake): it would
    # send B's client to A's issuer. RFC 9728 §3.3: not used.
    attacker.faults[f"{WELL_KNOWN}/tenant-b"] = Fault.json(
        {"resource": attacker.url, "authorization_servers": ["https://a.example.com/"]}
    )
    with pytest.raises(ResourceMetadataError, match=r"§3\.3"):
        discover(mode, f"{attacker.url}/tenant-b")


# --- the metadata URL (sans-IO) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "url"),
    [
        ("https://api.example.com", f"https://api.example.com{WELL_KNOWN}"),
        ("https://api.example.com/", f"https://api.example.com{WELL_KNOWN}"),
        ("https://api.example.com/v1", f"https://api.example.com{WELL_KNOWN}/v1"),
        ("https://api.example.com/v1/", f"https://api.example.com{WELL_KNOWN}/v1/"),
        ("https://api.example.com:8443/a/b", f"https://api.example.com:8443{WELL_KNOWN}/a/b"),
        ("https://api.example.com/v1?t=a", f"https://api.example.com{WELL_KNOWN}/v1?t=a"),
        ("http://127.0.0.1:8080/v1", f"http://127.0.0.1:8080{WELL_KNOWN}/v1"),
    ],
)
def test_the_well_known_path_goes_between_the_host_and_the_path(resource: str, url: str) -> None:
    assert resource_metadata_url(resource) == url


@given(
    path=st.lists(
        st.text(alphabet="abcxyz019-._~%", min_size=0, max_size=6), min_size=0, max_size=4
    ).map("/".join),
    slash=st.booleans(),
)
def test_our_servers_publish_the_metadata_where_our_client_reads_it(path: str, slash: bool) -> None:
    # Found by review: the servers stripped every trailing slash (``/v1/`` served at ``.../v1``)
    # while clients, ours and panva's, read ``.../v1/`` as §3.1 says. One rule now serves both.
    resource = "https://api.example.com" + ("/" + path if path else "") + ("/" if slash else "")
    assert metadata_url(resource) == resource_metadata_url(resource)


@pytest.mark.parametrize(
    "resource",
    [
        "",
        42,
        None,
        "api.example.com",
        "ftp://api.example.com",
        "http://api.example.com",  # plain http off loopback: anyone on the path could answer
        "https://user:pw@api.example.com",
        "https://api.example.com/#frag",
        "https://api.example.com/\x00",
        "https://api.example.com/ with space",
    ],
)
def test_a_bad_resource_identifier_is_a_configuration_error_before_any_request(
    resource: Any,
) -> None:
    with pytest.raises(ConfigurationError):
        discover_resource(resource)
    with pytest.raises(ConfigurationError):
        anyio.run(adiscover_resource, resource)


def test_a_bad_timeout_is_a_configuration_error() -> None:
    for timeout in (0, -1, 301, float("nan"), "10", True, None):
        with pytest.raises(ConfigurationError, match="timeout"):
            discover_resource("https://api.example.com", timeout=timeout)  # type: ignore[arg-type]


# --- reading a document (sans-IO) -----------------------------------------------------------------

RESOURCE = "https://api.example.com"
URL = f"{RESOURCE}{WELL_KNOWN}"
GOOD: dict[str, Any] = {
    "resource": RESOURCE,
    "authorization_servers": ["https://tenant.example.com/"],
    "scopes_supported": ["read:data"],
    "bearer_methods_supported": ["header"],
    "dpop_signing_alg_values_supported": ["ES256"],
    "dpop_bound_access_tokens_required": False,
    "resource_name": "Example API",
}


def read(body: bytes | dict[str, Any], status: int = 200, resource: str = RESOURCE) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = HttpAnswer(status, {}, raw, URL)
    return interpret_resource_metadata(answer, resource=resource, url=URL, now=0.0)


def test_a_good_document_is_read_into_typed_fields() -> None:
    api = read(GOOD)
    assert api == ResourceMetadata(
        resource=RESOURCE,
        authorization_servers=("https://tenant.example.com/",),
        scopes_supported=("read:data",),
        bearer_methods_supported=("header",),
        dpop_signing_alg_values_supported=("ES256",),
        dpop_bound_access_tokens_required=False,
        resource_name="Example API",
        url=URL,
        document={},
    )
    assert api.document["resource_name"] == "Example API"
    with pytest.raises(TypeError):
        api.document["resource"] = "https://evil.example.com"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"<html>hello</html>", "not a JSON object"),
        (b"", "not a JSON object"),
        (b"\xff\xfe\x00", "not a JSON object"),
        (b'["https://api.example.com"]', "not a JSON object"),
        (b'"https://api.example.com"', "not a JSON object"),
        (b"[" * 100_000, "not a JSON object"),
        (b'{"resource": "https://api.example.com", "x": NaN}', "not a JSON object"),
        (
            b'{"resource": "https://evil.example.com", "resource": "https://api.example.com"}',
            "duplicate",
        ),
        ({"authorization_servers": ["https://tenant.example.com/"]}, "has no resource"),
        ({"resource": None}, "resource is not a string"),
        ({"resource": ["https://api.example.com"]}, "resource is not a string"),
        ({"resource": RESOURCE, "authorization_servers": "https://t/"}, "not a list of strings"),
        ({"resource": RESOURCE, "authorization_servers": [{"issuer": "x"}]}, "not a list"),
        ({"resource": RESOURCE, "authorization_servers": ["https://t/", 1]}, "not a list"),
        ({"resource": RESOURCE, "scopes_supported": "read write"}, "not a list of strings"),
        ({"resource": RESOURCE, "dpop_bound_access_tokens_required": "true"}, "true or false"),
        ({"resource": RESOURCE, "dpop_bound_access_tokens_required": 1}, "true or false"),
        ({"resource": RESOURCE, "resource_name": 7}, "resource_name is not a string"),
    ],
)
def test_a_malformed_document_is_a_typed_error(body: Any, says: str) -> None:
    with pytest.raises(ResourceMetadataError, match=says):
        read(body)


@pytest.mark.parametrize(
    "found",
    [
        "https://evil.example.com",
        "https://api.example.com.evil.example.com",
        "https://api.example.com/other",
        "https://api.example.com/v1",
        "http://api.example.com",
        "HTTPS://API.EXAMPLE.COM",
        "https://api.example.com:443",
        "https://api.ex\u0430mple.com",  # a Cyrillic a: looks the same, is another host
        "https://api.example.com\u0000",
        "",
    ],
)
def test_a_document_for_another_resource_is_refused(found: str) -> None:
    with pytest.raises(ResourceMetadataError, match="not used") as info:
        read({**GOOD, "resource": found})
    assert "\u0430" not in str(info.value)  # look-alikes are shown escaped


def test_only_an_empty_and_a_slash_path_count_as_the_same_resource() -> None:
    assert read({**GOOD, "resource": RESOURCE + "/"}).resource == RESOURCE + "/"
    assert read(GOOD, resource=RESOURCE + "/").resource == RESOURCE
    for found, expected in [
        (RESOURCE + "/v1/", RESOURCE + "/v1"),
        (RESOURCE + "//", RESOURCE),
        (RESOURCE + "?x/", RESOURCE + "?x"),
    ]:
        with pytest.raises(ResourceMetadataError):
            read({**GOOD, "resource": found}, resource=expected)


@pytest.mark.parametrize("status", [404, 401, 403, 400, 204, 410])
def test_an_answer_other_than_200_is_no_document(status: int) -> None:
    with pytest.raises(ResourceMetadataError, match=f"HTTP {status}"):
        read(GOOD, status=status)


# --- choosing the issuer and building credentials (sans-IO) ------------------------------------


def metadata(**changes: Any) -> ResourceMetadata:
    return read({**GOOD, **changes})  # type: ignore[no-any-return]


def test_the_first_listed_issuer_the_caller_trusts_is_chosen() -> None:
    api = metadata(
        authorization_servers=["https://a.example.com/", "https://b.example.com/", "https://c/"]
    )
    assert api.trusted_issuer(["https://c/", "https://b.example.com/"]) == "https://b.example.com/"
    assert api.trusted_issuer("https://c/") == "https://c/"  # one string is one issuer


@pytest.mark.parametrize(
    ("trusted", "listed", "says"),
    [
        (["https://tenant.example.com"], ["https://tenant.example.com/"], "trailing slash"),
        (["https://tenant.example.com/"], ["https://tenant.ex\u0430mple.com/"], r"\\u0430"),
        (["https://tenant.example.com/"], ["https://tenant.example.com/other/"], "none of them"),
        (["https://tenant.example.com/"], ["http://tenant.example.com/"], "none of them"),
    ],
)
def test_an_issuer_not_trusted_exactly_is_refused(
    trusted: list[str], listed: list[str], says: str
) -> None:
    api = metadata(authorization_servers=listed)
    with pytest.raises(UntrustedIssuer, match=says):
        api.credentials(trusted_issuers=trusted, client_id=WORKER, client_secret=SECRET)


@pytest.mark.parametrize(
    "trusted",
    [[], (), "", ["http://tenant.example.com/"], ["not a url"], [None], None, 42, b"https://x/"],
)
def test_trusted_issuers_must_be_a_non_empty_list_of_acceptable_urls(trusted: Any) -> None:
    with pytest.raises(ConfigurationError):
        metadata().trusted_issuer(trusted)


def test_a_document_naming_no_issuer_gives_no_credentials() -> None:
    api = read({"resource": RESOURCE})
    with pytest.raises(ResourceMetadataError, match="names no authorization server"):
        api.credentials(trusted_issuers=["https://tenant.example.com/"], client_id="w")


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"issuer": "https://tenant.example.com/"}, "issuer comes from"),
        ({"token_url": "https://tenant.example.com/token"}, "token_url comes from"),
        ({"send_resource_as": "scope"}, "send_resource_as must be"),
        ({"send_resource_as": "audience", "audience": "https://x"}, "not both"),
        ({"send_resource_as": "resource", "resource": "https://x"}, "not both"),
    ],
)
def test_credentials_refuse_fields_that_would_bypass_the_trust_rule_or_clash(
    fields: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigurationError, match=says):
        metadata().credentials(
            trusted_issuers=["https://tenant.example.com/"],
            client_id=WORKER,
            client_secret=SECRET,
            **fields,
        )


def test_dpop_follows_the_resource_unless_the_caller_says_otherwise() -> None:
    trusted = ["https://tenant.example.com/"]
    required = metadata(dpop_bound_access_tokens_required=True)
    optional = metadata()
    kwargs = {"trusted_issuers": trusted, "client_id": WORKER, "client_secret": SECRET}
    assert required.credentials(**kwargs).dpop is True
    assert required.credentials(**kwargs, dpop=False).dpop is False
    assert optional.credentials(**kwargs).dpop is False
