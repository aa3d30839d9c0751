"""The HTTP requests a flight makes (discovery, then the token request), and their retries.

Sans-IO: an :class:`Exchange` says what to send and what the answer means; the shells send
it through their I/O driver, re-sending on transient failures under one deadline per flight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, NoReturn, TypeVar

import tenacity

from m2m_client._discovery import MAX_METADATA_BYTES, Discovery, metadata_endpoint
from m2m_client._dpop import token_endpoint_nonce_challenge
from m2m_client._http import HttpAnswer
from m2m_client._oauth import MAX_BODY_BYTES, TokenRequest, interpret_token_response
from m2m_client._retry import RetryPolicy, TransientFailure
from m2m_client._token import AccessToken, CacheKey
from m2m_client.errors import (
    DiscoveryError,
    InvalidTokenResponse,
    M2MError,
    TokenEndpointUnavailable,
)

from ._decisions import _ClientCore, describe

__all__ = ["Exchange", "discovery_steps", "retry_kwargs", "token_exchange"]

logger = logging.getLogger("m2m_client")

T = TypeVar("T")


class Exchange(Generic[T]):
    """One HTTP request a flight needs; a shell sends it, re-sending on transient failures.

    ``build(now)`` makes the request at each attempt (a private_key_jwt assertion is
    single-use); ``interpret(answer, sent_at)`` turns the answer into the result or raises.
    ``again(answer)``, when set, sees every answer first; ``True`` means send a freshly
    built request at once, within the same attempt, at most once (a DPoP nonce challenge).
    """

    __slots__ = (
        "again",
        "aprepare",
        "build",
        "interpret",
        "limits",
        "prepare",
        "unavailable",
        "what",
    )

    def __init__(
        self,
        what: str,
        build: Callable[[float], TokenRequest],
        interpret: Callable[[HttpAnswer, float], T],
        *,
        refuse: type[M2MError],
        limit: int,
        unavailable: Callable[[TokenEndpointUnavailable], M2MError] | None = None,
        again: Callable[[HttpAnswer], bool] | None = None,
    ) -> None:
        self.what, self.build, self.interpret, self.again = what, build, interpret, again
        self.limits: dict[str, Any] = {"limit": limit, "refuse": refuse}
        self.unavailable = unavailable
        # A credential from a file or a source (issue 21): read (if changed) before each
        # request; after an invalid_client answer, read again and, if it changed, re-send once.
        self.prepare: Callable[[float, bool], bool] | None = None
        self.aprepare: Callable[[float, bool], Awaitable[bool]] | None = None


def token_exchange(core: _ClientCore, key: CacheKey, token_url: str) -> Exchange[AccessToken]:
    """The token request for ``key``; the one place it is built (DPoP adds its proof here)."""
    dpop = core.dpop

    def build(now: float) -> TokenRequest:
        core.stats.token_requests += 1
        request = core.authenticator.token_request(
            token_url, audience=key.audience, resource=key.resource, scopes=key.scopes, now=now
        )
        if dpop is not None:
            # RFC 9449 §5: a proof for POST <token endpoint>, no ath; the server's last nonce.
            nonce = core.nonces.get(token_url)
            request.headers["DPoP"] = dpop.proof("POST", token_url, now=now, nonce=nonce)
        return request

    def interpret(answer: HttpAnswer, sent_at: float) -> AccessToken:
        try:
            token = interpret_token_response(
                answer.status,
                answer.headers,
                answer.body,
                sent_at=sent_at,
                now=core.clock(),
                policy=core.refresh,
                rng=core.rng,
                dpop=dpop is not None,
            )
        except TransientFailure as exc:
            if exc.rate_limit is not None:  # operators see what the server said, as read
                limited = exc.rate_limit
                logger.warning("token endpoint rate limit: %s", limited.describe())
                core.emit(
                    "rate_limited",
                    key,
                    delay=limited.wait,
                    detail=f"HTTP {answer.status}: {limited.describe()}",
                    rate_limit=limited,
                )
            raise
        if dpop is not None and token.token_type != "DPoP":
            # RFC 9449 §5: a server that does not support DPoP may ignore the proof. The
            # token still works, as a bearer token: we present it as one, and say so.
            logger.warning(
                "the token endpoint answered token_type Bearer to a DPoP proof: the token is "
                "not bound to the DPoP key and will be sent as a bearer token"
            )
        return token

    def again(answer: HttpAnswer) -> bool:
        # RFC 9449 §8.2: the server may send a new nonce with any answer; keep the latest.
        nonce = answer.headers.get("dpop-nonce")
        core.nonces.update(token_url, nonce)
        if answer.status != 400:
            return False
        error = _oauth_error_code(answer.body)
        return token_endpoint_nonce_challenge(answer.status, error, nonce) is not None

    exchange = Exchange(
        "token request",
        build,
        interpret,
        refuse=InvalidTokenResponse,
        limit=MAX_BODY_BYTES,
        again=again if dpop is not None else None,
    )
    authenticator = core.authenticator
    if authenticator.dynamic:
        exchange.prepare = lambda now, reload: authenticator.prepare(now, reload=reload)
        exchange.aprepare = lambda now, reload: authenticator.aprepare(now, reload=reload)
    return exchange


def _oauth_error_code(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) else None


def discovery_steps(
    discovery: Discovery,
) -> Generator[Exchange[dict[str, Any] | None], dict[str, Any] | M2MError | None, str]:
    """Run ``discovery``'s flow: yield each metadata request, return the token endpoint.

    Receives each result, or the error the shell got after its retries (the flow then tries
    the next URL). Raises :class:`DiscoveryError`, negative-cached by ``discovery``, so
    callers for every cache key share one failed discovery.
    """
    flow = discovery.flow()
    result: object = None
    try:
        while True:
            step = flow.send(result)
            result = yield Exchange(
                "metadata request",
                lambda now, r=step.request: r,  # type: ignore[misc]
                lambda answer, sent_at, read=step.interpret: read(answer),  # type: ignore[misc]
                refuse=DiscoveryError,
                limit=MAX_METADATA_BYTES,
            )
    except StopIteration as done:
        metadata = done.value
    except DiscoveryError as exc:
        if str(exc).startswith("no authorization server metadata"):
            raise DiscoveryError(f"{exc}; set token_url instead") from None
        raise
    return metadata_endpoint(metadata, "token_endpoint", issuer=discovery.issuer)


def retry_kwargs(
    core: _ClientCore, key: CacheKey, step: Exchange[Any], started: float
) -> dict[str, Any]:
    """``tenacity.Retrying``/``AsyncRetrying`` arguments for ``step`` (the shell adds sleep).

    ``started`` (core.monotonic) is the flight's start: discovery and the token request share
    one ``max_total_seconds`` budget.
    """

    def report(attempt: int, delay: float, error: BaseException | None) -> None:
        core.stats.retries += 1
        logger.info(
            "%s attempt %d failed (%s); retrying in %.2fs",
            step.what,
            attempt,
            describe(error),
            delay,
        )
        core.emit("retry", key, attempt=attempt, delay=delay, error=describe(error))

    def give_up(exc: tenacity.RetryError) -> NoReturn:
        error = RetryPolicy.exhausted(exc, step.what)
        if error.last_cause is not None:
            # Its frames (the driver's) hold the request: the Basic header, the form body.
            error.last_cause.with_traceback(None)
        raise (step.unavailable(error) if step.unavailable else error) from error.last_cause

    return core.retry.tenacity_kwargs(
        clock=core.monotonic, on_retry=report, give_up=give_up, started=started
    )
