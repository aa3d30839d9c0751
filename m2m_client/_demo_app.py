"""The FastAPI app of the guide's routes on our verifier (used by the demo and examples).

Routes: public ``/``, ``/protected`` (any valid token), ``/admin`` (role ``admin``),
``/dashboard`` (permission ``read:dashboard``), ``/profile`` (custom claims).
"""

# No `from __future__ import annotations`: FastAPI evaluates the Annotated[..., Depends(x)]
# hints of nested route functions at runtime, and `x` is a local name there.

from typing import Annotated, Any

from fastapi import Depends, FastAPI

from m2m_client.fastapi import JWTBearer
from m2m_client.verify import AsyncTokenVerifier, Claims, TokenVerifier

__all__ = ["create_app"]


def create_app(
    verifier: AsyncTokenVerifier | TokenVerifier, *, claims_namespace: str | None = None
) -> FastAPI:
    """Build the demo API. ``claims_namespace`` prefixes custom claims (Auth0 style)."""
    app = FastAPI(title="m2m-client protected API")
    auth = JWTBearer(verifier)
    prefix = f"{claims_namespace.rstrip('/')}/" if claims_namespace else ""

    @app.get("/")
    async def public() -> dict[str, str]:
        return {"message": "This is a public endpoint"}

    @app.get("/protected")
    async def protected(claims: Annotated[Claims, Depends(auth)]) -> dict[str, Any]:
        return {
            "message": "This is a protected endpoint",
            "subject": claims.subject,
            "client_id": claims.client_id,
        }

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
            "client_id": claims.client_id,
            "email": claims.get("email"),
            "organization": claims.get(f"{prefix}organization"),
            "scopes": sorted(claims.scopes),
            "roles": sorted(claims.roles),
            "permissions": sorted(claims.permissions),
        }

    return app
