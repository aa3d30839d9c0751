"""RFC 9728 OAuth 2.0 Protected Resource Metadata: the document, its URL, the challenge link."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from m2m_client._urls import PROTECTED_RESOURCE_WELL_KNOWN, well_known_url
from m2m_client.errors import ConfigurationError

from ._claims import names
from ._verifier import AsyncTokenVerifier, TokenVerifier

__all__ = ["WELL_KNOWN", "MetadataRoute", "metadata_url", "protected_resource_metadata"]

WELL_KNOWN = PROTECTED_RESOURCE_WELL_KNOWN
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _resource(resource: object) -> str:
    """RFC 9728 §1.2: an https URL without a fragment (http only for loopback, in tests)."""
    if not isinstance(resource, str) or not resource:
        raise ConfigurationError("resource must be the API's URL, e.g. https://api.example.com")
    parts = urlsplit(resource)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment:
        raise ConfigurationError("resource must be an https URL without a fragment")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ConfigurationError("resource must use https (http only on loopback, for tests)")
    if parts.query:
        # §3.1 forbids a query in the metadata URL built from it; keep the two in step.
        raise ConfigurationError("resource must not have a query component")
    return resource


def metadata_url(resource: str) -> str:
    """Where the metadata of ``resource`` is served (RFC 9728 §3.1): the well-known path
    inserted between the host and the resource's path, by the rule clients read it with."""
    return well_known_url(_resource(resource), WELL_KNOWN)


def protected_resource_metadata(
    *,
    resource: str,
    authorization_servers: Iterable[str] | None = None,
    scopes_supported: Iterable[str] | None = None,
    verifier: AsyncTokenVerifier | TokenVerifier | None = None,
    dpop_signing_alg_values_supported: Iterable[str] | None = None,
    dpop_bound_access_tokens_required: bool | None = None,
    resource_name: str | None = None,
    resource_documentation: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The RFC 9728 §2 document describing this API, ready to serve as JSON.

    ``resource``: the API's identifier (usually the token ``audience``), an https URL.
    ``verifier``: fills in what it knows -- its issuer as the authorization server, and
    the DPoP fields from its ``dpop`` policy (algorithms, whether DPoP is required).
    ``bearer_methods_supported`` is ``["header"]``: tokens are read from the
    ``Authorization`` header only. ``extra``: further members of the document.

    >>> protected_resource_metadata(resource="https://api.example.com", verifier=verifier,
    ...                             scopes_supported=["read:items"])
    """
    document: dict[str, Any] = {"resource": _resource(resource)}
    servers = list(
        names(authorization_servers, "authorization_servers")
        if authorization_servers is not None
        else ()
    )
    if verifier is not None and not servers:
        servers = [verifier.issuer]
    if servers:
        document["authorization_servers"] = servers
    if scopes_supported is not None:
        document["scopes_supported"] = list(names(scopes_supported, "scopes_supported"))
    document["bearer_methods_supported"] = ["header"]
    if verifier is not None and verifier.dpop != "disabled":
        algs = dpop_signing_alg_values_supported or sorted(
            verifier.dpop_checker.settings.algorithms
        )
        document["dpop_signing_alg_values_supported"] = list(algs)
        if dpop_bound_access_tokens_required is None:
            dpop_bound_access_tokens_required = verifier.dpop == "required"
    elif dpop_signing_alg_values_supported is not None:
        document["dpop_signing_alg_values_supported"] = list(dpop_signing_alg_values_supported)
    if dpop_bound_access_tokens_required is not None:
        document["dpop_bound_access_tokens_required"] = bool(dpop_bound_access_tokens_required)
    if resource_name is not None:
        document["resource_name"] = resource_name
    if resource_documentation is not None:
        document["resource_documentation"] = resource_documentation
    document.update(extra)
    return document


class MetadataRoute:
    """What an integration needs to serve a metadata document: its path, URL and bytes."""

    __slots__ = ("body", "path", "url")

    def __init__(self, document: dict[str, Any]) -> None:
        if not isinstance(document, dict) or "resource" not in document:
            raise ConfigurationError(
                "metadata must be a protected_resource_metadata(...) document (with 'resource')"
            )
        self.url = metadata_url(document["resource"])
        self.path = urlsplit(self.url).path
        self.body = json.dumps(document).encode()
