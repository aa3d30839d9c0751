"""ROOT_URLCONF of the Django service in test_frameworks.py: the shape-suite routes."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import path

from m2m_client.django import require


def public(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


def protected(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"subject": request.claims.subject})


@require(roles=["admin"])
async def async_admin(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"subject": request.claims.subject})


urlpatterns = [
    path("async-admin", async_admin),
    path("public", public),
    path("protected", protected),
    path("admin", require(roles=["admin"])(protected)),
    path("items", require(scopes="read:items")(protected)),
    path("public-admin", require(roles=["admin"])(protected)),
]
