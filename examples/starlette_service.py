"""A Starlette service protected by m2m-client's pure ASGI middleware (works for any ASGI app).

Configure with environment variables, then run::

    M2M_ISSUER=https://tenant.eu.auth0.com/ M2M_AUDIENCE=https://api.example.com \\
        uvicorn examples.starlette_service:app

The same routes as fastapi_service.py: ``/`` is public, every other route needs a valid
token, ``/admin`` the role ``admin`` and ``/dashboard`` the permission ``read:dashboard``.
The RFC 9728 metadata is served at ``/.well-known/oauth-protected-resource``.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from m2m_client import protected_resource_metadata
from m2m_client.asgi import JWTMiddleware, require
from m2m_client.verify import AsyncTokenVerifier


def create_app(verifier: AsyncTokenVerifier, *, resource: str) -> Any:
    async def public(request: Request) -> JSONResponse:
        return JSONResponse({"message": "This is a public endpoint"})

    async def protected(request: Request) -> JSONResponse:
        claims = request.state.claims
        return JSONResponse({"message": "This is a protected endpoint", "subject": claims.subject})

    @require(roles=["admin"])
    async def admin(request: Request) -> JSONResponse:
        return JSONResponse({"message": "Admin access granted"})

    @require(permissions=["read:dashboard"])
    async def dashboard(request: Request) -> JSONResponse:
        return JSONResponse({"message": "Dashboard access granted"})

    async def profile(request: Request) -> JSONResponse:
        claims = request.state.claims
        return JSONResponse(
            {
                "subject": claims.subject,
                "roles": sorted(claims.roles),
                "permissions": sorted(claims.permissions),
            }
        )

    app = Starlette(
        routes=[
            Route("/", public),
            Route("/protected", protected),
            Route("/admin", admin),
            Route("/dashboard", dashboard),
            Route("/profile", profile),
        ]
    )
    metadata = protected_resource_metadata(resource=resource, verifier=verifier)
    return JWTMiddleware(app, verifier=verifier, public_paths=["/"], metadata=metadata)


def verifier_from_env() -> tuple[AsyncTokenVerifier, str]:
    issuer, audience = os.environ.get("M2M_ISSUER"), os.environ.get("M2M_AUDIENCE")
    if not issuer or not audience:
        raise SystemExit("set M2M_ISSUER and M2M_AUDIENCE")
    roles_claim = os.environ.get("M2M_ROLES_CLAIM") or f"{audience.rstrip('/')}/roles"
    verifier = AsyncTokenVerifier(issuer=issuer, audience=audience, roles_claim=roles_claim)
    return verifier, audience


_verifier, _audience = verifier_from_env()
app = create_app(_verifier, resource=_audience)
