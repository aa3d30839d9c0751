"""The integrations use the verifiers' public seam, never their private members.

FastAPI's ``JWTBearer``, the ASGI middleware, Flask, Django and the ``Gate`` they share once
reached into ``_cached_bearer``, ``_verify_cached`` and ``_core.clock``: a rename inside the
verifier would break them silently (an ``AttributeError`` per request, a 500). They now call
``cached_bearer``, ``verify_cached`` and ``now``, documented methods of the verifiers.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import m2m_client
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier

PACKAGE = Path(m2m_client.__file__).parent
INTEGRATIONS = ["fastapi.py", "asgi.py", "flask.py", "django.py", "verify/_receive.py"]
# Werkzeug's documented LocalProxy accessor, and our own attribute on flask.g.
_NOT_OURS = frozenset({"_get_current_object", "_m2m_client_verified"})


def private_reaches(source: str) -> list[str]:
    """``x._name`` where ``x`` is not ``self``/``cls``: another object's private member."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.attr not in _NOT_OURS
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("name", INTEGRATIONS)
def test_an_integration_reaches_into_no_private_member(name: str) -> None:
    assert private_reaches((PACKAGE / name).read_text()) == []


def test_the_check_sees_a_reach_through_an_attribute() -> None:
    source = "def f(self, v, t):\n    self.verifier._cached_bearer(t)\n    v._core.clock()\n"
    assert len(private_reaches(source)) == 2
    assert private_reaches("def f(self):\n    self._gate.missing()\n") == []


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (TokenVerifier, "cached_bearer"),
        (AsyncTokenVerifier, "cached_bearer"),
        (TokenVerifier, "verify_cached"),
        (TokenVerifier, "now"),
        (AsyncTokenVerifier, "now"),
    ],
)
def test_the_seam_is_public_and_documented(cls: type, name: str) -> None:
    method = getattr(cls, name)
    assert not inspect.iscoroutinefunction(method)  # no await on the hot path
    assert (method.__doc__ or "").strip()
