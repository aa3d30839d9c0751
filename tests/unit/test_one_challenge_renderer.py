"""Every ``WWW-Authenticate`` value the package sends comes from one renderer.

Issue 20 found two renderers that escaped differently (one percent-encoded, one stripped):
a value escaped one way here and another way there is how a quote or CRLF slips into a
header. ``m2m_client/verify/_www_authenticate.py`` is the one renderer; this test reads the
package's source and fails if a second one appears anywhere else:

1. no string outside the renderer spells a quoted auth-param (``name="``), the part a
   renderer must escape; and
2. wherever a ``WWW-Authenticate`` header is *set* (a dict entry, ``headers[...] = ``, a
   ``(name, value)`` pair, ``headers.add(name, value)``), its value is a call into the
   renderer (a :class:`Challenges` method, ``challenge``/``dpop_challenge``, or the Gate's
   ``no_token_challenge``), or a local name bound only to such calls.

Reading the header (``headers.get("www-authenticate")``) is the calling side's business and
is not a rendering. The scanner is checked on sources holding second renderers, so a scanner
that finds nothing cannot pass for a package that has none.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import m2m_client
from m2m_client.verify._www_authenticate import Challenges

PACKAGE = Path(m2m_client.__file__).parent
RENDERER = PACKAGE / "verify" / "_www_authenticate.py"

_QUOTED_PARAM = re.compile(r'[A-Za-z_][A-Za-z0-9_-]*\s*=\s*\\?"')
_RENDERING = frozenset(
    {name for name in vars(Challenges) if not name.startswith("_")}
    | {"challenge", "dpop_challenge", "no_token_challenge"}
)
_SETTERS = frozenset({"add", "append", "set", "setdefault", "__setitem__", "add_header"})


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
        value = node.value
        return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def _is_header_name(node: ast.AST) -> bool:
    text = _text(node)
    return text is not None and text.strip().lower() == "www-authenticate"


def _renders(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in _RENDERING


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and _text(first.value) is not None:
                found.add(id(first.value))
    return found


def _bound_only_to_renderings(scope: ast.AST, name: str) -> bool:
    """Whether every assignment to ``name`` in ``scope`` is a call into the renderer."""
    values = []
    for node in ast.walk(scope):
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        ) or (
            isinstance(node, (ast.AugAssign, ast.AnnAssign))
            and (isinstance(node.target, ast.Name) and node.target.id == name)
        ):
            values.append(node.value)
    return bool(values) and all(v is not None and _renders(v) for v in values)


def second_renderers(source: str, where: str) -> list[str]:
    """Every place in ``source`` that renders a challenge without the renderer."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    scopes: dict[int, ast.AST] = {}
    for scope in ast.walk(tree):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(scope):
                scopes.setdefault(id(node), scope)
    found = []

    def value_ok(value: ast.AST) -> bool:
        if _renders(value):
            return True
        scope = scopes.get(id(value), tree)
        return isinstance(value, ast.Name) and _bound_only_to_renderings(scope, value.id)

    for node in ast.walk(tree):
        text = _text(node)
        if text is not None and id(node) not in docstrings and _QUOTED_PARAM.search(text):
            found.append(f"{where}:{node.lineno}: a quoted auth-param spelt out")
        pairs: list[tuple[ast.AST, ast.AST]] = []
        if isinstance(node, ast.Dict):
            pairs += [(k, v) for k, v in zip(node.keys, node.values, strict=True) if k is not None]
        elif isinstance(node, ast.Assign):
            pairs += [(t.slice, node.value) for t in node.targets if isinstance(t, ast.Subscript)]
        elif isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) == 2:
            pairs.append((node.elts[0], node.elts[1]))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _SETTERS
            and len(node.args) >= 2
        ):
            pairs.append((node.args[0], node.args[1]))
        for name, value in pairs:
            if _is_header_name(name) and not value_ok(value):
                found.append(f"{where}:{node.lineno}: WWW-Authenticate set from a non-renderer")
    return found


def test_the_package_has_one_challenge_renderer() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != RENDERER:
            found += second_renderers(path.read_text(), str(path.relative_to(PACKAGE)))
    assert found == []


def test_the_receiving_side_sets_challenges_it_renders() -> None:
    # Not vacuous: the shared Gate does set the header, each time from the renderer.
    source = (PACKAGE / "verify" / "_receive.py").read_text()
    assert source.count('"WWW-Authenticate"') >= 4
    assert second_renderers(source, "_receive.py") == []


@pytest.mark.parametrize(
    "source",
    [
        # fastapi.py's old renderer: its own escaping of an error description
        'def f(d):\n    return {"WWW-Authenticate": f\'Bearer error_description="{d}"\'}\n',
        # a header value built by hand, no quoted param in sight
        "def f(r, e):\n    r.headers['www-authenticate'] = 'Bearer error=' + e\n",
        # ASGI raw headers
        "def f(v):\n    return [(b'www-authenticate', v.encode())]\n",
        # a framework's headers object
        "def f(h, e):\n    h.add('WWW-Authenticate', 'DPoP error=%s' % e)\n",
        # a local that is a rendering once and hand-made once
        'def f(c, e):\n    v = c.bearer()\n    if e:\n        v = "Bearer " + e\n'
        '    return {"WWW-Authenticate": v}\n',
        # the testing issuer's Basic challenge, spelt out as it once was
        "X = {'WWW-Authenticate': 'Basic realm=\"LocalIssuer\"'}\n",
    ],
)
def test_the_scanner_finds_a_second_renderer(source: str) -> None:
    assert second_renderers(source, "x.py") != []


@pytest.mark.parametrize(
    "source",
    [
        'def f(self):\n    return {"WWW-Authenticate": self.challenges.bearer()}\n',
        "def f(self, h):\n    h['WWW-Authenticate'] = self.no_token_challenge()\n",
        "def f(c):\n    v = c.dpop('ES256')\n    return [(b'www-authenticate', v)]\n",
        "def f(r):\n    return r.headers.get('www-authenticate')\n",
        'def f(r):\n    """Sends WWW-Authenticate: Bearer error="invalid_token"."""\n',
    ],
)
def test_the_scanner_passes_renderings_and_readings(source: str) -> None:
    assert second_renderers(source, "x.py") == []
