"""TokenVerifier and AsyncTokenVerifier: locking and I/O around one sans-IO core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any

import anyio

from m2m_client._http import async_driver, sync_driver
from m2m_client._oauth import TokenRequest
from m2m_client._retry import TransientFailure
from m2m_client._telemetry import Telemetry, resolve
from m2m_client.errors import (
    ConfigurationError,
    InsufficientPermissions,
    KeySetUnavailable,
    M2MError,
    VerificationError,
)

from ._claims import Claims, check_rights, hint_roles_elsewhere, names
from ._core import NeedKey, Settings, VerifierCore
from ._dpop import (
    DPoPChecker,
    DPoPPolicy,
    DPoPProof,
    check_token_binding,
    dpop_decision,
    token_jkt,
)
from ._jwks import MAX_JWKS_BYTES, VerificationKey
from ._keyset import Answer

if TYPE_CHECKING:
    from m2m_client._stacks import HttpClient

__all__ = ["AsyncTokenVerifier", "TokenVerifier"]

logger = logging.getLogger("m2m_client.verify")


class _BaseVerifier:
    """What both verifiers share: the constructor and the methods that do no I/O."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str | Sequence[str] | None,
        algorithms: str | Sequence[str] = ("RS256",),
        leeway: float = 30,
        roles_claim: str = "roles",
        jwks_url: str | None = None,
        required_claims: str | Iterable[str] = (),
        expected_claims: Mapping[str, str | Sequence[str]] | None = None,
        token_type: str | None = None,
        timeout: float = 5.0,
        jwks_min_ttl: float = 60.0,
        jwks_max_ttl: float = 86400.0,
        unknown_kid_cooldown: float = 30.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
        http_client: HttpClient | None = None,
        dpop: DPoPPolicy = "disabled",
        dpop_checker: DPoPChecker | None = None,
        meter_provider: object | None = None,
        tracer_provider: object | None = None,
    ) -> None:
        """Configure a verifier; every option is keyword-only. Raises ConfigurationError.

        Args:
            issuer: the exact ``iss``; its JWKS is found by discovery unless ``jwks_url``.
            audience: accepted ``aud`` value(s). ``None`` skips the check (Cognito) and
                then needs ``expected_claims`` to pin what the token is for.
            algorithms: allowed ``alg`` values (asymmetric only); default RS256.
            leeway: seconds of clock skew allowed for exp/nbf/iat (0-300).
            roles_claim: claim holding roles; a dotted path reaches nested claims
                (``realm_access.roles``).
            jwks_url: the JWKS URL, skipping discovery. https (or loopback http).
            required_claims: claim names that must be present (a string is one name).
            expected_claims: claim -> accepted string value(s), e.g.
                ``{"token_use": "access"}``.
            token_type: ``"at+jwt"`` to demand RFC 9068's ``typ`` header.
            timeout: seconds for one discovery or JWKS request, start to end.
            jwks_min_ttl, jwks_max_ttl: bounds on how long a fetched key set is fresh.
            unknown_kid_cooldown: seconds between two refetches for unknown ``kid`` s.
            cache_size: verified tokens remembered (0 disables the cache).
            clock: wall clock for exp/nbf/iat; a test clock also drives the durations.
            http_client: an httpx or httpx2 client of the matching kind (sync/async)
                for discovery and JWKS; never its auth, headers or redirects.
            dpop: DPoP (RFC 9449) policy: ``"disabled"`` (bearer use of any token, the
                DPoP scheme refused), ``"allowed"`` (unbound tokens as bearer, bound
                tokens only with a proof) or ``"required"`` (every token with a proof).
            dpop_checker: how proofs are checked: a :class:`DPoPChecker` with its
                settings (algorithms, ``iat`` window), replay cache and optional server
                nonces; default: a bounded in-memory replay cache, no nonces.
            meter_provider, tracer_provider: OpenTelemetry providers to record to
                (default: the global ones, looked up at the first verification that is
                not a cached verdict); nothing is recorded without an SDK.
                See docs/observability.md.
        """
        # One typed signature for both verifiers (a **kwargs passthrough would hide typos
        # from type checkers); each shell's driver checks that the client fits it.
        if not timeout > 0:
            raise ConfigurationError("timeout must be > 0 seconds")
        self._timeout = float(timeout)
        # A refresh is discovery (up to 3 URLs) plus the JWKS: bounded as a whole, and a
        # caller waiting for someone else's refresh waits no longer than that.
        self._refresh_seconds = 2 * self._timeout
        self._core = VerifierCore(
            Settings(
                issuer=issuer,
                audience=audience,
                algorithms=algorithms,
                leeway=leeway,
                roles_claim=roles_claim,
                jwks_url=jwks_url,
                required_claims=required_claims,
                expected_claims=expected_claims,
                token_type=token_type,
                jwks_min_ttl=jwks_min_ttl,
                jwks_max_ttl=jwks_max_ttl,
                unknown_kid_cooldown=unknown_kid_cooldown,
                cache_size=cache_size,
                clock=clock,
            )
        )
        if dpop not in ("disabled", "allowed", "required"):
            raise ConfigurationError("dpop must be 'disabled', 'allowed' or 'required'")
        if dpop_checker is not None and not isinstance(dpop_checker, DPoPChecker):
            raise ConfigurationError("dpop_checker must be a DPoPChecker")
        self.dpop: DPoPPolicy = dpop
        self.dpop_checker = dpop_checker if dpop_checker is not None else DPoPChecker()
        # Resolved at the first slow path (see _telemetry): the cached path checks None only.
        self._telemetry: Telemetry | None = None
        self._providers: tuple[object | None, object | None] | None = (
            meter_provider,
            tracer_provider,
        )
        self._keys_loaded_at: float | None = None
        self._setup(http_client)

    def _resolve_telemetry(self) -> Telemetry | None:
        providers = self._providers
        if providers is not None:
            self._providers = None
            self._telemetry = resolve(*providers)
        return self._telemetry

    def _start_telemetry(self) -> bool:
        """Resolve the providers (once); with an SDK, make ``verify`` (and the FastAPI
        hot path) measured ones, per instance: without an SDK ``verify`` stays exactly as
        it is, not one check added. ``True`` if the measured ones were installed."""
        telemetry = self._resolve_telemetry()
        if telemetry is None:
            return False
        cls: Any = type(self)
        is_async = isinstance(self, AsyncTokenVerifier)
        # Stored on the instance: they shadow the class's methods from now on.
        vars(self)["verify"] = _measured(cls.verify, self, telemetry, is_async=is_async)
        if hasattr(cls, "_verify_cached"):
            vars(self)["_verify_cached"] = _measured(
                cls._verify_cached, self, telemetry, is_async=False
            )
        return True

    def _fetch_reason(self, unknown_kid: bool = False) -> str:
        """Why the key set is fetched now (``m2m_client.reason``)."""
        if unknown_kid:
            return "unknown_kid"
        return "start" if self._core.keys.keys is None else "ttl"

    def _jwks_span(self, reason: str) -> contextlib.AbstractContextManager[None]:
        telemetry = self._resolve_telemetry()
        if telemetry is None:
            return contextlib.nullcontext()
        return telemetry.jwks_fetch(reason, self)

    def _bind(
        self,
        token: str,
        claims: Claims,
        dpop_proof: str | Sequence[str] | None,
        method: str | None,
        url: str | None,
    ) -> Claims:
        """Apply the DPoP policy to verified (maybe cached) claims; check the proof if any.

        Runs on every request, cached claims or not: a proof is good for one request only.
        """
        proof = self._dpop_proof(token, claims, dpop_proof, method, url)
        if proof is not None:
            # Last: only a proof that passed every other check takes a replay-cache entry.
            started = time.perf_counter()
            try:
                self.dpop_checker.check_replay(proof, now=self._core.clock())
            finally:  # a replay refused took its time too
                if self._telemetry is not None:
                    self._telemetry.replay_checked(time.perf_counter() - started)
        return claims

    def _dpop_proof(
        self,
        token: str,
        claims: Claims,
        dpop_proof: str | Sequence[str] | None,
        method: str | None,
        url: str | None,
    ) -> DPoPProof | None:
        """:meth:`_bind` but the replay check: the proof to check for replay, or None."""
        if dpop_proof is None and self.dpop == "disabled":
            return None  # bearer use of any token: what dpop_decision answers here
        jkt = token_jkt(claims) if self.dpop != "disabled" or dpop_proof is not None else None
        scheme = "bearer" if dpop_proof is None else "dpop"
        if dpop_decision(self.dpop, scheme=scheme, token_jkt=jkt) == "bearer":
            return None
        if method is None or url is None:
            raise ConfigurationError("verify(dpop_proof=...) needs the request's method= and url=")
        proof = self.dpop_checker.check_proof(
            dpop_proof, method=method, url=url, now=self._core.clock(), access_token=token
        )
        check_token_binding(claims, proof)
        return proof

    def _setup(self, http_client: Any) -> None:
        raise NotImplementedError

    @property
    def issuer(self) -> str:
        """The expected ``iss``."""
        return self._core.claims_policy.issuer

    def check(
        self,
        claims: Claims,
        *,
        scopes: str | Iterable[str] = (),
        permissions: str | Iterable[str] = (),
        roles: str | Iterable[str] = (),
    ) -> None:
        """Raise InsufficientPermissions unless ``claims`` grant everything asked for.

        A bare string is one permission or role; scopes are space-delimited.

        >>> verifier.check(claims, permissions=["read:dashboard"], roles="admin")
        """
        try:
            check_rights(claims, scopes=scopes, permissions=permissions, roles=roles)
        except InsufficientPermissions:
            lacking = [role for role in names(roles, "roles") if role not in claims.roles]
            if lacking:
                roles_claim = self._core.claims_policy.roles_claim
                hint_roles_elsewhere(claims, roles_claim, lacking)
            raise

    def retry_after(self) -> float:
        """Seconds until the JWKS endpoint will be tried again (for ``Retry-After``)."""
        return self._core.keys.retry_after(self._core.monotonic())

    def clear_cache(self) -> None:
        """Forget every verified token (the next verification of each is full)."""
        self._core.tokens.clear()

    def _cached_bearer(self, token: object) -> Claims | None:
        """The claims of a cached token sent without a proof, when nothing else is due.

        The path of almost every request: served only while the token is before its
        ``exp`` (checked at each use), the key set needs no refresh yet, and the DPoP
        policy takes the token as a bearer token without a question (``"disabled"``, or
        ``"allowed"`` and the token unbound). Otherwise None, and :meth:`verify` decides,
        refuses, logs and refreshes as it always did: this only skips work whose outcome
        is known.
        """
        core = self._core
        claims = core.tokens.get(token, core.clock())
        # Before refresh_at the set is usable and no refresh is due (see KeySetState).
        if claims is None or core.monotonic() >= core.keys.refresh_at:
            return None
        policy = self.dpop
        if policy == "disabled" or (policy == "allowed" and "cnf" not in claims):
            return claims
        return None  # "required", or a cnf claim: the policy's refusal comes from verify()

    def _send_failed(self, exc: BaseException) -> Answer:
        if isinstance(exc, (M2MError, TransientFailure)):
            return exc
        raise exc


class AsyncTokenVerifier(_BaseVerifier):
    """Verify JWT access tokens in async code (asyncio or trio); JWKS I/O never blocks.

    >>> verifier = AsyncTokenVerifier(issuer="https://tenant.example.com/",
    ...                               audience="https://api.example.com")
    >>> claims = await verifier.verify(token)
    """

    def _setup(self, http_client: object | None) -> None:
        self._driver = async_driver(
            http_client, timeout=self._timeout, owner=type(self).__name__, persistent=False
        )
        self._lock = anyio.Lock()
        self._behind: set[Any] = set()

    async def verify(
        self,
        token: str,
        *,
        dpop_proof: str | Sequence[str] | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> Claims:
        """Verify ``token``; return its Claims or raise a VerificationError subclass.

        ``dpop_proof``: the request's ``DPoP`` header (every value, if it came more than
        once) when the token was sent with ``Authorization: DPoP``; ``method`` and ``url``
        are the request's, as the client addressed it. Without a proof the token is taken
        as a bearer token, which the ``dpop`` policy may refuse.
        """
        if dpop_proof is None:
            claims = self._cached_bearer(token)
            if claims is not None:
                return claims
        if self._providers is not None and self._start_telemetry():
            # From now on self.verify is the measured one: this call too.
            return await self.verify(token, dpop_proof=dpop_proof, method=method, url=url)
        try:
            result = self._core.begin(token)
            if isinstance(result, NeedKey):
                key = await self._key(result)
                result = self._core.finish(token, result.parsed, result.alg, key)
            proof = self._dpop_proof(token, result, dpop_proof, method, url)
            if proof is not None:
                # A shared (Redis) replay cache is awaited: the event loop never waits on it.
                replay_started = time.perf_counter()
                try:
                    await self.dpop_checker.check_replay_async(proof, now=self._core.clock())
                finally:  # a replay refused took its time too
                    if self._telemetry is not None:
                        self._telemetry.replay_checked(time.perf_counter() - replay_started)
        except VerificationError as exc:
            _log_refusal(exc)
            raise
        self._refresh_if_due()
        return result

    async def refresh(self) -> None:
        """Fetch the key set now (e.g. at start-up); raise KeySetUnavailable on failure."""
        async with self._locked():
            with self._jwks_span(self._fetch_reason()):
                await self._run(self._core.refresh_flow())
        self._core.keys.raise_if_failed()

    async def _key(self, need: NeedKey) -> VerificationKey:
        if self._behind or self._lock.locked():
            # A fetch is in flight (maybe not started yet: the refresh task marks the set
            # fetching only once it runs): a key the held set has serves now.
            key = self._core.key_while_fetching(need)
            if key is not None:
                return key
        async with self._locked():  # single flight: waiters decide again after the fetch
            key, unknown_kid = self._core.key_under_lock(need)
            if key is None:
                with self._jwks_span(self._fetch_reason(unknown_kid)):
                    await self._run(self._core.refresh_flow(unknown_kid=unknown_kid))
                key = self._core.keys.after_fetch(need.kid, need.alg)
        return key

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        try:
            with anyio.fail_after(self._refresh_seconds + 1):
                await self._lock.acquire()
        except TimeoutError:
            raise KeySetUnavailable("timed out waiting for the JWKS fetch in progress") from None
        try:
            yield
        finally:
            self._lock.release()

    async def _run(self, flow: Generator[TokenRequest, Answer, bool]) -> None:
        deadline = time.monotonic() + self._refresh_seconds
        with contextlib.closing(flow), contextlib.suppress(StopIteration):
            request = next(flow)
            while True:
                request = flow.send(await self._send(request, deadline))

    async def _send(self, request: TokenRequest, deadline: float) -> Answer:
        try:
            return await self._driver.send(
                request, limit=MAX_JWKS_BYTES, refuse=KeySetUnavailable, deadline=deadline
            )
        except Exception as exc:
            return self._send_failed(exc)

    def _refresh_if_due(self) -> None:
        # Refresh ahead in a task of its own: no caller waits for it.
        if self._behind or self._lock.locked():
            return
        if self._core.keys.refresh_due(self._core.monotonic()):
            _spawn(self._refresh_behind, self._behind)

    async def _refresh_behind(self) -> None:
        try:
            async with self._locked():
                if self._core.keys.refresh_due(self._core.monotonic()):
                    with self._jwks_span("ttl"):
                        await self._run(self._core.refresh_flow())
        except Exception:  # recorded by the key set; nothing may escape a background task
            logger.debug("background JWKS refresh failed", exc_info=True)


def _measured(method: Any, verifier: Any, telemetry: Telemetry, *, is_async: bool) -> Any:
    """``method`` bound to ``verifier``, recording each verdict (a ``None`` from the FastAPI
    hot path, no cached verdict, is not one: the full verification that follows is)."""

    def record(started: float, dpop_proof: object, error: VerificationError | None) -> None:
        scheme = "bearer" if dpop_proof is None else "dpop"
        telemetry.verified(scheme, time.perf_counter() - started, error)

    if is_async:

        async def measured_async(token: str, *, dpop_proof: Any = None, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                claims = await method(verifier, token, dpop_proof=dpop_proof, **kwargs)
            except VerificationError as exc:
                record(started, dpop_proof, exc)
                raise
            record(started, dpop_proof, None)
            return claims

        return measured_async

    def measured(token: str, *, dpop_proof: Any = None, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            claims = method(verifier, token, dpop_proof=dpop_proof, **kwargs)
        except VerificationError as exc:
            record(started, dpop_proof, exc)
            raise
        if claims is not None:
            record(started, dpop_proof, None)
        return claims

    return measured


def _log_refusal(exc: VerificationError) -> None:
    # The reason and our own message only: messages never contain the token.
    logger.debug("token refused (%s): %s", exc.reason, exc)


def _spawn(function: Callable[[], Coroutine[Any, Any, None]], running: set[Any]) -> None:
    """Start ``function`` in the background on the running event loop (asyncio or trio)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: anyio's other backend, trio
        import trio

        running.add(function)

        async def system_task() -> None:
            try:
                await function()
            finally:
                running.discard(function)

        trio.lowlevel.spawn_system_task(system_task)
        return
    task = loop.create_task(function())
    running.add(task)  # a strong reference, or the task may be collected mid-flight
    task.add_done_callback(running.discard)


class TokenVerifier(_BaseVerifier):
    """Verify JWT access tokens in synchronous code; thread-safe.

    >>> verifier = TokenVerifier(issuer="https://tenant.example.com/",
    ...                          audience="https://api.example.com")
    >>> claims = verifier.verify(token)
    """

    def _setup(self, http_client: object | None) -> None:
        self._driver = sync_driver(
            http_client, timeout=self._timeout, owner=type(self).__name__, persistent=False
        )
        self._lock = threading.Lock()
        _SYNC_VERIFIERS.add(self)

    def _after_fork(self) -> None:
        # A refresh thread that held the lock at fork() does not exist in the child.
        self._lock = threading.Lock()
        self._core.keys.fetching = False

    def verify(
        self,
        token: str,
        *,
        dpop_proof: str | Sequence[str] | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> Claims:
        """Verify ``token``; return its Claims or raise a VerificationError subclass.

        The DPoP arguments are those of :meth:`AsyncTokenVerifier.verify`.
        """
        if dpop_proof is None:
            claims = self._cached_bearer(token)
            if claims is not None:
                return claims
        if self._providers is not None and self._start_telemetry():
            # From now on self.verify is the measured one: this call too.
            return self.verify(token, dpop_proof=dpop_proof, method=method, url=url)
        try:
            result = self._core.begin(token)
            if isinstance(result, NeedKey):
                result = self._core.finish(token, result.parsed, result.alg, self._key(result))
            result = self._bind(token, result, dpop_proof, method, url)
        except VerificationError as exc:
            _log_refusal(exc)
            raise
        self._refresh_if_due()
        return result

    def _verify_cached(
        self,
        token: str,
        *,
        dpop_proof: str | Sequence[str] | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> Claims | None:
        """The cached verdict for ``token`` without any I/O wait (for the FastAPI hot path),
        the DPoP policy and proof checked as in :meth:`verify`."""
        claims = self._core.cached(token)
        if claims is not None:
            try:
                claims = self._bind(token, claims, dpop_proof, method, url)
            except VerificationError as exc:
                _log_refusal(exc)
                raise
            self._refresh_if_due()
        return claims

    def refresh(self) -> None:
        """Fetch the key set now (e.g. at start-up); raise KeySetUnavailable on failure."""
        with self._locked(), self._jwks_span(self._fetch_reason()):
            self._run(self._core.refresh_flow())
        self._core.keys.raise_if_failed()

    def _key(self, need: NeedKey) -> VerificationKey:
        if not self._lock.acquire(blocking=False):
            # A fetch is in flight (the lock holder's): a key the held set has serves now.
            key = self._core.key_while_fetching(need)
            if key is not None:
                return key
            self._acquire()
        try:  # single flight: waiters decide again after the fetch
            key, unknown_kid = self._core.key_under_lock(need)
            if key is None:
                with self._jwks_span(self._fetch_reason(unknown_kid)):
                    self._run(self._core.refresh_flow(unknown_kid=unknown_kid))
                key = self._core.keys.after_fetch(need.kid, need.alg)
        finally:
            self._lock.release()
        return key

    def _acquire(self) -> None:
        if not self._lock.acquire(timeout=self._refresh_seconds + 1):
            raise KeySetUnavailable("timed out waiting for the JWKS fetch in progress")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._acquire()
        try:
            yield
        finally:
            self._lock.release()

    def _run(self, flow: Generator[TokenRequest, Answer, bool]) -> None:
        deadline = time.monotonic() + self._refresh_seconds
        with contextlib.closing(flow), contextlib.suppress(StopIteration):
            request = next(flow)
            while True:
                request = flow.send(self._send(request, deadline))

    def _send(self, request: TokenRequest, deadline: float) -> Answer:
        try:
            return self._driver.send(
                request, limit=MAX_JWKS_BYTES, refuse=KeySetUnavailable, deadline=deadline
            )
        except Exception as exc:
            return self._send_failed(exc)

    def _refresh_if_due(self) -> None:
        # Refresh ahead in a thread of its own, which holds the lock: no caller waits for it.
        if not self._core.keys.refresh_due(self._core.monotonic()):
            return
        if not self._lock.acquire(blocking=False):
            return  # a fetch is running
        try:
            threading.Thread(target=self._refresh_behind, daemon=True, name="m2m-jwks").start()
        except BaseException:
            self._lock.release()
            raise

    def _refresh_behind(self) -> None:
        try:
            if self._core.keys.refresh_due(self._core.monotonic()):
                with self._jwks_span("ttl"):
                    self._run(self._core.refresh_flow())
        except Exception:  # recorded by the key set; nothing may escape a background thread
            logger.debug("background JWKS refresh failed", exc_info=True)
        finally:
            self._lock.release()


_SYNC_VERIFIERS: weakref.WeakSet[TokenVerifier] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for verifier in list(_SYNC_VERIFIERS):
        verifier._after_fork()


if hasattr(os, "register_at_fork"):  # gunicorn --preload, multiprocessing with fork
    os.register_at_fork(after_in_child=_reset_after_fork)
