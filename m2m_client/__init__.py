"""m2m-client: OAuth 2.0 client-credentials tokens for service-to-service calls.

The public names below are imported on first use (PEP 562), so ``import m2m_client`` (and the
pytest plugin, loaded in every pytest run) costs almost nothing until a client is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._auth import BearerAuth
    from ._client import (
        AsyncTokenClient,
        TokenClient,
        TokenClientStats,
        TokenEvent,
        TokenSummary,
    )
    from ._dpop import DPoPKey
    from ._ratelimit import RateLimit
    from ._resource import ResourceMetadata, adiscover_resource, discover_resource
    from ._retry import RetryPolicy
    from ._token import AccessToken, Freshness, InMemoryTokenCache, RefreshPolicy, TokenCache
    from .config import ClientCredentials
    from .errors import (
        ConfigurationError,
        DiscoveryError,
        InvalidTokenResponse,
        M2MError,
        TokenEndpointError,
        TokenEndpointUnavailable,
        TokenError,
    )
    from .verify._metadata import protected_resource_metadata

__version__ = "0.1.0"

# public name -> the module that defines it (keep in step with the TYPE_CHECKING imports).
_EXPORTS: dict[str, str] = {
    "AccessToken": "._token",
    "AsyncTokenClient": "._client",
    "BearerAuth": "._auth",
    "ClientCredentials": ".config",
    "ConfigurationError": ".errors",
    "DiscoveryError": ".errors",
    "DPoPKey": "._dpop",
    "Freshness": "._token",
    "InMemoryTokenCache": "._token",
    "InvalidTokenResponse": ".errors",
    "M2MError": ".errors",
    "RateLimit": "._ratelimit",
    "RefreshPolicy": "._token",
    "ResourceMetadata": "._resource",
    "RetryPolicy": "._retry",
    "TokenCache": "._token",
    "TokenClient": "._client",
    "TokenClientStats": "._client",
    "TokenEndpointError": ".errors",
    "TokenEndpointUnavailable": ".errors",
    "TokenError": ".errors",
    "TokenEvent": "._client",
    "TokenSummary": "._client",
    "adiscover_resource": "._resource",
    "discover_resource": "._resource",
    "protected_resource_metadata": ".verify._metadata",
}

# Literal, not computed, so that type checkers and IDEs read it.
__all__ = [
    "AccessToken",
    "AsyncTokenClient",
    "BearerAuth",
    "ClientCredentials",
    "ConfigurationError",
    "DiscoveryError",
    "DPoPKey",
    "Freshness",
    "InMemoryTokenCache",
    "InvalidTokenResponse",
    "M2MError",
    "RateLimit",
    "RefreshPolicy",
    "ResourceMetadata",
    "RetryPolicy",
    "TokenCache",
    "TokenClient",
    "TokenClientStats",
    "TokenEndpointError",
    "TokenEndpointUnavailable",
    "TokenError",
    "TokenEvent",
    "TokenSummary",
    "adiscover_resource",
    "discover_resource",
    "protected_resource_metadata",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
