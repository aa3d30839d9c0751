"""m2m-client: OAuth 2.0 client-credentials tokens for service-to-service calls."""

from __future__ import annotations

from ._auth import BearerAuth
from ._client import AsyncTokenClient, TokenClient, TokenClientStats, TokenEvent
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

__version__ = "0.1.0"

__all__ = [
    "AccessToken",
    "AsyncTokenClient",
    "BearerAuth",
    "ClientCredentials",
    "ConfigurationError",
    "DiscoveryError",
    "Freshness",
    "InMemoryTokenCache",
    "InvalidTokenResponse",
    "M2MError",
    "RefreshPolicy",
    "RetryPolicy",
    "TokenCache",
    "TokenClient",
    "TokenClientStats",
    "TokenEndpointError",
    "TokenEndpointUnavailable",
    "TokenError",
    "TokenEvent",
    "__version__",
]
