"""One URL policy for every URL the package fetches: issuer, discovery, JWKS, token endpoint.

Client secrets travel to the token endpoint and signing keys come from the JWKS URL: over
plain http anyone on the path could read the first or replace the second (and mint tokens the
API accepts). So: https, except on loopback, or on development hosts the operator names in
``M2M_INSECURE_HTTP_HOSTS`` (docker-compose names such as ``keycloak``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import urlsplit

from ._stacks import default as default_stack

__all__ = [
    "INSECURE_HOSTS_VARIABLE",
    "PROTECTED_RESOURCE_WELL_KNOWN",
    "check_url",
    "insecure_http_hosts",
    "is_loopback",
    "well_known_url",
]

INSECURE_HOSTS_VARIABLE = "M2M_INSECURE_HTTP_HOSTS"
_HOST = re.compile(r"[A-Za-z0-9.\-_]{1,253}|[0-9A-Fa-f:.]{2,45}")
_LOOPBACK_NAMES = frozenset({"localhost"})
PROTECTED_RESOURCE_WELL_KNOWN = "/.well-known/oauth-protected-resource"


def well_known_url(resource: str, well_known: str) -> str:
    """Where a resource publishes its ``well_known`` document (RFC 9728 §3.1).

    The well-known path goes between the host and the path (and query):
    ``https://api.example.com/v1`` -> ``https://api.example.com/.well-known/oauth-protected-resource/v1``.
    Only a path that is just ``/`` is dropped (§3.1's "terminating slash following the host"),
    so ``/v1`` and ``/v1/`` are two resources with two documents. The one rule for the client
    that reads the document and the servers that publish it.
    """
    parts = urlsplit(resource)
    path = "" if parts.path == "/" else parts.path
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{well_known}{path}{query}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as in a URL, brackets allowed) names this machine."""
    bare = host.strip("[]").lower()
    if bare in _LOOPBACK_NAMES or bare.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def insecure_http_hosts() -> frozenset[str]:
    """Host names allowed over plain http by ``M2M_INSECURE_HTTP_HOSTS`` (read at each call)."""
    value = os.environ.get(INSECURE_HOSTS_VARIABLE, "")
    return frozenset(h.strip().lower() for h in value.split(",") if h.strip())


def check_url(value: object, *, what: str = "URL") -> str:
    """Return ``value`` if it is an acceptable URL to fetch, else raise ``ValueError``.

    The message names ``what`` and says how to fix it; callers turn it into their own error
    type. Checks the same things httpx would, so no ``httpx.InvalidURL`` surfaces later.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string URL")
    if any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} must not contain spaces or control characters")
    stack = default_stack()  # httpx, else httpx2: both parse URLs alike
    try:
        url = stack.URL(value)
        port = url.port
    except (stack.InvalidURL, ValueError, TypeError) as exc:
        raise ValueError(f"{what} is not a valid URL: {str(exc)[:100]}") from None
    scheme, host = url.scheme, url.raw_host.decode("ascii", "replace")
    if scheme not in ("https", "http") or not host:
        raise ValueError(f"{what} must be an absolute https:// URL, got {value[:200]!r}")
    if not _HOST.fullmatch(host) or (port is not None and not 0 < port < 65536):
        raise ValueError(f"{what} has an invalid host or port: {value[:200]!r}")
    if url.userinfo:
        raise ValueError(f"{what} must not contain a user name or password")
    if url.fragment:
        raise ValueError(f"{what} must not contain a #fragment")
    if scheme == "http" and not is_loopback(host) and host.lower() not in insecure_http_hosts():
        raise ValueError(
            f"{what} must use https:// ({value[:200]!r} is plain http, so anyone on the path "
            f"could read or replace what is sent); plain http is allowed only for loopback "
            f"hosts, or for development hosts listed in {INSECURE_HOSTS_VARIABLE}"
        )
    return value
