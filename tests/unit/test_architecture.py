"""The package's shape, as issue 20 fixed it: checked so that it stays.

No class over 180 lines; the HTTP layer below OAuth in the import graph; one definition each of the
fork registry, the challenge renderer and the JOSE limits. (No 10+ line repeats is checked by
``duplicates`` in review, not here: it is not a Python package we depend on.)
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "m2m_client"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


MODULES = {_module(path): path for path in SOURCES}


def _closure(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        todo.extend(found for found in _imports(MODULES[name]) if found in MODULES)
    return seen


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_class_is_over_180_lines(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text())
    sizes = {
        node.name: node.end_lineno - node.lineno + 1  # type: ignore[operator]
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    }
    assert {name: size for name, size in sizes.items() if size > 180} == {}


def test_the_http_layer_knows_nothing_of_oauth_config_or_pydantic() -> None:
    below = _closure("m2m_client._http")
    assert "m2m_client._http" in below  # the walk itself works
    assert not below & {"m2m_client._oauth", "m2m_client.config"}
    assert not any("pydantic" in found for module in below for found in _imports(MODULES[module]))


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("the fork registry", r"\bos\.register_at_fork\("),
        ("the minimum RSA size", r"^\s*MIN_RSA_BITS\s*[:=]"),
        ("the WWW-Authenticate renderer", r"^def challenge\("),
    ],
)
def test_one_definition_each(what: str, pattern: str) -> None:
    places = [
        str(path.relative_to(PACKAGE))
        for path in SOURCES
        for line in path.read_text().splitlines()
        if re.search(pattern, line)
    ]
    assert len(places) == 1, f"{what}: {places}"


def test_jose_tables_and_limits_are_defined_in_jose_only() -> None:
    pattern = re.compile(
        r"^(MAX_(TOKEN|PROOF|KID|JWKS|HTU|RSA)\w*|MIN_RSA_BITS|(RSA|EC)_(SCHEMES|HASHES|CURVES)|"
        r"RSA_ALGS|SUPPORTED_ALGORITHMS)\s*[:=]"
    )
    places = {
        str(path.relative_to(PACKAGE))
        for path in SOURCES
        for line in path.read_text().splitlines()
        if pattern.search(line)
    }
    assert places == {"_jose.py"}
