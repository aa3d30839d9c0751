"""Where a key set comes from: the configured JWKS URL or discovery, and reading the JWKS.

Sans-IO, like the key set state that drives it: :meth:`KeySource.jwks_url` is a
sub-generator of the refresh flow (it yields the metadata requests of
:class:`~m2m_client._discovery.Discovery`, shared with the token clients).
"""

from __future__ import annotations

import json
from collections.abc import Generator

from m2m_client._discovery import Discovery, metadata_endpoint
from m2m_client._http import HttpAnswer, HttpRequest
from m2m_client._retry import TransientFailure
from m2m_client._urls import check_url
from m2m_client.errors import ConfigurationError, DiscoveryError, KeySetUnavailable

from ._jwks import KeySet, parse_jwks

__all__ = ["Answer", "KeySource", "check_configured_url"]

#: What a shell sends back into a flow: the answer, or the exception its driver raised.
Answer = HttpAnswer | BaseException


class KeySource:
    """The JWKS URL (configured, or discovered and remembered) and the JWKS reader."""

    def __init__(self, jwks_url: str | None, discovery: Discovery) -> None:
        self.configured_url = jwks_url
        self.discovery = discovery

    def jwks_url(self) -> Generator[HttpRequest, Answer, str]:
        if self.configured_url is not None:
            return self.configured_url
        flow = self.discovery.flow()
        try:
            step = next(flow)
            while True:
                answer = yield step.request
                result: object = answer
                if isinstance(answer, HttpAnswer):
                    try:
                        result = step.interpret(answer)
                    except DiscoveryError as exc:
                        if _names_other_issuer(answer, self.discovery.issuer):
                            raise ConfigurationError(f"JWKS discovery: {exc}") from None
                        result = exc
                    except TransientFailure as exc:
                        result = exc
                step = flow.send(result)
        except StopIteration as stop:
            metadata = stop.value
        except DiscoveryError as exc:
            raise KeySetUnavailable(str(exc)) from None
        finally:
            flow.close()
        try:
            return metadata_endpoint(metadata, "jwks_uri", issuer=self.discovery.issuer)
        except DiscoveryError as exc:
            self.discovery.reset()  # rediscover after the back-off: the issuer may fix it
            raise KeySetUnavailable(str(exc)) from None

    def read(self, answer: Answer, url: str) -> KeySet:
        if isinstance(answer, BaseException):
            raise KeySetUnavailable(f"JWKS fetch failed: {answer}")
        if answer.status != 200:
            if self.configured_url is None:
                self.discovery.reset()  # the discovered jwks_uri may have moved
            raise KeySetUnavailable(f"JWKS endpoint {url} answered HTTP {answer.status}")
        try:
            return parse_jwks(answer.body)
        except ValueError as exc:
            raise KeySetUnavailable(f"JWKS at {url}: {exc}") from None


def _names_other_issuer(answer: HttpAnswer, issuer: str) -> bool:
    try:
        document = json.loads(answer.body)
    except (ValueError, RecursionError):
        return False
    return isinstance(document, dict) and document.get("issuer") != issuer


def check_configured_url(value: str | None, what: str) -> str | None:
    """A configured URL checked by the package's URL policy, or ConfigurationError."""
    if value is None:
        return None
    try:
        return check_url(value, what=what)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
