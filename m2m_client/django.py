"""Django integration: ``JWTMiddleware`` and the ``@require(...)`` view decorator.

In ``settings.py``::

    MIDDLEWARE = [..., "m2m_client.django.JWTMiddleware"]
    M2M_ISSUER = "https://tenant.eu.auth0.com/"
    M2M_AUDIENCE = "https://api.example.com"
    M2M_PUBLIC_PATHS = ["/health"]          # served without a token

and in a view module::

    @require(permissions=["read:dashboard"])
    def dashboard(request):
        return JsonResponse({"subject": request.claims.subject})

Settings (read once, when Django builds the middleware): ``M2M_VERIFIER`` (a ready
:class:`~m2m_client.verify.TokenVerifier`; else ``M2M_ISSUER`` and ``M2M_AUDIENCE`` build
one, with ``M2M_ROLES_CLAIM`` and ``M2M_DPOP``), ``M2M_PUBLIC_PATHS`` (exact paths, or
every path under an entry ending in ``/``), ``M2M_RESOURCE_METADATA`` (a
:func:`m2m_client.protected_resource_metadata` document, served at its
``/.well-known/oauth-protected-resource`` path and named in every challenge) and
``M2M_TRUST_FORWARDED`` (rebuild a DPoP proof's URL from ``X-Forwarded-*``).

Every request but those to public paths must carry a valid token; its
:class:`~m2m_client.verify.Claims` are ``request.claims`` (None on a public path). Refusals
are :class:`m2m_client.fastapi.JWTBearer`'s answers, as JSON ``{"detail": ...}``. Paths are
Django's ``request.path_info`` (without the script prefix). The verifier is sync and
thread-safe (gunicorn ``--threads``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from m2m_client.errors import ConfigurationError
from m2m_client.verify import TokenVerifier
from m2m_client.verify._metadata import MetadataRoute
from m2m_client.verify._receive import (
    Gate,
    PublicPaths,
    Refusal,
    Rights,
    environ_url,
    verifier_from_config,
)

__all__ = ["JWTMiddleware", "require"]

logger = logging.getLogger("m2m_client.verify")

F = TypeVar("F", bound=Callable[..., Any])
_GATE = "_m2m_client_gate"


def _response(refusal: Refusal) -> HttpResponse:
    response = HttpResponse(refusal.body(), status=refusal.status, content_type="application/json")
    for name, value in refusal.headers.items():
        response[name] = value
    return response


class _Settings:
    def get(self, name: str) -> Any:
        return getattr(settings, name, None)


class JWTMiddleware:
    """Verifies the token of every request but ``M2M_PUBLIC_PATHS``; sets ``request.claims``."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        verifier = getattr(settings, "M2M_VERIFIER", None)
        if verifier is None:
            verifier = verifier_from_config(_Settings())
        if not isinstance(verifier, TokenVerifier):
            raise ConfigurationError("M2M_VERIFIER must be a TokenVerifier")
        document = getattr(settings, "M2M_RESOURCE_METADATA", None)
        self._metadata = MetadataRoute(document) if document is not None else None
        self._gate = Gate(
            verifier, resource_metadata=self._metadata.url if self._metadata else None
        )
        self.public_paths = PublicPaths(getattr(settings, "M2M_PUBLIC_PATHS", ()))
        self.trust_forwarded = bool(getattr(settings, "M2M_TRUST_FORWARDED", False))

    def __call__(self, request: HttpRequest) -> HttpResponse:
        path = request.path_info
        meta = self._metadata
        if meta is not None and path == meta.path:
            if request.method not in ("GET", "HEAD"):
                return _response(Refusal(405, "Method Not Allowed", {"Allow": "GET, HEAD"}))
            return HttpResponse(meta.body, content_type="application/json")
        gate = self._gate
        setattr(request, _GATE, gate)
        if path in self.public_paths:
            request.claims = None
            return self.get_response(request)
        meta_env = request.META
        value = meta_env.get("HTTP_AUTHORIZATION")
        cached = gate.cached_bearer(value)
        if cached is not None:  # a repeated bearer token: a cache lookup
            request.claims = cached
            return self.get_response(request)
        try:
            found = gate.authorization([value] if value is not None else [])
            if found is None:
                raise gate.missing()
            proof = meta_env.get("HTTP_DPOP")
            claims = gate.verify_sync(
                found,
                [proof] if proof is not None else [],
                request.method or "GET",
                functools.partial(environ_url, meta_env, trust_forwarded=self.trust_forwarded),
            )
        except Refusal as refusal:
            return _response(refusal)
        request.claims = claims
        response = self.get_response(request)
        for name, header in gate.success_headers(found[0]):
            response[name] = header
        return response


def _check(request: HttpRequest, rights: Rights) -> HttpResponse | None:
    gate = getattr(request, _GATE, None)
    if not isinstance(gate, Gate):
        logger.error("m2m_client.django.require() used without m2m_client.django.JWTMiddleware")
        return _response(Refusal(503, "The API's token verification is misconfigured.", {}))
    try:
        gate.check(getattr(request, "claims", None), rights)
    except Refusal as refusal:
        return _response(refusal)
    return None


def require(
    *,
    scopes: str | Iterable[str] = (),
    permissions: str | Iterable[str] = (),
    roles: str | Iterable[str] = (),
) -> Callable[[F], F]:
    """Decorate a view (sync or async): its request's claims must grant these rights.

    401 on a public path (no claims), 403 ``insufficient_scope`` naming what is missing.
    """
    rights = Rights(scopes, permissions, roles)

    def decorate(view: F) -> F:
        if inspect.iscoroutinefunction(view):

            @functools.wraps(view)
            async def checked_async(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                refused = _check(request, rights)
                if refused is not None:
                    return refused
                return await view(request, *args, **kwargs)

            return checked_async  # type: ignore[return-value]

        @functools.wraps(view)
        def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            refused = _check(request, rights)
            return refused if refused is not None else view(request, *args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate
