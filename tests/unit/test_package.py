"""The package's public face: lazy imports (PEP 562) that keep __all__, dir() and typing."""

from __future__ import annotations

import subprocess
import sys

import pytest

import m2m_client


def test_every_public_name_resolves_to_the_object_its_module_defines() -> None:
    import m2m_client._auth
    import m2m_client.errors

    assert m2m_client.BearerAuth is m2m_client._auth.BearerAuth
    assert m2m_client.ConfigurationError is m2m_client.errors.ConfigurationError
    for name in m2m_client.__all__:
        assert getattr(m2m_client, name) is not None, name


def test_all_lists_exactly_the_lazy_exports_and_dir_shows_them() -> None:
    assert set(m2m_client.__all__) == {*m2m_client._EXPORTS, "__version__"}
    assert set(m2m_client.__all__) <= set(dir(m2m_client))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        _ = m2m_client.NoSuchThing  # type: ignore[attr-defined]


def test_importing_the_package_loads_no_dependency_until_a_name_is_used() -> None:
    code = (
        "import sys, m2m_client; "
        "before = sorted(m for m in ('httpx', 'pydantic', 'jwt', 'tenacity') if m in sys.modules); "
        "from m2m_client import TokenClient; "
        "after = sorted(m for m in ('httpx', 'pydantic') if m in sys.modules); "
        "print(before, after)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    # The HTTP stack (httpx; httpx2 without it) is imported when first needed.
    assert output.strip() == "[] ['pydantic']"


def test_star_import_gives_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from m2m_client import *", namespace)
    assert "TokenClient" in namespace
    assert "ClientCredentials" in namespace
