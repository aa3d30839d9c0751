"""The HTTP flows a flight runs (discovery, then the token request), and their retries.

Sans-IO: a :class:`Retried` is a flow (:data:`m2m_client._http.Flow`) made afresh for each
attempt and what bounds its answers; the fetchers run each attempt with their driver's
``run``, re-running it on transient failures under one deadline per flight.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, NoReturn, TypeVar

import tenacity

from m2m_client._discovery import MAX_METADATA_BYTES, Discovery, metadata_endpoint
from m2m_client._dpop import token_endpoint_nonce_challenge
from m2m_client._http import Call, Flow, HttpAnswer, HttpRequest, answer_of
from m2m_client._oauth import MAX_BODY_BYTES, interpret_token_response, is_invalid_client
from m2m_client._retry import RetryPolicy, TransientFailure
from m2m_client._token import AccessToken, CacheKey
from m2m_client.errors import (
    DiscoveryError,
    InvalidTokenResponse,
    M2MError,
    TokenEndpointUnavailable,
)

from ._decisions import _ClientCore, describe

__all__ = ["Retried", "discovery_flow", "retry_kwargs", "token_exchange"]

logger = logging.getLogger("m2m_client")

T = TypeVar("T")


class Retried(Generic[T]):
    """A flow a flight re-runs on transient failures: ``attempt()`` makes a fresh one.

    ``limits`` bound each answer (the body size, the error a refused answer raises);
    ``unavailable`` turns the give-up error into the flow's own (discovery's).
    """

    __slots__ = ("attempt", "limits", "unavailable", "what")

    def __init__(
        self,
        what: str,
        attempt: Callable[[], Flow[T]],
        *,
        refuse: type[M2MError],
        limit: int,
        unavailable: Callable[[TokenEndpointUnavailable], M2MError] | None = None,
    ) -> None:
        self.what, self.attempt, self.unavailable = what, attempt, unavailable
        self.limits: dict[str, Any] = {"limit": limit, "refuse": refuse}


def token_exchange(core: _ClientCore, key: CacheKey, token_url: str) -> Retried[AccessToken]:
    """The token request for ``key``; the one place it is built (DPoP adds its proof here).

    One attempt sends it, then at most once more for each of: a DPoP nonce challenge
    (RFC 9449 §8), and an ``invalid_client`` answer after which a credential read from a
    file or a source (issue 21) turns out to have changed.
    """
    dpop = core.dpop
    authenticator = core.authenticator

    def build(now: float) -> HttpRequest:
        core.stats.token_requests += 1
        request = authenticator.token_request(
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

    def nonce_challenge(answer: HttpAnswer) -> bool:
        # RFC 9449 §8.2: the server may send a new nonce with any answer; keep the latest.
        nonce = answer.headers.get("dpop-nonce")
        core.nonces.update(token_url, nonce)
        if answer.status != 400:
            return False
        error = _oauth_error_code(answer.body)
        return token_endpoint_nonce_challenge(answer.status, error, nonce) is not None

    def reread(now: float, reload: bool) -> Call[bool]:
        # A credential from a file or a source: read (if changed) before each request;
        # an async assertion source is awaited by the async driver.
        return Call(
            lambda: authenticator.prepare(now, reload=reload),
            lambda: authenticator.aprepare(now, reload=reload),
        )

    def attempt() -> Flow[AccessToken]:
        dynamic = authenticator.dynamic
        sent_at = core.clock()
        if dynamic:
            yield reread(sent_at, False)
        answer = answer_of((yield build(sent_at)))
        if dpop is not None and nonce_challenge(answer):  # once: a DPoP nonce challenge
            if core.telemetry is not None:
                core.telemetry.nonce_retry()
            sent_at = core.clock()
            answer = answer_of((yield build(sent_at)))
            nonce_challenge(answer)
        if (
            dynamic
            and is_invalid_client(answer.status, answer.body)
            and (yield reread(core.clock(), True))  # once: a credential rotated unseen
        ):
            logger.info(
                "token endpoint answered invalid_client; the credential changed: sending again"
            )
            sent_at = core.clock()
            answer = answer_of((yield build(sent_at)))
        return interpret(answer, sent_at)

    def timed_attempt() -> Flow[AccessToken]:
        telemetry = core.telemetry
        if telemetry is None:
            return (yield from attempt())
        started = time.perf_counter()
        try:
            token = yield from attempt()
        except GeneratorExit:
            raise
        except BaseException as exc:
            telemetry.token_request(time.perf_counter() - started, exc, token_url)
            raise
        telemetry.token_request(time.perf_counter() - started, None, token_url)
        return token

    return Retried(
        "token request", timed_attempt, refuse=InvalidTokenResponse, limit=MAX_BODY_BYTES
    )


def _oauth_error_code(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) else None


def discovery_flow(
    discovery: Discovery, retried: Callable[[Retried[dict[str, Any] | None]], Call[Any]]
) -> Flow[str]:
    """``discovery``'s flow with retries, for the driver pair: returns the token endpoint.

    Each metadata request is a :class:`Retried`; ``retried`` makes the :class:`Call` that runs
    it with the shell's driver and retries. The error the call ends in (thrown in here by
    the driver) is handed to ``discovery`` as a value: it then tries the next URL. Raises
    :class:`DiscoveryError`, negative-cached by ``discovery``, so callers for every cache key
    share one failed discovery.
    """
    flow = discovery.flow()
    result: object = None
    try:
        while True:
            step = flow.send(result)
            try:
                result = yield retried(
                    Retried(
                        "metadata request",
                        step.flow,
                        refuse=DiscoveryError,
                        limit=MAX_METADATA_BYTES,
                    )
                )
            except M2MError as exc:
                result = exc
    except StopIteration as done:
        metadata = done.value
    except DiscoveryError as exc:
        if str(exc).startswith("no authorization server metadata"):
            raise DiscoveryError(f"{exc}; set token_url instead") from None
        raise
    return metadata_endpoint(metadata, "token_endpoint", issuer=discovery.issuer)


def retry_kwargs(
    core: _ClientCore, key: CacheKey, step: Retried[Any], started: float
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
