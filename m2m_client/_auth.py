"""BearerAuth: attach client-credentials tokens to httpx requests, recover once from a 401."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterable
from dataclasses import dataclass
from typing import cast

import httpx

from ._client import AsyncTokenClient, TokenClient
from ._token import AccessToken
from .errors import ConfigurationError

__all__ = ["BearerAuth"]


@dataclass(frozen=True, slots=True)
class _NeedToken:
    """Flow step: the driver must get a token (from the cache, or fetched)."""


@dataclass(frozen=True, slots=True, repr=False)
class _Invalidate:
    """Flow step: the driver must drop ``token`` from the cache (if still cached)."""

    token: AccessToken


_Step = httpx.Request | _NeedToken | _Invalidate
_NEED_TOKEN = _NeedToken()


class BearerAuth(httpx.Auth):
    """An ``httpx.Auth`` sending ``Authorization: Bearer <token>`` from a token client.

    ::

        with TokenClient(creds) as tokens, httpx.Client(auth=BearerAuth(tokens)) as http:
            http.get("https://api.example.com/data")

    Use a :class:`TokenClient` with ``httpx.Client`` and an :class:`AsyncTokenClient` with
    ``httpx.AsyncClient``. When the API answers 401 the token is dropped (if still cached), a
    new one fetched and the request replayed once; a second 401 is returned as is.
    ``audience``/``scope`` override the credentials' defaults for this API.
    """

    # The body must be replayable after a 401 (a streamed body can be sent only once).
    requires_request_body = True

    def __init__(
        self,
        tokens: TokenClient | AsyncTokenClient,
        *,
        audience: str | None = None,
        scope: str | Iterable[str] | None = None,
    ) -> None:
        if not isinstance(tokens, TokenClient | AsyncTokenClient):
            raise ConfigurationError("BearerAuth needs a TokenClient or an AsyncTokenClient")
        self._tokens = tokens
        self._audience = audience
        self._scope = scope if scope is None or isinstance(scope, str) else tuple(scope)

    def __repr__(self) -> str:
        return f"BearerAuth({self._tokens!r}, audience={self._audience!r})"

    def bearer_flow(self, request: httpx.Request) -> Generator[_Step, object, None]:
        """The whole decision, written once; the sync and async drivers only get tokens."""
        token = yield _NEED_TOKEN
        assert isinstance(token, AccessToken)
        request.headers["Authorization"] = token.authorization
        response = yield request
        assert isinstance(response, httpx.Response)
        if response.status_code != 401:
            return
        # RFC 6750 §3.1: 401 means the token was rejected (revoked, rotated keys, clock skew);
        # drop exactly this token - a newer one fetched by another request stays cached.
        yield _Invalidate(token)
        token = yield _NEED_TOKEN
        assert isinstance(token, AccessToken)
        request.headers["Authorization"] = token.authorization
        yield request

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        tokens = self._tokens
        if not isinstance(tokens, TokenClient):
            raise ConfigurationError(
                "BearerAuth was given an AsyncTokenClient but is used with httpx.Client; "
                "use a TokenClient with httpx.Client"
            )
        request.read()
        flow = self.bearer_flow(request)
        step = next(flow)
        while True:
            sent: object
            if step is _NEED_TOKEN:
                sent = tokens.get_token(audience=self._audience, scope=self._scope)
            elif isinstance(step, _Invalidate):
                sent = tokens.invalidate(step.token, audience=self._audience, scope=self._scope)
            else:
                sent = yield cast(httpx.Request, step)
            try:
                step = flow.send(sent)
            except StopIteration:
                return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        tokens = self._tokens
        if not isinstance(tokens, AsyncTokenClient):
            raise ConfigurationError(
                "BearerAuth was given a TokenClient but is used with httpx.AsyncClient; "
                "use an AsyncTokenClient with httpx.AsyncClient"
            )
        await request.aread()
        flow = self.bearer_flow(request)
        step = next(flow)
        while True:
            sent: object
            if step is _NEED_TOKEN:
                sent = await tokens.get_token(audience=self._audience, scope=self._scope)
            elif isinstance(step, _Invalidate):
                sent = tokens.invalidate(step.token, audience=self._audience, scope=self._scope)
            else:
                sent = yield cast(httpx.Request, step)
            try:
                step = flow.send(sent)
            except StopIteration:
                return
