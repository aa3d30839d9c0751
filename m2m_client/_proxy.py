"""Proxies and plain http: what crosses a proxy in clear never carries a credential.

An HTTP proxy forwards a plain-http request as it is (RFC 9112 §3.2.2, absolute form): the
client secret in the ``Authorization`` header or the form body, a DPoP proof, the answer's
token and a JWKS a proxy could replace. https goes through a ``CONNECT`` tunnel the proxy
cannot read, so environment proxies (``HTTPS_PROXY``, ``ALL_PROXY``) keep working there.

The URL policy (:mod:`m2m_client._urls`) allows plain http only to loopback and to the hosts
named in ``M2M_INSECURE_HTTP_HOSTS``. So:

* the package's own clients send every plain-http request directly, whatever
  ``HTTP_PROXY`` / ``ALL_PROXY`` say (Go's ``ProxyFromEnvironment`` never proxies loopback
  either; a proxy cannot reach this machine's loopback anyway);
* a caller's own ``http_client`` that would route a plain-http request through a proxy is
  refused with :class:`~m2m_client.errors.ConfigurationError` before anything is sent: its
  proxies are the caller's, so the package does not silently bypass them, but it never lets
  the secret cross one in clear.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._stacks import Stack

__all__ = ["DIRECT_HTTP", "check_route", "own_client"]

DIRECT_HTTP: dict[str, None] = {"http://": None}
"""``mounts=`` for a client of either stack: plain http on the client's own transport (no
proxy). It replaces an environment ``http://`` proxy and, being more specific, wins over an
``all://`` one; https keeps the environment's proxy."""


def own_client(stack: Stack, *, asynchronous: bool, **kwargs: Any) -> Any:
    """A client the package creates for itself (see the module docstring)."""
    cls = stack.AsyncClient if asynchronous else stack.Client
    return cls(mounts=DIRECT_HTTP, **kwargs)


def _proxied(client: object, stack: Stack, url: str) -> bool:
    # httpx 0.28+ and httpx2 2.x alike: the transport the client picks for the URL; a proxy
    # transport holds an httpcore(2) HTTPProxy / SOCKSProxy pool. Read defensively: a
    # client without these (a duck-typed one) is taken at its word.
    pick = getattr(client, "_transport_for_url", None)
    if not callable(pick):
        return False
    try:
        transport = pick(stack.URL(url))
    except Exception:
        return False
    pool = getattr(transport, "_pool", None)
    return pool is not None and any("Proxy" in cls.__name__ for cls in type(pool).__mro__)


def check_route(client: object, stack: Stack, url: str) -> None:
    """Refuse to send a plain-http ``url`` through a proxy of the caller's ``client``."""
    if url[:7].lower() != "http://" or not _proxied(client, stack, url):
        return
    raise ConfigurationError(
        f"your http_client would send {url[:200]!r} through a proxy, which reads plain http "
        "(secrets, tokens, keys): refused; exclude the host (NO_PROXY=localhost,127.0.0.1,::1), "
        'give the client mounts={"http://": None}, or use https'
    )
