"""BearerAuth: attach client-credentials tokens to httpx (or httpx2) requests, recover once
from a 401."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ._client import AsyncTokenClient, TokenClient
from ._dpop import resource_nonce_challenge
from ._token import AccessToken
from .errors import ConfigurationError

__all__ = ["BearerAuth"]


ClientT = TypeVar("ClientT", TokenClient, AsyncTokenClient)


if TYPE_CHECKING:
    import httpx
    import httpx2

    from ._stacks import AuthBase as _Auth
else:
    from ._stacks import auth_base

    _Auth = auth_base()  # an Auth of every installed stack (httpx, httpx2)


class BearerAuth(_Auth):
    """An ``httpx.Auth`` sending ``Authorization: Bearer <token>`` from a token client
    (``Authorization: DPoP <token>`` and a ``DPoP`` proof when the credentials use DPoP).

    ::

        with TokenClient(creds) as tokens, httpx.Client(auth=BearerAuth(tokens)) as http:
            http.get("https://api.example.com/data")

    It is an ``httpx.Auth`` and an ``httpx2.Auth`` (of each installed stack): use a
    :class:`TokenClient` with an ``httpx.Client`` or ``httpx2.Client`` (Starlette's
    ``TestClient`` too: ``test_client.auth = BearerAuth(tokens)``), an
    :class:`AsyncTokenClient` with an ``AsyncClient`` of either.

    When the API answers 401 the token is dropped (if still cached), a
    new one fetched and the request replayed once; a second 401 is returned as is. A token
    is dropped at most once per key every few seconds: an API refusing every token gets its
    401s back without a token request per call.
    ``audience``/``scope`` override the credentials' defaults for this API.
    """

    # The body must be replayable after a 401 (a streamed body can be sent only once).
    requires_request_body = True

    def __init__(
        self,
        tokens: TokenClient | AsyncTokenClient,
        *,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | Iterable[str] | None = None,
    ) -> None:
        if not isinstance(tokens, TokenClient | AsyncTokenClient):
            raise ConfigurationError("BearerAuth needs a TokenClient or an AsyncTokenClient")
        self._tokens = tokens
        # The cache key is fixed for this auth: built once here, not on every request.
        self._key = tokens._core.key(audience, resource, scope)

    def __repr__(self) -> str:
        key = self._key
        return f"BearerAuth({self._tokens!r}, audience={key.audience!r}, resource={key.resource!r})"

    # Requests and responses are of the client's stack (httpx or httpx2), hence Any.
    def bearer_flow(
        self, request: Any, token: AccessToken, *, replay: bool = True
    ) -> Generator[Any, Any, bool]:
        """The whole decision, written once: send ``request`` with ``token``.

        Returns ``True`` when the API refused the token (401) and a replay is allowed; the
        sync and async drivers then invalidate it and, if a different token will be used,
        send the request once more (``replay=False``: a second 401 is returned as is).

        A DPoP-bound token (RFC 9449) goes with ``Authorization: DPoP`` and a fresh proof
        (``htm``, ``htu``, ``ath``, the origin's last ``DPoP-Nonce``). A 401 asking for a
        nonce (``WWW-Authenticate: DPoP error="use_dpop_nonce"``) is answered by sending
        the request once more with a new proof carrying it, before any token renewal.
        """
        request.headers["Authorization"] = token.authorization
        core = self._tokens._core
        key = core.dpop
        if key is None or token.token_type != "DPoP":
            response = yield request
            # RFC 6750 §3.1: 401 means the token was rejected (revoked, keys, clock skew).
            return response.status_code == 401 and replay
        url = str(request.url)
        nonces, method, access_token = core.nonces, request.method, token.access_token
        nonce = nonces.get(url) if len(nonces) else None  # most servers never send one
        request.headers["DPoP"] = key.proof(
            method, url, now=core.clock(), access_token=access_token, nonce=nonce
        )
        response = yield request
        if response.status_code == 401 or "dpop-nonce" in response.headers:
            nonce = response.headers.get("dpop-nonce")
            nonces.update(url, nonce)  # RFC 9449 §8.2: any answer may carry a new nonce
            challenge = resource_nonce_challenge(
                response.status_code, _all_values(response.headers, "www-authenticate"), nonce
            )
            if challenge is not None:
                request.headers["DPoP"] = key.proof(
                    method, url, now=core.clock(), access_token=access_token, nonce=challenge
                )
                response = yield request
                nonces.update(url, response.headers.get("dpop-nonce"))
        return response.status_code == 401 and replay

    def _client(self, kind: type[ClientT], http: str) -> ClientT:
        if not isinstance(self._tokens, kind):
            given = type(self._tokens).__name__
            raise ConfigurationError(
                f"BearerAuth was given {_a(given)} {given} but is used with {_a(http)} {http}; "
                f"use {_a(kind.__name__)} {kind.__name__} with {_a(http)} {http}"
            )
        return self._tokens

    def sync_auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        tokens, key = self._client(TokenClient, "Client"), self._key
        if not hasattr(request, "_content"):
            request.read()  # a body already in memory is replayable as it is
        token = tokens._fresh(key) or tokens._token(key)
        # Drop exactly this token (a newer one fetched meanwhile stays); at most one renewal
        # per key every few seconds, else the 401 is the caller's answer.
        if (yield from self.bearer_flow(request, token)) and tokens._invalidate(key, token):
            yield from self.bearer_flow(request, tokens._token(key), replay=False)

    async def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        tokens, key = self._client(AsyncTokenClient, "AsyncClient"), self._key
        if not hasattr(request, "_content"):
            await request.aread()
        for replay in (True, False):  # at most one replay, as in sync_auth_flow
            # The cached token without creating a coroutine: the common case stays cheap.
            token = tokens._fresh(key) or await tokens._token(key)
            flow = self.bearer_flow(request, token, replay=replay)
            outgoing = next(flow)
            while True:  # the flow may send twice (a DPoP nonce challenge)
                response = yield outgoing
                try:
                    outgoing = flow.send(response)
                except StopIteration as done:
                    refused = bool(done.value)
                    break
            if not refused or not await tokens._ainvalidate(key, token):
                return


def _all_values(headers: httpx.Headers | httpx2.Headers, name: str) -> list[str]:
    """Every value of a header sent more than once (a challenge may be in any of them)."""
    get_list = getattr(headers, "get_list", None)
    if get_list is not None:
        return list(get_list(name))
    value = headers.get(name)
    return [] if value is None else [value]


def _a(word: str) -> str:
    """The indefinite article for ``word`` (class names: "an AsyncClient", "a Client")."""
    return "an" if word[:1].lower() in "aeiou" else "a"
