"""Pure ASGI middleware: protect Starlette, FastAPI, Litestar, Quart or any ASGI app.

>>> app = JWTMiddleware(app, verifier=AsyncTokenVerifier(issuer=..., audience=...),
...                     public_paths=["/health"])

Every HTTP request but those to ``public_paths`` must carry a valid token (bearer, or DPoP
under the verifier's ``dpop`` policy), verified once; its :class:`~m2m_client.verify.Claims`
are put in the ASGI scope under ``scope["m2m_client.claims"]`` (:data:`CLAIMS_KEY`) and in
``scope["state"]["claims"]`` -- ``request.state.claims`` in Starlette and FastAPI. A refused
request gets the same answers as :class:`m2m_client.fastapi.JWTBearer`: 401 with the
RFC 6750 / RFC 9449 challenge, 400 for more than one ``Authorization`` header, 503 when
the issuer's keys cannot be fetched. Routes demand rights with :func:`require`.

WebSocket connections are verified at the handshake the same way; a refused handshake
gets the full 401/403 answer where the server supports the ``websocket.http.response``
extension, and is closed (code 1008, which servers answer with HTTP 403) elsewhere.
Lifespan and other scopes pass through untouched. The middleware needs no framework:
it only reads the scope and sends ASGI messages.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, TypeVar

import anyio.to_thread

from m2m_client.errors import ConfigurationError
from m2m_client.verify import AsyncTokenVerifier, Claims
from m2m_client.verify._metadata import MetadataRoute
from m2m_client.verify._receive import Gate, PublicPaths, Refusal, Rights, asgi_url

__all__ = ["CLAIMS_KEY", "JWTMiddleware", "require"]

logger = logging.getLogger("m2m_client.verify")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
F = TypeVar("F", bound=Callable[..., Any])

#: The scope key holding the request's verified Claims (None on a public path).
CLAIMS_KEY = "m2m_client.claims"
_GATE_KEY = "m2m_client.gate"
_JSON = (b"content-type", b"application/json")


async def _respond(send: Send, refusal: Refusal, *, websocket: bool = False) -> None:
    body = refusal.body()
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    headers += [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in refusal.headers.items()
    ]
    prefix = "websocket.http.response" if websocket else "http.response"
    await send({"type": f"{prefix}.start", "status": refusal.status, "headers": headers})
    await send({"type": f"{prefix}.body", "body": body})


class _RefusalResponse:
    """A refusal as an ASGI app: what a Starlette endpoint may return instead of a Response."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        self.status_code = refusal.status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, self.refusal)


class JWTMiddleware:
    """ASGI middleware verifying the token of every request but ``public_paths``.

    ``verifier``: an :class:`~m2m_client.verify.AsyncTokenVerifier` (the event loop is never
    blocked: a repeated token is a cache lookup, the rest is awaited). ``public_paths``:
    paths served without a token -- an exact path, or every path under an entry ending in
    ``/``. ``metadata``: a :func:`m2m_client.protected_resource_metadata` document, served at
    its ``/.well-known/oauth-protected-resource`` path and named in every challenge.
    ``trust_forwarded`` / ``request_url``: how the URL a DPoP proof names is rebuilt, as
    for :class:`m2m_client.fastapi.JWTBearer` (``request_url`` takes the ASGI scope).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        verifier: AsyncTokenVerifier,
        public_paths: str | Iterable[str] = (),
        metadata: dict[str, Any] | None = None,
        trust_forwarded: bool = False,
        request_url: Callable[[Scope], str] | None = None,
    ) -> None:
        if not isinstance(verifier, AsyncTokenVerifier):
            raise ConfigurationError(
                "JWTMiddleware needs an AsyncTokenVerifier (a TokenVerifier would block the loop)"
            )
        self.app = app
        self.verifier = verifier
        self.public_paths = PublicPaths(public_paths)
        self._any_public = bool(self.public_paths.exact or self.public_paths.prefixes)
        self._metadata = MetadataRoute(metadata) if metadata is not None else None
        self._gate = Gate(
            verifier, resource_metadata=self._metadata.url if self._metadata else None
        )
        self.trust_forwarded = trust_forwarded
        self.request_url = request_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)  # lifespan, and scope types we do not know
            return
        path = scope["path"]
        meta = self._metadata
        if meta is not None and path == meta.path and kind == "http":
            await self._serve_metadata(scope, send, meta)
            return
        scope[_GATE_KEY] = self._gate
        if self._any_public and path in self.public_paths:
            scope[CLAIMS_KEY] = None
            await self.app(scope, receive, send)
            return
        # The common case first: one "Authorization: Bearer <token>" header whose token was
        # verified before -- a cache lookup, no list, no proof. It is exactly a case the core
        # would take as ("bearer", token); everything else goes through the core below.
        value: bytes | None = None
        several = False
        for name, raw in scope["headers"]:
            if name == b"authorization":
                several = value is not None
                value = raw
        claims = None
        if value is not None and not several:
            claims = self._gate.cached_bearer(value.decode("latin-1"))
        if claims is not None:
            scheme = "bearer"
        else:
            try:
                claims, scheme = await self._verify(scope, kind)
            except Refusal as refusal:
                await self._refuse(scope, send, refusal)
                return
        scope[CLAIMS_KEY] = claims
        # A new state dict: the server's may be shared (lifespan state), claims must not be.
        state = scope.get("state")
        scope["state"] = {**state, "claims": claims} if state else {"claims": claims}
        if scheme == "dpop" and kind == "http":
            extra = self._gate.success_headers(scheme)
            if extra:
                nonce = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra]

                async def send_with_nonce(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        message = {**message, "headers": [*message.get("headers", ()), *nonce]}
                    await send(message)

                await self.app(scope, receive, send_with_nonce)
                return
        await self.app(scope, receive, send)

    async def _verify(self, scope: Scope, kind: str) -> tuple[Claims, str]:
        """The core's path: the Authorization rule, then bearer or DPoP verification."""
        gate = self._gate
        headers = scope["headers"]
        found = gate.authorization([v for k, v in headers if k == b"authorization"])
        if found is None:
            raise gate.missing()
        claims = await gate.verify_async(
            found,
            [v.decode("latin-1") for k, v in headers if k == b"dpop"],
            "GET" if kind == "websocket" else scope["method"],
            functools.partial(self._url, scope),
        )
        return claims, found[0]

    def _url(self, scope: Scope) -> str:
        if self.request_url is not None:
            return self.request_url(scope)
        if scope["type"] == "websocket":
            # A proof for a WebSocket names the http(s) URL of its handshake request.
            https = scope.get("scheme") in ("wss", "https")
            scope = {**scope, "scheme": "https" if https else "http"}
        return asgi_url(scope, trust_forwarded=self.trust_forwarded)

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        if scope["type"] == "http":
            await _respond(send, refusal)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await _respond(send, refusal, websocket=True)
        else:
            await send({"type": "websocket.close", "code": 1008})

    @staticmethod
    async def _serve_metadata(scope: Scope, send: Send, meta: MetadataRoute) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            refusal = Refusal(405, "Method Not Allowed", {"Allow": "GET, HEAD"})
            await _respond(send, refusal)
            return
        headers = [_JSON, (b"content-length", str(len(meta.body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = b"" if scope["method"] == "HEAD" else meta.body
        await send({"type": "http.response.body", "body": body})


def _check(scope: Scope, rights: Rights) -> Claims:
    gate = scope.get(_GATE_KEY)
    if not isinstance(gate, Gate):
        # require() without the middleware: refuse (never serve unprotected), and tell the
        # operator in the log; a 503, as for any verification the operator must fix.
        logger.error("m2m_client.asgi.require() used on an app without JWTMiddleware")
        raise Refusal(503, "The API's token verification is misconfigured.", {})
    return gate.check(scope.get(CLAIMS_KEY), rights)


class _RequireApp:
    """An ASGI app that checks rights before calling the one it wraps."""

    def __init__(self, app: ASGIApp, rights: Rights) -> None:
        self.app = app
        self.rights = rights

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            try:
                _check(scope, self.rights)
            except Refusal as refusal:
                if scope["type"] == "http":
                    await _respond(send, refusal)
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


def require(
    *,
    scopes: str | Iterable[str] = (),
    permissions: str | Iterable[str] = (),
    roles: str | Iterable[str] = (),
) -> Callable[[F], F]:
    """Demand scopes, permissions and/or roles of a route protected by :class:`JWTMiddleware`.

    Decorates an ASGI app -- ``(scope, receive, send)``, e.g. a Starlette ``Mount`` or
    ``HTTPEndpoint`` -- or a request endpoint ``(request)`` of Starlette or FastAPI (anything
    whose argument has ``.scope``). A request without claims gets 401, one whose claims
    lack a right 403 (``insufficient_scope``), with the middleware's challenges.

    >>> Route("/admin", require(roles=["admin"])(admin))
    """
    rights = Rights(scopes, permissions, roles)  # checked now: wrong types fail at start-up

    def decorate(endpoint: F) -> F:
        try:
            parameters = inspect.signature(endpoint).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins
            parameters = {}  # type: ignore[assignment]
        if len(parameters) >= 3:
            return _RequireApp(endpoint, rights)  # type: ignore[return-value]
        is_async = inspect.iscoroutinefunction(endpoint)

        @functools.wraps(endpoint)
        async def checked(request: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                _check(request.scope, rights)
            except Refusal as refusal:
                return _RefusalResponse(refusal)
            if is_async:
                return await endpoint(request, *args, **kwargs)
            # A sync endpoint runs in a worker thread, as Starlette would run it.
            call = functools.partial(endpoint, request, *args, **kwargs)
            return await anyio.to_thread.run_sync(call)

        return checked  # type: ignore[return-value]

    return decorate
