"""A Flask service protected by m2m-client: the routes of fastapi_service.py, on Flask.

Configure with environment variables, then run (threads are fine: the verifier is
thread-safe)::

    M2M_ISSUER=https://tenant.eu.auth0.com/ M2M_AUDIENCE=https://api.example.com \\
        gunicorn --threads 8 examples.flask_service:app

``M2M_ISSUER`` and ``M2M_AUDIENCE`` go into ``app.config``, where ``JWTAuth`` reads them.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, g

from m2m_client import protected_resource_metadata
from m2m_client.flask import JWTAuth
from m2m_client.verify import TokenVerifier


def create_app(verifier: TokenVerifier, *, resource: str) -> Flask:
    app = Flask(__name__)
    auth = JWTAuth(
        app,
        verifier=verifier,
        metadata=protected_resource_metadata(resource=resource, verifier=verifier),
    )

    @app.get("/")
    def public() -> Any:
        return {"message": "This is a public endpoint"}

    @app.get("/protected")
    @auth.require()
    def protected() -> Any:
        return {"message": "This is a protected endpoint", "subject": g.claims.subject}

    @app.get("/admin")
    @auth.require(roles=["admin"])
    def admin() -> Any:
        return {"message": "Admin access granted"}

    @app.get("/dashboard")
    @auth.require(permissions=["read:dashboard"])
    def dashboard() -> Any:
        return {"message": "Dashboard access granted"}

    @app.get("/profile")
    @auth.require()
    def profile() -> Any:
        return {
            "subject": g.claims.subject,
            "roles": sorted(g.claims.roles),
            "permissions": sorted(g.claims.permissions),
        }

    return app


def verifier_from_env() -> tuple[TokenVerifier, str]:
    issuer, audience = os.environ.get("M2M_ISSUER"), os.environ.get("M2M_AUDIENCE")
    if not issuer or not audience:
        raise SystemExit("set M2M_ISSUER and M2M_AUDIENCE")
    roles_claim = os.environ.get("M2M_ROLES_CLAIM") or f"{audience.rstrip('/')}/roles"
    return TokenVerifier(issuer=issuer, audience=audience, roles_claim=roles_claim), audience


_verifier, _audience = verifier_from_env()
app = create_app(_verifier, resource=_audience)
