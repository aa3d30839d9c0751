"""The same protected service on every integration, for the shape suite (test_frameworks.py).

Routes: ``/public`` (no token), ``/protected`` (any valid token; answers the subject),
``/admin`` (role ``admin``), ``/items`` (scope ``read:items``), ``/public-admin`` (a public
path whose route still demands a role: 401) and the RFC 9728 metadata document.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from m2m_client import protected_resource_metadata
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier
from m2m_client.verify._metadata import WELL_KNOWN

RESOURCE = "https://api.example.com"
METADATA_URL = f"{RESOURCE}{WELL_KNOWN}"
FRAMEWORKS = ("fastapi", "asgi", "flask", "django")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: Any


def metadata(verifier: AsyncTokenVerifier | TokenVerifier) -> dict[str, Any]:
    return protected_resource_metadata(
        resource=RESOURCE, verifier=verifier, scopes_supported=["read:items"]
    )


def fastapi_app(verifier: AsyncTokenVerifier) -> Any:
    from fastapi import Depends, FastAPI, Security

    from m2m_client.fastapi import JWTBearer

    app = FastAPI()
    auth = JWTBearer(verifier, resource_metadata=METADATA_URL)
    document = metadata(verifier)

    @app.get("/public")
    async def public() -> Any:
        return {"ok": True}

    @app.get("/protected")
    async def protected(claims: Any = Depends(auth)) -> Any:  # noqa: B008
        return {"subject": claims.subject}

    @app.get("/admin")
    async def admin(claims: Any = Depends(auth.require(roles=["admin"]))) -> Any:  # noqa: B008
        return {"subject": claims.subject}

    @app.get("/items")
    async def items(claims: Any = Security(auth, scopes=["read:items"])) -> Any:  # noqa: B008
        return {"subject": claims.subject}

    @app.get("/public-admin")
    async def public_admin(claims: Any = Depends(auth.require(roles=["admin"]))) -> Any:  # noqa: B008
        return {"subject": claims.subject}

    @app.get(WELL_KNOWN)
    async def resource_metadata() -> Any:
        return document

    return app


def starlette_app(verifier: AsyncTokenVerifier) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from m2m_client.asgi import JWTMiddleware, require

    async def public(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def protected(request: Request) -> JSONResponse:
        assert request.scope["m2m_client.claims"] is request.state.claims
        return JSONResponse({"subject": request.state.claims.subject})

    app = Starlette(
        routes=[
            Route("/public", public),
            Route("/protected", protected),
            Route("/admin", require(roles=["admin"])(protected)),
            Route("/items", require(scopes="read:items")(protected)),
            Route("/public-admin", require(roles=["admin"])(protected)),
        ]
    )
    return JWTMiddleware(
        app,
        verifier=verifier,
        public_paths=["/public", "/public-admin"],
        metadata=metadata(verifier),
    )


def flask_app(verifier: TokenVerifier) -> Any:
    from flask import Flask, g

    from m2m_client.flask import JWTAuth

    app = Flask("shape_service")
    auth = JWTAuth(app, verifier=verifier, metadata=metadata(verifier))

    @app.get("/public")
    def public() -> Any:
        return {"ok": True}

    @app.get("/protected")
    @auth.require()
    def protected() -> Any:
        return {"subject": g.claims.subject}

    @app.get("/admin")
    @auth.require(roles=["admin"])
    def admin() -> Any:
        return {"subject": g.claims.subject}

    @app.get("/items")
    @auth.require(scopes="read:items")
    def items() -> Any:
        return {"subject": g.claims.subject}

    @app.get("/public-admin")
    @auth.require(roles=["admin"])
    def public_admin() -> Any:
        return {"subject": g.claims.subject}

    return app


_django_ready = False


def django_setup() -> None:
    """Configure Django once for this test process (settings are global)."""
    global _django_ready
    if _django_ready:
        return
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="test-only",
            ROOT_URLCONF="tests.unit._django_urls",
            ALLOWED_HOSTS=["testserver", "127.0.0.1", "localhost"],
            MIDDLEWARE=["m2m_client.django.JWTMiddleware"],
            INSTALLED_APPS=[],
            M2M_PUBLIC_PATHS=["/public", "/public-admin"],
        )
    django.setup()
    _django_ready = True


@contextmanager
def django_settings(verifier: TokenVerifier) -> Iterator[None]:
    django_setup()
    from django.test.utils import override_settings

    with override_settings(M2M_VERIFIER=verifier, M2M_RESOURCE_METADATA=metadata(verifier)):
        yield


def fold(headers: list[tuple[str, str]]) -> dict[str, str]:
    """What a WSGI server does with repeated headers: one value, joined by commas."""
    folded: dict[str, str] = {}
    for name, value in headers:
        folded[name] = f"{folded[name]},{value}" if name in folded else value
    return folded


class TestService:
    """One framework's service behind its own test client."""

    __test__ = False

    def __init__(self, framework: str, sync: TokenVerifier, async_: AsyncTokenVerifier) -> None:
        self.framework = framework
        self._exit: Any = None
        if framework in ("fastapi", "asgi"):
            from starlette.testclient import TestClient

            app = fastapi_app(async_) if framework == "fastapi" else starlette_app(async_)
            self._client: Any = TestClient(app, raise_server_exceptions=False)
            self.base = "http://testserver"
        elif framework == "flask":
            self._client = flask_app(sync).test_client()
            self.base = "http://localhost"
        else:
            from django.test import Client

            self._exit = django_settings(sync)
            self._exit.__enter__()
            self._client = Client()
            self.base = "http://testserver"

    def close(self) -> None:
        if self._exit is not None:
            self._exit.__exit__(None, None, None)

    def get(self, path: str, headers: list[tuple[str, str]] = ()) -> Answer:  # type: ignore[assignment]
        if self.framework in ("fastapi", "asgi"):
            # Bytes, as a server hands them over: latin-1 values (RFC 9110 obs-text) too.
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            response = self._client.get(path, headers=raw)
            return Answer(
                response.status_code,
                {k.lower(): v for k, v in response.headers.items()},
                response.json(),
            )
        if self.framework == "flask":
            response = self._client.get(path, headers=fold(list(headers)))
            return Answer(
                response.status_code,
                {k.lower(): v for k, v in response.headers.items()},
                response.get_json(),
            )
        response = self._client.get(path, headers=fold(list(headers)))
        return Answer(
            response.status_code,
            {k.lower(): v for k, v in response.items()},
            response.json(),
        )


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    """A real threaded WSGI server (wsgiref) on 127.0.0.1; yields its base URL."""
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
