"""A FastAPI service protected by m2m-client: the routes of the usual Auth0 guide, done right.

Configure with environment variables, then run::

    M2M_ISSUER=https://tenant.eu.auth0.com/ M2M_AUDIENCE=https://api.example.com \
        uvicorn examples.fastapi_service:app

``AUTH0_DOMAIN`` / ``AUTH0_AUDIENCE`` work too; ``M2M_ROLES_CLAIM`` says where roles live
(default ``<audience>/roles``, Auth0's namespaced-claim convention; ``realm_access.roles``
for Keycloak, ``roles`` for Entra ID).
"""

# No `from __future__ import annotations`: FastAPI evaluates the Annotated[..., Depends(x)]
# hints of nested route functions at runtime, and `x` is a local name there.

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from m2m_client.fastapi import JWTBearer
from m2m_client.verify import AsyncTokenVerifier, Claims


def create_app(verifier: AsyncTokenVerifier, *, claims_namespace: str | None = None) -> FastAPI:
    app = FastAPI(title="Protected API")
    auth = JWTBearer(verifier)
    prefix = f"{claims_namespace.rstrip('/')}/" if claims_namespace else ""

    @app.get("/")
    async def public() -> dict[str, str]:
        return {"message": "This is a public endpoint"}

    @app.get("/protected")
    async def protected(claims: Annotated[Claims, Depends(auth)]) -> dict[str, Any]:
        return {"message": "This is a protected endpoint", "subject": claims.subject}

    @app.get("/admin")
    async def admin(claims: Annotated[Claims, Depends(auth.require(roles=["admin"]))]) -> Any:
        return {"message": "Admin access granted", "subject": claims.subject}

    @app.get("/dashboard")
    async def dashboard(
        claims: Annotated[Claims, Depends(auth.require(permissions=["read:dashboard"]))],
    ) -> dict[str, str]:
        return {"message": "Dashboard access granted"}

    @app.get("/profile")
    async def profile(claims: Annotated[Claims, Depends(auth)]) -> dict[str, Any]:
        return {
            "subject": claims.subject,
            "email": claims.get("email"),
            "organization": claims.get(f"{prefix}organization"),
            "roles": sorted(claims.roles),
            "permissions": sorted(claims.permissions),
        }

    return app


def verifier_from_env() -> AsyncTokenVerifier:
    domain = os.environ.get("AUTH0_DOMAIN")
    issuer = os.environ.get("M2M_ISSUER") or (f"https://{domain}/" if domain else None)
    audience = os.environ.get("M2M_AUDIENCE") or os.environ.get("AUTH0_AUDIENCE")
    if not issuer or not audience:
        raise SystemExit("set M2M_ISSUER (or AUTH0_DOMAIN) and M2M_AUDIENCE (or AUTH0_AUDIENCE)")
    roles_claim = os.environ.get("M2M_ROLES_CLAIM") or f"{audience.rstrip('/')}/roles"
    return AsyncTokenVerifier(issuer=issuer, audience=audience, roles_claim=roles_claim)


# Importing without configuration exits with the message above (uvicorn shows it).
app = create_app(
    verifier_from_env(),
    claims_namespace=os.environ.get("M2M_AUDIENCE") or os.environ.get("AUTH0_AUDIENCE"),
)
