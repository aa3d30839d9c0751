"""A Django service protected by m2m-client, in one file: settings, views and URLs.

Configure with environment variables, then run (threads are fine)::

    M2M_ISSUER=https://tenant.eu.auth0.com/ M2M_AUDIENCE=https://api.example.com \\
        gunicorn --threads 8 examples.django_service:application

In a real project the ``M2M_*`` names below go into ``settings.py`` and
``"m2m_client.django.JWTMiddleware"`` into ``MIDDLEWARE``; the views use ``@require``.
"""

from __future__ import annotations

import os

import django
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path

from m2m_client import protected_resource_metadata
from m2m_client.django import require
from m2m_client.verify import TokenVerifier


def public(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"message": "This is a public endpoint"})


def protected(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {"message": "This is a protected endpoint", "subject": request.claims.subject}
    )


@require(roles=["admin"])
def admin(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"message": "Admin access granted"})


@require(permissions=["read:dashboard"])
def dashboard(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"message": "Dashboard access granted"})


def profile(request: HttpRequest) -> JsonResponse:
    claims = request.claims
    return JsonResponse(
        {
            "subject": claims.subject,
            "roles": sorted(claims.roles),
            "permissions": sorted(claims.permissions),
        }
    )


urlpatterns = [
    path("", public),
    path("protected", protected),
    path("admin", admin),
    path("dashboard", dashboard),
    path("profile", profile),
]


def configure() -> None:
    issuer, audience = os.environ.get("M2M_ISSUER"), os.environ.get("M2M_AUDIENCE")
    if not issuer or not audience:
        raise SystemExit("set M2M_ISSUER and M2M_AUDIENCE")
    roles_claim = os.environ.get("M2M_ROLES_CLAIM") or f"{audience.rstrip('/')}/roles"
    verifier = TokenVerifier(issuer=issuer, audience=audience, roles_claim=roles_claim)
    settings.configure(
        DEBUG=False,
        SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-change-me"),
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(","),
        MIDDLEWARE=["m2m_client.django.JWTMiddleware"],
        # m2m-client's settings (docs/verifying.md, "Django"):
        M2M_VERIFIER=verifier,
        M2M_PUBLIC_PATHS=["/"],
        M2M_RESOURCE_METADATA=protected_resource_metadata(resource=audience, verifier=verifier),
    )
    django.setup()


configure()

from django.core.wsgi import get_wsgi_application  # noqa: E402 - after settings

application = get_wsgi_application()
