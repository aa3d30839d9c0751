"""BearerAuth: attach client-credentials tokens to httpx (or httpx2) requests, recover once
from a 401."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterable
from typing import TYPE_CHECKING, TypeVar

from ._client import AsyncTokenClient, TokenClient
from ._token import AccessToken
from .errors import ConfigurationError

__all__ = ["BearerAuth"]


ClientT = TypeVar("ClientT", TokenClient, AsyncTokenClient)


if TYPE_CHECKING:
    import httpx

    from ._stacks import AuthBase as _Auth
else:
    from ._stacks import auth_base

    _Auth = auth_base()  # an Auth of every installed stack (httpx, httpx2)


class BearerAuth(_Auth):
    """An ``httpx.Auth`` sending ``Authorization: Bearer <token>`` from a token client.

    ::

        with TokenClient(creds) as tokens, httpx.Client(auth=BearerAuth(tokens)) as http:
            http.get("https://api.example.com/data")

    Use a :class:`TokenClient` with ``httpx.Client`` and an :class:`AsyncTokenClient` with
    ``httpx.AsyncClient``. When the API answers 401 the token is dropped (if still cached), a
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

    def bearer_flow(
        self, request: httpx.Request, token: AccessToken, *, replay: bool = True
    ) -> Generator[httpx.Request, httpx.Response, bool]:
        """The whole decision, written once: send ``request`` with ``token``.

        Returns ``True`` when the API refused the token (401) and a replay is allowed; the
        sync and async drivers then invalidate it and, if a different token will be used,
        send the request once more (``replay=False``: a second 401 is returned as is).
        Calls nothing else, so a proof-of-possession header can be added around it.
        """
        request.headers["Authorization"] = token.authorization
        response = yield request
        # RFC 6750 §3.1: 401 means the token was rejected (revoked, rotated keys, clock skew).
        return response.status_code == 401 and replay

    def _client(self, kind: type[ClientT], http: str) -> ClientT:
        if not isinstance(self._tokens, kind):
            raise ConfigurationError(
                f"BearerAuth was given {'a' if kind is AsyncTokenClient else 'an'} "
                f"{type(self._tokens).__name__} but is used with httpx.{http}; "
                f"use {'a' if kind is TokenClient else 'an'} {kind.__name__} with httpx.{http}"
            )
        return self._tokens

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        tokens, key = self._client(TokenClient, "Client"), self._key
        if not hasattr(request, "_content"):
            request.read()  # a body already in memory is replayable as it is
        token = tokens._fresh(key) or tokens._token(key)
        # Drop exactly this token (a newer one fetched meanwhile stays); at most one renewal
        # per key every few seconds, else the 401 is the caller's answer.
        if (yield from self.bearer_flow(request, token)) and tokens._invalidate(key, token):
            yield from self.bearer_flow(request, tokens._token(key), replay=False)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        tokens, key = self._client(AsyncTokenClient, "AsyncClient"), self._key
        if not hasattr(request, "_content"):
            await request.aread()
        for replay in (True, False):  # at most one replay, as in sync_auth_flow
            # The cached token without creating a coroutine: the common case stays cheap.
            token = tokens._fresh(key) or await tokens._token(key)
            flow = self.bearer_flow(request, token, replay=replay)
            response = yield next(flow)
            try:
                flow.send(response)
            except StopIteration as done:
                if not done.value or not await tokens._ainvalidate(key, token):
                    return
