"""RFC 9728 protected resource metadata, the calling side: an API's issuer from its URL alone.

An API protected by this package (or any RFC 9728 server) publishes which authorization
servers issue its tokens at ``/.well-known/oauth-protected-resource``. Reading it is easy;
believing it is the hard part, so the rules live here, in one place:

* The metadata URL is built from the resource identifier (§3.1: the well-known path goes
  between the host and the resource's path), fetched through the package's one HTTP layer
  (URL policy, no redirects, bounded body, a deadline per attempt, the retry policy), and the
  document's ``resource`` must be the identifier it was built from (§3.3; only ``""`` and
  ``"/"`` as the whole path count as the same). Anyone who can serve a document elsewhere on
  the host, or at another host, cannot make it speak for this API.
* The document is the API's word, not the caller's: an API (or whoever took over its name)
  that lists an authorization server of its choosing would otherwise receive the client
  secret or assertion (§7.3, §7.6). So credentials are built for an issuer only if the
  caller listed it in ``trusted_issuers`` (exact string match, https except loopback); the
  token client then checks that issuer's own metadata names it (``_discovery``) before
  any credential is sent.
* The resource identifier becomes the token request's ``resource`` or ``audience`` only if
  the caller asks (``send_resource_as``): authorization servers differ in which one they
  accept, and some refuse a parameter they do not know.

Sans-IO where it can be (building the URL, reading the answer, choosing the issuer); the two
public fetchers only drive :class:`~m2m_client._http.SyncDriver` / ``AsyncDriver``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import urlsplit

import anyio
import tenacity

from ._discovery import MAX_METADATA_BYTES, metadata_request
from ._http import HttpAnswer, async_driver, sync_driver
from ._retry import RetryPolicy, TransientFailure, parse_retry_after
from ._urls import PROTECTED_RESOURCE_WELL_KNOWN, check_url, well_known_url
from .errors import ConfigurationError, ResourceMetadataError, UntrustedIssuer

if TYPE_CHECKING:
    from .config import ClientCredentials

__all__ = [
    "ResourceMetadata",
    "adiscover_resource",
    "discover_resource",
    "interpret_resource_metadata",
    "resource_metadata_url",
]

logger = logging.getLogger("m2m_client")

WELL_KNOWN = PROTECTED_RESOURCE_WELL_KNOWN
MAX_ATTEMPTS = 3
"""Requests per discovery at most (transport errors, timeouts, 5xx and 429 are retried)."""
_SHOWN = 200  # characters of a document's value shown in a message

# RFC 9728 §2: the members whose JSON type is fixed. A wrong type is a broken (or hostile)
# document, refused as a whole rather than half-read.
_STRINGS = (
    "resource",
    "jwks_uri",
    "resource_name",
    "resource_documentation",
    "resource_policy_uri",
    "resource_tos_uri",
    "signed_metadata",
)
_STRING_LISTS = (
    "authorization_servers",
    "scopes_supported",
    "bearer_methods_supported",
    "resource_signing_alg_values_supported",
    "authorization_details_types_supported",
    "dpop_signing_alg_values_supported",
)
_BOOLEANS = ("tls_client_certificate_bound_access_tokens", "dpop_bound_access_tokens_required")


def _shown(value: str) -> str:
    # ascii(): a look-alike host (a Cyrillic letter a, U+0430) shows as \u0430, not as "a".
    return ascii(value[:_SHOWN])


def _check_resource(resource: object) -> str:
    try:
        return check_url(resource, what="the resource identifier")
    except ValueError as exc:
        raise ConfigurationError(f"{exc} (e.g. https://api.example.com)") from None


def resource_metadata_url(resource: str) -> str:
    """Where ``resource``'s metadata is published (RFC 9728 §3.1).

    The well-known path goes between the host and the path (and query):
    ``https://api.example.com/v1`` -> ``https://api.example.com/.well-known/oauth-protected-resource/v1``.
    Only a path that is just ``/`` is dropped (§3.1's "terminating slash following the host").
    """
    return well_known_url(_check_resource(resource), WELL_KNOWN)


def _same_resource(found: str, expected: str) -> bool:
    """§3.3: identical -- except that ``https://h`` and ``https://h/`` are one URI (RFC 3986
    §6.2.3) with one metadata URL; our own servers publish the form without the slash."""
    if found == expected:
        return True
    parts = urlsplit(expected)
    if parts.path not in ("", "/") or parts.query:
        return False
    base = expected.rstrip("/")
    return found in (base, f"{base}/")


@dataclass(frozen=True, slots=True)
class ResourceMetadata:
    """An API's RFC 9728 protected resource metadata, checked to be its own.

    ``resource`` is the API's identifier as it publishes it; ``authorization_servers`` the
    issuers it names -- the API's word, not trusted until you say so
    (:meth:`credentials`, :meth:`trusted_issuer`). ``document`` is the whole JSON object,
    read-only, for members not given a field here. ``url``: where it was read.
    """

    resource: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...] | None
    bearer_methods_supported: tuple[str, ...] | None
    dpop_signing_alg_values_supported: tuple[str, ...] | None
    dpop_bound_access_tokens_required: bool
    resource_name: str | None
    url: str
    document: Mapping[str, Any] = field(repr=False, compare=False)

    def trusted_issuer(self, trusted_issuers: str | Iterable[str]) -> str:
        """The first authorization server the API lists that is in ``trusted_issuers``.

        Exact string match (as OIDC compares issuers): ``https://tenant.example.com/`` and
        ``https://tenant.example.com`` differ. Raises :class:`UntrustedIssuer` when none is,
        :class:`ResourceMetadataError` when the API lists none, :class:`ConfigurationError`
        for an empty or invalid ``trusted_issuers``.
        """
        trusted = _trusted(trusted_issuers)
        if not self.authorization_servers:
            raise ResourceMetadataError(
                f"the metadata of {_shown(self.resource)} ({self.url}) names no authorization "
                "server (authorization_servers): configure the issuer instead"
            )
        for issuer in self.authorization_servers:
            if issuer in trusted:
                return issuer
        listed = ", ".join(_shown(s) for s in self.authorization_servers[:5])
        more = len(self.authorization_servers) - 5
        hint = ""
        near = {s.rstrip("/") for s in trusted} & {
            s.rstrip("/") for s in self.authorization_servers
        }
        if near:
            hint = "; they differ only by a trailing slash: list the issuer exactly as published"
        raise UntrustedIssuer(
            f"the API {_shown(self.resource)} names authorization server(s) {listed}"
            + (f" and {more} more" if more > 0 else "")
            + f", none of them in trusted_issuers ({', '.join(sorted(map(_shown, trusted)))})"
            + hint
            + "; no credential was sent. Add the issuer to trusted_issuers only if you "
            "trust it with this client's secret or key",
            authorization_servers=self.authorization_servers,
        )

    def credentials(
        self,
        *,
        trusted_issuers: str | Iterable[str],
        send_resource_as: Literal["resource", "audience"] | None = None,
        **fields: Any,
    ) -> ClientCredentials:
        """:class:`~m2m_client.ClientCredentials` for this API's issuer, if you trust it.

        ``issuer`` is :meth:`trusted_issuer` (the token endpoint comes from that issuer's own
        metadata, whose ``issuer`` must match). ``send_resource_as``: ``"resource"`` sends
        :attr:`resource` as RFC 8707 ``resource``, ``"audience"`` as ``audience`` (Auth0);
        default neither. ``dpop`` defaults to ``dpop_bound_access_tokens_required``.
        ``fields``: every other :class:`~m2m_client.ClientCredentials` field (``client_id``,
        ``client_secret`` or a key, ``scope`` ...)::

            api = discover_resource("https://api.example.com")
            creds = api.credentials(trusted_issuers=["https://tenant.example.com/"],
                                    client_id="worker", client_secret="s3cret")
        """
        from .config import ClientCredentials

        for name in ("issuer", "token_url"):
            if name in fields:
                raise ConfigurationError(
                    f"credentials(): {name} comes from the API's metadata; list the issuers "
                    "you trust in trusted_issuers instead"
                )
        if send_resource_as not in (None, "resource", "audience"):
            raise ConfigurationError(
                f'send_resource_as must be "resource", "audience" or None, not {send_resource_as!r}'
            )
        if send_resource_as is not None:
            if fields.get(send_resource_as) is not None:
                raise ConfigurationError(
                    f"give {send_resource_as}= or send_resource_as={send_resource_as!r}, not both"
                )
            fields[send_resource_as] = self.resource
        if self.dpop_bound_access_tokens_required:
            fields.setdefault("dpop", True)
        return ClientCredentials(issuer=self.trusted_issuer(trusted_issuers), **fields)


def _trusted(trusted_issuers: str | Iterable[str]) -> frozenset[str]:
    # A lone string is one issuer, not a list of characters.
    try:
        items = [trusted_issuers] if isinstance(trusted_issuers, str) else list(trusted_issuers)
    except TypeError:  # None, a number: not a list of issuers
        items = [trusted_issuers]  # type: ignore[list-item]  # refused by check_url below
    if not items:
        raise ConfigurationError(
            "trusted_issuers is empty: list the authorization servers you trust with this "
            "client's credentials (e.g. ['https://tenant.example.com/'])"
        )
    for issuer in items:
        try:
            check_url(issuer, what="each of trusted_issuers")
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    return frozenset(items)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two "resource" members: parsers disagree on which wins (Python's the last, others the
    # first), so a document that means two things to two readers is refused.
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("duplicate member")
    return data


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def interpret_resource_metadata(
    answer: HttpAnswer, *, resource: str, url: str, now: float
) -> ResourceMetadata:
    """Read the answer to the metadata request for ``resource`` (sans-IO).

    Raises :class:`TransientFailure` on 429/5xx (retried) and :class:`ResourceMetadataError`
    for anything else that is not this resource's well-formed document.
    """
    status = answer.status
    if status == 429 or status >= 500:
        raise TransientFailure(
            f"protected resource metadata at {url} answered HTTP {status}",
            retry_after=parse_retry_after(answer.headers.get("retry-after"), now),
        )
    if status != 200:
        raise ResourceMetadataError(
            f"no protected resource metadata at {url} (HTTP {status}): the API does not "
            "publish RFC 9728 metadata there; configure the issuer instead"
        )
    try:
        data = json.loads(
            answer.body, object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise ResourceMetadataError(
            f"protected resource metadata at {url} is not a JSON object (without duplicate members)"
        )
    for name in _STRINGS:
        if name in data and not isinstance(data[name], str):
            raise ResourceMetadataError(
                f"protected resource metadata at {url}: {name} is not a string"
            )
    for name in _STRING_LISTS:
        value = data.get(name)
        if name in data and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise ResourceMetadataError(
                f"protected resource metadata at {url}: {name} is not a list of strings"
            )
    for name in _BOOLEANS:
        if name in data and not isinstance(data[name], bool):
            raise ResourceMetadataError(
                f"protected resource metadata at {url}: {name} is not true or false"
            )
    found = data.get("resource")
    if found is None:
        raise ResourceMetadataError(f"protected resource metadata at {url} has no resource")
    # §3.3 / §7.3: a document that describes another resource must not be used for this one
    # (a shared host, a proxy, a copied document naming its own authorization server).
    if not _same_resource(found, resource):
        raise ResourceMetadataError(
            f"protected resource metadata at {url} is for resource {_shown(found)}, not "
            f"{_shown(resource)}; it is not used (RFC 9728 §3.3). Give the API's identifier "
            "exactly as it publishes it"
        )

    def strings(name: str) -> tuple[str, ...] | None:
        return tuple(data[name]) if name in data else None

    return ResourceMetadata(
        resource=found,
        authorization_servers=strings("authorization_servers") or (),
        scopes_supported=strings("scopes_supported"),
        bearer_methods_supported=strings("bearer_methods_supported"),
        dpop_signing_alg_values_supported=strings("dpop_signing_alg_values_supported"),
        dpop_bound_access_tokens_required=data.get("dpop_bound_access_tokens_required") is True,
        resource_name=data.get("resource_name"),
        url=url,
        document=MappingProxyType(data),
    )


class _Discovery:
    """One discovery's plan: the URL, the deadline, the retries (what both fetchers share)."""

    __slots__ = ("deadline", "resource", "timeout", "url")

    def __init__(self, resource: object, timeout: float) -> None:
        # bool is an int: timeout=True must not mean one second.
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= 300
        ):
            raise ConfigurationError("timeout must be a number of seconds from 0 to 300")
        self.url = resource_metadata_url(resource)  # type: ignore[arg-type]  # checked there
        self.resource = str(resource)
        self.timeout = float(timeout)
        self.deadline = time.monotonic() + self.timeout

    def interpret(self, answer: HttpAnswer) -> ResourceMetadata:
        return interpret_resource_metadata(
            answer, resource=self.resource, url=self.url, now=time.time()
        )

    def retrying(self) -> dict[str, Any]:
        """tenacity arguments: the package's retry policy within this discovery's timeout."""
        policy = RetryPolicy(
            max_attempts=MAX_ATTEMPTS,
            max_total_seconds=self.timeout,
            initial_backoff=0.25,
            max_backoff=2.0,
            max_retry_after=self.timeout,
        )
        url = self.url

        def report(attempt: int, delay: float, error: BaseException | None) -> None:
            logger.info(
                "protected resource metadata request %d to %s failed (%s); retrying in %.2fs",
                attempt,
                url,
                error,
                delay,
            )

        def give_up(exc: tenacity.RetryError) -> NoReturn:
            error = RetryPolicy.exhausted(exc, f"protected resource metadata request to {url}")
            raise ResourceMetadataError(str(error)) from error.last_cause

        return policy.tenacity_kwargs(clock=time.monotonic, on_retry=report, give_up=give_up)


def discover_resource(
    resource: str, *, http_client: object | None = None, timeout: float = 10.0
) -> ResourceMetadata:
    """Fetch and check the RFC 9728 metadata of the API ``resource`` (its identifier, e.g.
    ``https://api.example.com``); see :meth:`ResourceMetadata.credentials` for what next.

    ``http_client``: your ``httpx.Client`` (or ``httpx2.Client``; proxies, mTLS), not
    closed; neither its ``auth`` nor its redirects apply. ``timeout``: seconds for the whole
    discovery, retries included (at most 3 requests). Raises
    :class:`~m2m_client.errors.ResourceMetadataError` (a ``DiscoveryError``) for a missing,
    malformed, oversized or redirected document, or one for another resource.
    """
    plan = _Discovery(resource, timeout)
    driver = sync_driver(
        http_client, timeout=plan.timeout, owner="discover_resource", persistent=False
    )

    def attempt() -> ResourceMetadata:
        answer = driver.send(
            metadata_request(plan.url),
            limit=MAX_METADATA_BYTES,
            refuse=ResourceMetadataError,
            deadline=plan.deadline,
        )
        return plan.interpret(answer)

    result: ResourceMetadata = tenacity.Retrying(sleep=time.sleep, **plan.retrying())(attempt)
    return result


async def adiscover_resource(
    resource: str,
    *,
    http_client: object | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - discover_resource's bound, a deadline in the driver
) -> ResourceMetadata:
    """:func:`discover_resource` for asyncio and trio (``http_client``: an ``AsyncClient``)."""
    plan = _Discovery(resource, timeout)
    driver = async_driver(
        http_client, timeout=plan.timeout, owner="adiscover_resource", persistent=False
    )

    async def attempt() -> ResourceMetadata:
        answer = await driver.send(
            metadata_request(plan.url),
            limit=MAX_METADATA_BYTES,
            refuse=ResourceMetadataError,
            deadline=plan.deadline,
        )
        return plan.interpret(answer)

    retrying = tenacity.AsyncRetrying(sleep=anyio.sleep, **plan.retrying())
    result: ResourceMetadata = await retrying(attempt)
    return result
