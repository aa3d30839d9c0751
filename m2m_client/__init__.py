"""m2m-client: OAuth 2.0 client-credentials tokens for service-to-service calls."""

from __future__ import annotations

__version__ = "0.1.0"
