"""Authorization server metadata discovery, sans-IO, for both sides.

The token clients need ``token_endpoint``, the verifiers ``jwks_uri``; both find them the
same way (OpenID Connect Discovery 1.0, then RFC 8414), with the same issuer check, the
same negative cache and, in the shells, the same single flight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._http import Exchange, HttpAnswer, HttpRequest
from ._retry import TransientFailure, parse_retry_after
from ._urls import check_url
from .errors import DiscoveryError

__all__ = [
    "Discovery",
    "discovery_urls",
    "interpret_metadata",
    "metadata_endpoint",
    "metadata_request",
]

MAX_METADATA_BYTES = 256 * 1024
"""Metadata documents are a few KiB; Keycloak's, the largest seen, about 6 KiB."""


def discovery_urls(issuer: str) -> list[str]:
    """Metadata URLs to try, in order, for ``issuer``.

    OpenID Connect Discovery appends ``/.well-known/openid-configuration`` to the issuer.
    RFC 8414 §3 inserts ``/.well-known/oauth-authorization-server`` between host and path;
    some servers serve it appended like OIDC, so that is tried last.
    """
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    base = issuer.rstrip("/")
    inserted = urlunsplit(
        (parts.scheme, parts.netloc, f"/.well-known/oauth-authorization-server{path}", "", "")
    )
    return list(
        dict.fromkeys(
            [
                f"{base}/.well-known/openid-configuration",
                inserted,
                f"{base}/.well-known/oauth-authorization-server",
            ]
        )
    )


def metadata_request(url: str) -> HttpRequest:
    """The ``GET`` of one metadata URL."""
    return HttpRequest("GET", url, headers={"Accept": "application/json"})


def interpret_metadata(
    status: int, headers: Mapping[str, str], body: bytes, *, issuer: str, url: str, now: float
) -> dict[str, Any] | None:
    """The metadata document from one answer; ``None`` means "not here, try the next URL".

    Raises :class:`TransientFailure` on 429/5xx (the shell may retry) and
    :class:`DiscoveryError` for a document that is not JSON or names another issuer.
    """
    if status == 429 or status >= 500:
        raise TransientFailure(
            f"metadata endpoint {url} answered HTTP {status}",
            retry_after=parse_retry_after(headers.get("retry-after"), now),
        )
    if status != 200:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise DiscoveryError(f"authorization server metadata at {url} is not a JSON object")
    # OIDC Discovery §4.3 / RFC 8414 §3.3: the issuer must match exactly, or whoever controls
    # a metadata document could send our credentials to their token endpoint, or have us
    # trust their keys. A mismatch is a configuration error: say both values.
    found = data.get("issuer")
    if found != issuer:
        shown = found[:200] if isinstance(found, str) else type(found).__name__
        raise DiscoveryError(
            f"metadata at {url} is for issuer {shown!r}, not the configured issuer {issuer!r}; "
            "set the issuer to exactly the value the server publishes (trailing slash included)"
        )
    return data


def metadata_endpoint(metadata: Mapping[str, Any], name: str, *, issuer: str) -> str:
    """``metadata[name]`` (``token_endpoint``, ``jwks_uri``) checked by the URL policy."""
    value = metadata.get(name)
    if not isinstance(value, str):
        raise DiscoveryError(f"metadata for issuer {issuer!r} has no {name}")
    try:
        return check_url(value, what=f"the discovered {name}")
    except ValueError as exc:
        raise DiscoveryError(f"metadata for issuer {issuer!r}: {exc}") from None


class Discovery:
    """Discovery state for one issuer: the metadata once found, and the negative cache.

    Shells run :meth:`flow` under their own lock, so concurrent callers share one
    discovery; a failure is remembered for ``negative_seconds`` (monotonic time) so callers
    do not repeat it in a tight loop.
    """

    __slots__ = ("_failure", "clock", "issuer", "metadata", "monotonic", "negative_seconds")

    def __init__(
        self,
        issuer: str,
        *,
        negative_seconds: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.clock = clock
        self.negative_seconds = negative_seconds
        self.monotonic = monotonic
        self.metadata: dict[str, Any] | None = None
        self._failure: tuple[DiscoveryError, float] | None = None

    def __repr__(self) -> str:
        return f"Discovery(issuer={self.issuer!r}, found={self.metadata is not None})"

    def check_negative(self) -> None:
        """Raise a copy of the last failure while it is negative-cached."""
        if self._failure is not None:
            error, until = self._failure
            if self.monotonic() < until:
                raise DiscoveryError(str(error))
            self._failure = None

    def reset(self) -> None:
        """Forget the metadata and the failure (rediscover on the next flow)."""
        self.metadata, self._failure = None, None

    def flow(self) -> Generator[Exchange[dict[str, Any] | None], object, dict[str, Any]]:
        """Yield one :class:`~m2m_client._http.Exchange` per URL; receive its result or the
        shell's exception.

        The shell sends back ``exchange.interpret(answer)`` (a dict, or ``None`` for "not here"),
        or the exception it ended with (after its own retries, if any). A
        :class:`DiscoveryError` (issuer mismatch, not JSON) ends the flow at once. Returns the
        metadata; on failure records the negative cache and raises :class:`DiscoveryError`
        naming every URL tried and why.
        """
        if self.metadata is not None:
            return self.metadata
        self.check_negative()
        problems: list[str] = []
        try:
            for url in discovery_urls(self.issuer):
                result = yield Exchange(metadata_request(url), self._interpreter(url))
                if isinstance(result, DiscoveryError):
                    raise result
                if isinstance(result, dict):
                    self.metadata = result
                    return result
                problems.append(f"{url}: {result if result is not None else 'not found'}")
            raise DiscoveryError(
                f"no authorization server metadata found for issuer {self.issuer!r} ("
                + "; ".join(problems)
                + ")"
            )
        except DiscoveryError as exc:
            self._failure = (exc, self.monotonic() + self.negative_seconds)
            raise

    def _interpreter(self, url: str) -> Callable[[HttpAnswer], dict[str, Any] | None]:
        def interpret(answer: HttpAnswer) -> dict[str, Any] | None:
            if answer.status != 200 and answer.status != 429 and answer.status < 500:
                return None
            return interpret_metadata(
                answer.status,
                answer.headers,
                answer.body,
                issuer=self.issuer,
                url=url,
                now=self.clock(),
            )

        return interpret
