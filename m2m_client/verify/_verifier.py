"""TokenVerifier and AsyncTokenVerifier: locking and I/O around one sans-IO core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
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

from m2m_client import _fork
from m2m_client._http import HttpRequest, async_driver, sync_driver
from m2m_client._telemetry import Telemetry
from m2m_client.errors import (
    ConfigurationError,
    KeySetUnavailable,
    VerificationError,
)

from ._claims import Claims
from ._decisions import NeedKey, Settings, VerifierCore
from ._jwks import MAX_JWKS_BYTES, VerificationKey
from ._keyset import Answer
from ._measure import jwks_span, start_telemetry
from ._proof import DPoPChecker, DPoPPolicy, checked_proof, dpop_options

if TYPE_CHECKING:
    from m2m_client._stacks import HttpClient
    from m2m_client._telemetry import Telemetry

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
        self.dpop: DPoPPolicy
        self.dpop, self.dpop_checker = dpop_options(dpop, dpop_checker)
        # Resolved at the first slow path (see _telemetry): the cached path checks None only.
        self._telemetry: Telemetry | None = None
        self._providers: tuple[object | None, object | None] | None = (
            meter_provider,
            tracer_provider,
        )
        self._keys_loaded_at: float | None = None
        self._setup(http_client)

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
        proof = checked_proof(
            self.dpop, self.dpop_checker, token, claims, dpop_proof, method, url, self._core.clock
        )
        if proof is not None:
            # Last: only a proof that passed every other check takes a replay-cache entry.
            started = time.perf_counter()
            try:
                self.dpop_checker.check_replay(proof, now=self._core.clock())
            finally:  # a replay refused took its time too
                if self._telemetry is not None:
                    self._telemetry.replay_checked(time.perf_counter() - started)
        return claims

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
        self._core.check(claims, scopes=scopes, permissions=permissions, roles=roles)

    def retry_after(self) -> float:
        """Seconds until the JWKS endpoint will be tried again (for ``Retry-After``)."""
        return self._core.keys.retry_after(self._core.monotonic())

    def clear_cache(self) -> None:
        """Forget every verified token (the next verification of each is full)."""
        self._core.tokens.clear()

    def now(self) -> float:
        """The verifier's wall clock (its ``clock`` option), e.g. for a fresh ``DPoP-Nonce``."""
        return self._core.clock()

    def cached_bearer(self, token: object) -> Claims | None:
        """The claims of a cached token sent without a proof, when nothing else is due.

        The integrations' seam for a repeated bearer token (no coroutine, no thread hop).

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
            claims = self.cached_bearer(token)
            if claims is not None:
                return claims
        if self._providers is not None and start_telemetry(self):
            # From now on self.verify is the measured one: this call too.
            return await self.verify(token, dpop_proof=dpop_proof, method=method, url=url)
        try:
            result = self._core.begin(token)
            if isinstance(result, NeedKey):
                key = await self._key(result)
                result = self._core.finish(token, result.parsed, result.alg, key)
            proof = checked_proof(
                self.dpop,
                self.dpop_checker,
                token,
                result,
                dpop_proof,
                method,
                url,
                self._core.clock,
            )
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
            with jwks_span(self, self._core.fetch_reason()):
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
                with jwks_span(self, self._core.fetch_reason(unknown_kid)):
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

    async def _run(self, flow: Generator[HttpRequest, Answer, bool]) -> None:
        deadline = time.monotonic() + self._refresh_seconds
        await self._driver.run(
            flow, limit=MAX_JWKS_BYTES, refuse=KeySetUnavailable, deadline=deadline
        )

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
                    with jwks_span(self, "ttl"):
                        await self._run(self._core.refresh_flow())
        except Exception:  # recorded by the key set; nothing may escape a background task
            logger.debug("background JWKS refresh failed", exc_info=True)


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
        _fork.track(self)

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
            claims = self.cached_bearer(token)
            if claims is not None:
                return claims
        if self._providers is not None and start_telemetry(self):
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

    def verify_cached(
        self,
        token: str,
        *,
        dpop_proof: str | Sequence[str] | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> Claims | None:
        """The cached verdict for ``token`` without any I/O wait, or None (then :meth:`verify`).

        For integrations on an event loop (FastAPI's hot path): the DPoP policy and proof are
        checked as in :meth:`verify`; only a verdict not cached is left to a worker thread.
        """
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
        with self._locked(), jwks_span(self, self._core.fetch_reason()):
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
                with jwks_span(self, self._core.fetch_reason(unknown_kid)):
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

    def _run(self, flow: Generator[HttpRequest, Answer, bool]) -> None:
        deadline = time.monotonic() + self._refresh_seconds
        self._driver.run(flow, limit=MAX_JWKS_BYTES, refuse=KeySetUnavailable, deadline=deadline)

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
                with jwks_span(self, "ttl"):
                    self._run(self._core.refresh_flow())
        except Exception:  # recorded by the key set; nothing may escape a background thread
            logger.debug("background JWKS refresh failed", exc_info=True)
        finally:
            self._lock.release()
