"""BearerAuth: attach client-credentials tokens to httpx (or httpx2) requests, recover once
from a 401."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Generator, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ._client import AsyncTokenClient, TokenClient
from ._dpop import _origin, resource_nonce_challenge
from ._refusal import token_refused
from ._token import AccessToken
from .errors import ConfigurationError

__all__ = ["BearerAuth"]

logger = logging.getLogger("m2m_client")


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

    When the API refuses the token itself (a 401 whose ``Bearer``/``DPoP`` challenge names no
    error or ``error="invalid_token"``) the token is dropped (if still cached), a new one
    fetched and the request replayed once; a second 401 is returned as is. Requests refused
    with a token another request already dropped replay with its successor. A token is
    dropped at most once per key every few seconds: an API refusing every token gets its
    401s back without a token request per call. ``insufficient_scope``, other errors, 403s
    and answers from another origin (after a redirect) are returned as they are.

    With ``follow_redirects=True``, add :meth:`redirect_hop` (:meth:`aredirect_hop`) to the
    client's request ``event_hooks``: a fresh DPoP proof per hop, and nothing bound to the
    token sent to another origin.
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
        self._warned = False  # the redirect warning below, logged once
        # The cache key is fixed for this auth: built once here, not on every request.
        self._key = tokens.cache_key(audience, resource, scope)

    def __repr__(self) -> str:
        key = self._key
        return f"BearerAuth({self._tokens!r}, audience={key.audience!r}, resource={key.resource!r})"

    # Requests and responses are of the client's stack (httpx or httpx2), hence Any.
    def bearer_flow(
        self, request: Any, token: AccessToken, *, replay: bool = True
    ) -> Generator[Any, Any, bool]:
        """The whole decision, written once: send ``request`` with ``token``.

        Returns ``True`` when the API refused the token itself and a replay is allowed: a
        401 whose challenge names no error or ``error="invalid_token"`` (never
        ``insufficient_scope`` or another error a new token would meet as well, never an
        answer from another origin the client was redirected to). The sync and async
        drivers then drop it and, if a different token will be used, send the request once
        more (``replay=False``: a second 401 is returned as is).

        A DPoP-bound token (RFC 9449) goes with ``Authorization: DPoP`` and a fresh proof
        (``htm``, ``htu``, ``ath``, the origin's last ``DPoP-Nonce``). A 401 asking for a
        nonce (``WWW-Authenticate: DPoP error="use_dpop_nonce"``) is answered by sending
        the request once more with a new proof carrying it, before any token renewal.
        A same-origin redirect the client followed with the first request's proof is sent
        once more with a proof of its own, if its answer was a 401.
        """
        tokens = self._tokens
        sent = _Sent(self, request, token)
        request.extensions = {**request.extensions, _SENT: sent}
        dpop = self._attach(request, token)  # a DPoP-bound token, with its proof
        response = yield request
        last = _last_request(response, request)
        if last is not request:  # the client followed redirects
            if sent.left_origin or _left(sent.origin, response):
                if dpop and not sent.left_origin and not self._warned:
                    self._warned = True  # once: the client's configuration, not this call
                    logger.warning(_PROOF_LEFT_ORIGIN)
                # Another origin answered: it says nothing about our token.
                return False
            if dpop and not sent.proved_hops and response.status_code == 401:
                # The hop went with the first URL's proof: send it with its own.
                request = last
                self._attach(request, token)
                response = yield request
        if dpop and (response.status_code == 401 or "dpop-nonce" in response.headers):
            url = str(request.url)
            nonce = response.headers.get("dpop-nonce")
            tokens.dpop_nonce(url, nonce)  # RFC 9449 §8.2: any answer may carry a new nonce
            challenge = resource_nonce_challenge(
                response.status_code, _all_values(response.headers, "www-authenticate"), nonce
            )
            if challenge is not None:
                self._attach(request, token, nonce=challenge)
                response = yield request
                tokens.dpop_nonce(url, response.headers.get("dpop-nonce"))
        return replay and token_refused(
            response.status_code, _all_values(response.headers, "www-authenticate")
        )

    def _attach(self, request: Any, token: AccessToken, nonce: str | None = None) -> bool:
        """Put ``token`` on ``request``; ``True`` with a DPoP proof for its method and URL."""
        request.headers["Authorization"] = token.authorization
        if token.token_type != "DPoP":  # checked here: Bearer tokens skip the call
            return False
        proof = self._tokens.dpop_proof(request.method, str(request.url), token, nonce)
        if proof is not None:
            request.headers["DPoP"] = proof
        return proof is not None

    def redirect_hop(self, request: Any) -> None:
        """A request event hook for clients that follow redirects (``follow_redirects=True``).

        httpx follows redirects without asking the auth, copying the first request's
        headers. This hook, run by the client before each request it sends, gives a
        same-origin hop a DPoP proof of its own (``htm``/``htu`` of that hop) and strips
        ``Authorization`` and ``DPoP`` from a hop to another origin (and from every hop
        after it)::

            auth = BearerAuth(tokens)
            httpx.Client(auth=auth, follow_redirects=True,
                         event_hooks={"request": [auth.redirect_hop]})

        Use :meth:`aredirect_hop` with an ``AsyncClient``.
        """
        sent = request.extensions.get(_SENT)
        if not isinstance(sent, _Sent) or sent.auth is not self or request is sent.request:
            return
        if sent.left_origin or _origin(str(request.url)) != sent.origin:
            # The Fetch standard drops Authorization on a cross-origin redirect; the same for
            # every header bound to the token, and for the rest of the chain (A -> B -> A).
            sent.left_origin = True
            request.headers.pop("Authorization", None)
            request.headers.pop("DPoP", None)
            return
        if "DPoP" in request.headers:
            sent.proved_hops = True
            self._attach(request, sent.token)

    async def aredirect_hop(self, request: Any) -> None:
        """:meth:`redirect_hop` for an ``AsyncClient``'s ``event_hooks``."""
        self.redirect_hop(request)

    def sync_auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        tokens, key = _used_with(self._tokens, TokenClient, "Client"), self._key
        if not hasattr(request, "_content"):
            request.read()  # a body already in memory is replayable as it is
        token = tokens.cached_token(key) or tokens.fetch_token(key)
        # A 401 for `token`: drop it if still cached (at most one drop per key every few
        # seconds), else use the token that replaced it; replay once with a different token.
        if (yield from self.bearer_flow(request, token)) and tokens.token_refused(key, token):
            current = tokens.cached_token(key) or tokens.fetch_token(key)
            if current.access_token != token.access_token:
                yield from self.bearer_flow(request, current, replay=False)

    async def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        tokens, key = _used_with(self._tokens, AsyncTokenClient, "AsyncClient"), self._key
        if not hasattr(request, "_content"):
            await request.aread()
        # The cached token without creating a coroutine: the common case stays cheap.
        token = tokens.cached_token(key) or await tokens.fetch_token(key)
        for replay in (True, False):  # at most one replay, as in sync_auth_flow
            flow = self.bearer_flow(request, token, replay=replay)
            outgoing = next(flow)
            while True:  # the flow may send more than once (nonce challenge, redirect hop)
                response = yield outgoing
                try:
                    outgoing = flow.send(response)
                except StopIteration as done:
                    refused = bool(done.value)
                    break
            if not refused or not await tokens.token_refused(key, token):
                return
            current = tokens.cached_token(key) or await tokens.fetch_token(key)
            if current.access_token == token.access_token:
                return  # the server handed back the refused token: its 401 is the answer
            token = current


def _all_values(headers: httpx.Headers | httpx2.Headers, name: str) -> list[str]:
    """Every value of a header sent more than once (a challenge may be in any of them)."""
    get_list = getattr(headers, "get_list", None)
    if get_list is not None:
        return list(get_list(name))
    value = headers.get(name)
    return [] if value is None else [value]


_PROOF_LEFT_ORIGIN = (
    "BearerAuth: the client followed a redirect to another origin with the DPoP proof (httpx "
    "strips only Authorization); add BearerAuth.redirect_hop to its request event_hooks, or "
    "turn follow_redirects off"
)


def _used_with(tokens: TokenClient | AsyncTokenClient, kind: type[ClientT], http: str) -> ClientT:
    """``tokens``, if it is the kind of token client an ``http`` client's auth flow needs."""
    if not isinstance(tokens, kind):
        given = type(tokens).__name__
        raise ConfigurationError(
            f"BearerAuth was given {_a(given)} {given} but is used with {_a(http)} {http}; "
            f"use {_a(kind.__name__)} {kind.__name__} with {_a(http)} {http}"
        )
    return tokens


def _a(word: str) -> str:
    """The indefinite article for ``word`` (class names: "an AsyncClient", "a Client")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


_SENT = "m2m_client.bearer"  # the request extension carrying a request's _Sent


class _Sent:
    """What BearerAuth put on one request, for the hops a client follows from it (kept in
    ``request.extensions``, which httpx hands on to each redirect request)."""

    __slots__ = ("_first_origin", "auth", "left_origin", "proved_hops", "request", "token")

    def __init__(self, auth: BearerAuth, request: Any, token: AccessToken) -> None:
        self.auth, self.request, self.token = auth, request, token
        self._first_origin: str | None = ""  # computed after a redirect, not on every request
        self.left_origin = False  # a hop went to another origin: nothing more is attached
        self.proved_hops = False  # redirect_hop gave the hops proofs of their own

    @property
    def origin(self) -> str | None:
        if self._first_origin == "":
            self._first_origin = _origin(str(self.request.url))
        return self._first_origin

    def __repr__(self) -> str:  # transports may log extensions: never the token
        return f"<BearerAuth request to {self.origin}>"


def _left(origin: str | None, response: Any) -> bool:
    """Whether a request in ``response``'s redirect chain went to another origin."""
    for answer in (*response.history, response):
        request = _last_request(answer, None)
        if request is not None and _origin(str(request.url)) != origin:
            return True
    return False


def _last_request(response: Any, sent: Any) -> Any:
    """The request ``response`` answers: ``sent``, or the last redirect hop the client
    followed from it."""
    try:
        return response.request
    except RuntimeError:  # a response built by hand (tests) has none
        return sent
