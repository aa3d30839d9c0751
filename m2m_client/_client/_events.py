"""What a token client reports: events to the user's ``on_event`` hook, OpenTelemetry
metrics and spans, and the running counters. Nothing here decides anything."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from m2m_client._ratelimit import RateLimit
from m2m_client._telemetry import Telemetry, resolve
from m2m_client._token import AccessToken, CacheKey

__all__ = ["EventKind", "Reporter", "TokenClientStats", "TokenEvent", "TokenSummary"]

logger = logging.getLogger("m2m_client")

EventKind = Literal[
    "token_fetched",
    "token_fetch_failed",
    "token_refresh_started",
    "token_refresh_failed",
    "token_invalidated",
    "retry",
    "negative_cache_hit",
    "discovery_completed",
    "shared_cache",
    "rate_limited",
]


class TokenSummary(NamedTuple):
    """What an event says about a token: enough to correlate, never the token itself."""

    fingerprint: str
    expires_at: float
    scope: str | None

    @classmethod
    def of(cls, token: AccessToken) -> TokenSummary:
        return cls(token.fingerprint, token.expires_at, token.scope)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """What a client reports to ``on_event`` (for metrics). Never holds a secret.

    ``token`` is a :class:`TokenSummary` (fingerprint, expiry, scope), so even
    ``dataclasses.asdict(event)`` cannot expose the token; ``error`` is the exception's
    type and message. ``shared_cache`` events name in ``detail`` the shared cache's counter
    that moved (``shared_hits``, ``leases_won``, ``breaker_opened`` ...). ``rate_limited``:
    the token endpoint answered 429 or 503 with a wait (``Retry-After`` or rate-limit
    headers); ``rate_limit`` holds what was read, ``delay`` the wait in seconds, ``detail``
    a one-line summary.
    """

    kind: EventKind
    audience: str | None = None
    scopes: tuple[str, ...] = ()
    attempt: int | None = None
    delay: float | None = None
    error: str | None = None
    token: TokenSummary | None = None
    detail: str | None = None
    rate_limit: RateLimit | None = None


@dataclass(slots=True)
class TokenClientStats:
    """Running counters of one client (read them for metrics or in tests)."""

    token_requests: int = 0
    tokens_fetched: int = 0
    fetch_failures: int = 0
    refresh_failures: int = 0
    retries: int = 0
    shared: object | None = None
    """The shared cache's own counters (``RedisTokenCache.stats``), when one is used."""


class Reporter:
    """Where one client's events go: ``on_event`` and, once resolved, OpenTelemetry.

    The providers are resolved at the first slow-path call (:meth:`resolve`), not at
    construction, so an app that configures its SDK after creating clients at import time
    is still seen.
    """

    __slots__ = ("on_event", "providers", "telemetry")

    def __init__(
        self,
        on_event: Callable[[TokenEvent], object] | None,
        meter_provider: object | None,
        tracer_provider: object | None,
    ) -> None:
        self.on_event = on_event
        self.telemetry: Telemetry | None = None
        self.providers: tuple[object | None, object | None] | None = (
            meter_provider,
            tracer_provider,
        )

    def emit(self, kind: EventKind, key: CacheKey, fields: dict[str, Any]) -> None:
        """Tell OpenTelemetry and ``on_event``; a broken hook never breaks token fetching."""
        source = fields.pop("source", None)
        telemetry = self.telemetry
        if telemetry is not None:
            telemetry.client_event(kind, fields, source)
        if self.on_event is None:
            return
        try:
            self.on_event(TokenEvent(kind, key.audience, key.scopes, **fields))
        except Exception:
            logger.exception("m2m_client: on_event hook raised on %s", kind)

    def resolve(self) -> Telemetry | None:
        """Resolve the OpenTelemetry providers (once; ``None`` without an SDK)."""
        providers = self.providers
        if providers is not None:
            self.providers = None
            self.telemetry = resolve(*providers)
        return self.telemetry

    def acquired(self, outcome: str, started: float) -> None:
        """Record one ``get_token`` that took the slow path (``started``: perf_counter)."""
        telemetry = self.telemetry
        if telemetry is not None:
            telemetry.acquired(outcome, time.perf_counter() - started)

    def fetch_span(self, link: object = None) -> AbstractContextManager[None]:
        """The span of one flight (a no-op without a tracer)."""
        telemetry = self.telemetry
        return nullcontext() if telemetry is None else telemetry.fetch_span(link)

    def span_link(self) -> object:
        """The caller's span, for the span of a background refresh it starts."""
        telemetry = self.telemetry
        return None if telemetry is None else telemetry.link()
