"""Flask integration: the ``JWTAuth`` extension and its ``@auth.require(...)`` decorator.

>>> auth = JWTAuth(app, verifier=TokenVerifier(issuer=..., audience=...))
>>> @app.get("/dashboard")
... @auth.require(permissions=["read:dashboard"])
... def dashboard():
...     return {"subject": g.claims.subject}

A decorated view runs only for a request with a valid token (bearer, or DPoP under the
verifier's ``dpop`` policy) granting what it demands; its :class:`~m2m_client.verify.Claims`
are on ``flask.g.claims``. Refusals are the answers of :class:`m2m_client.fastapi.JWTBearer`
(401 with the RFC 6750 / RFC 9449 challenge, 403 ``insufficient_scope``, 503 when the keys
cannot be fetched), as JSON ``{"detail": ...}``. Views without the decorator are public.

The sync :class:`~m2m_client.verify.TokenVerifier` is thread-safe: one per app serves
every thread of a threaded server (gunicorn ``--threads``, Flask's dev server).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from flask import Flask, Response, current_app, g, make_response, request

from m2m_client.errors import ConfigurationError
from m2m_client.verify import Claims, TokenVerifier
from m2m_client.verify._metadata import MetadataRoute
from m2m_client.verify._receive import Gate, Refusal, Rights, environ_url, verifier_from_config

__all__ = ["JWTAuth"]

F = TypeVar("F", bound=Callable[..., Any])
_EXTENSION = "m2m_client"


def _refusal_response(refusal: Refusal) -> Response:
    return Response(
        refusal.body(), status=refusal.status, headers=refusal.headers, mimetype="application/json"
    )


class JWTAuth:
    """Flask extension: ``JWTAuth(app, verifier=...)`` or ``auth.init_app(app)`` later.

    ``verifier``: a :class:`~m2m_client.verify.TokenVerifier`; without one, ``init_app``
    builds it from ``app.config`` (``M2M_ISSUER``, ``M2M_AUDIENCE``, ``M2M_ROLES_CLAIM``,
    ``M2M_DPOP``). ``metadata``: a :func:`m2m_client.protected_resource_metadata` document,
    served at its ``/.well-known/oauth-protected-resource`` path and named in every
    challenge. ``trust_forwarded``: rebuild a DPoP proof's URL from ``X-Forwarded-*``
    (only behind a proxy that overwrites them).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        verifier: TokenVerifier | None = None,
        metadata: dict[str, Any] | None = None,
        trust_forwarded: bool = False,
    ) -> None:
        if verifier is not None and not isinstance(verifier, TokenVerifier):
            raise ConfigurationError("JWTAuth needs a TokenVerifier (Flask views are sync)")
        self.verifier = verifier
        self._metadata = MetadataRoute(metadata) if metadata is not None else None
        self.trust_forwarded = trust_forwarded
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Attach to ``app``: its gate (verifier and challenges) and the metadata route."""
        verifier = self.verifier if self.verifier is not None else verifier_from_config(app.config)
        meta = self._metadata
        app.extensions[_EXTENSION] = Gate(verifier, resource_metadata=meta.url if meta else None)
        if meta is not None:
            body = meta.body

            def protected_resource_metadata() -> Response:
                return Response(body, mimetype="application/json")

            app.add_url_rule(meta.path, "m2m_client_metadata", protected_resource_metadata)

    def require(
        self,
        *,
        scopes: str | Iterable[str] = (),
        permissions: str | Iterable[str] = (),
        roles: str | Iterable[str] = (),
    ) -> Callable[[F], F]:
        """Decorate a view: a valid token, granting these scopes, permissions and roles.

        ``@auth.require()`` demands only a valid token. Names are checked now, so a wrong
        type fails at import, not per request.
        """
        rights = Rights(scopes, permissions, roles)

        def decorate(view: F) -> F:
            # Decided once: Flask's ensure_sync() asks inspect on every call otherwise.
            is_async = inspect.iscoroutinefunction(view)

            @functools.wraps(view)
            def checked(*args: Any, **kwargs: Any) -> Any:
                # The real objects once: each access through a proxy is a context lookup.
                app = current_app._get_current_object()  # type: ignore[attr-defined]
                ctx_g = g._get_current_object()
                gate = app.extensions.get(_EXTENSION)
                if not isinstance(gate, Gate):
                    raise ConfigurationError("JWTAuth.require() on an app without init_app()")
                try:
                    claims, scheme = self._claims(gate, ctx_g)
                    if not rights.granted(claims):
                        gate.check(claims, rights)
                except Refusal as refusal:
                    return _refusal_response(refusal)
                ctx_g.claims = claims
                result = (
                    app.ensure_sync(view)(*args, **kwargs) if is_async else view(*args, **kwargs)
                )
                extra = gate.success_headers(scheme) if scheme == "dpop" else ()
                if not extra:
                    return result
                response = make_response(result)
                for name, value in extra:
                    response.headers[name] = value
                return response

            return checked  # type: ignore[return-value]

        return decorate

    def _claims(self, gate: Gate, ctx_g: Any) -> tuple[Claims, str]:
        """The request's verified claims: once per request, however many decorators."""
        done = getattr(ctx_g, "_m2m_client_verified", None)
        if done is not None:
            return done  # type: ignore[no-any-return]
        environ = request._get_current_object().environ  # type: ignore[attr-defined]
        value = environ.get("HTTP_AUTHORIZATION")
        claims = gate.cached_bearer(value)
        if claims is not None:
            ctx_g._m2m_client_verified = (claims, "bearer")
            return claims, "bearer"
        found = gate.authorization([value] if value is not None else [])
        if found is None:
            raise gate.missing()
        proof = environ.get("HTTP_DPOP")
        claims = gate.verify_sync(
            found,
            [proof] if proof is not None else [],
            environ.get("REQUEST_METHOD", "GET"),
            functools.partial(environ_url, environ, trust_forwarded=self.trust_forwarded),
        )
        ctx_g._m2m_client_verified = (claims, found[0])
        return claims, found[0]
