"""Test and demo tools: a local authorization server and a pytest plugin.

Nothing here is meant for production. :class:`LocalIssuer` lets you run the whole
client-credentials flow, and test a protected service, without an identity-provider account;
the pytest plugin (``m2m_client.testing.pytest_plugin``, loaded automatically) gives you
fixtures built on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from m2m_client.testing._issuer import IssuerResponse, LocalIssuer
    from m2m_client.testing._projected import ProjectedTokenFile

__all__ = ["IssuerResponse", "LocalIssuer", "ProjectedTokenFile"]


def __getattr__(name: str) -> Any:
    # Lazy: the pytest plugin imports this package in every pytest run of every user; the
    # issuer (cryptography, key generation) is only loaded when a fixture needs it.
    if name == "ProjectedTokenFile":
        from m2m_client.testing import _projected

        return _projected.ProjectedTokenFile
    if name in __all__:
        from m2m_client.testing import _issuer

        return getattr(_issuer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
