"""TokenVerifier and AsyncTokenVerifier: thin I/O shells over one sans-IO core."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any

import anyio
import httpx
from jwt.algorithms import Algorithm, get_default_algorithms

from m2m_client._oauth import BodyBuffer
from m2m_client.errors import ConfigurationError, InvalidToken, KeySetUnavailable

from ._claims import Claims, ClaimsPolicy, check_rights, validate_payload
from ._jwks import (
    MAX_JWKS_BYTES,
    SUPPORTED_ALGORITHMS,
    HttpResult,
    JwksPolicy,
    KeySetState,
    VerificationKey,
)
from ._jws import ParsedToken, check_header, parse_compact

__all__ = ["AsyncTokenVerifier", "TokenVerifier"]

_ALGORITHMS: dict[str, Algorithm] = get_default_algorithms()
_TOKEN_TYPES = (None, "at+jwt")


class _VerifierCore:
    """Everything but I/O and locking: parsing, key choice, signature, claims, cache."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str | Sequence[str] | None,
        algorithms: Sequence[str],
        leeway: float,
        roles_claim: str,
        jwks_url: str | None,
        required_claims: Iterable[str],
        expected_claims: Mapping[str, str | Sequence[str]],
        token_type: str | None,
        jwks_min_ttl: float,
        jwks_max_ttl: float,
        unknown_kid_cooldown: float,
        cache_size: int,
        clock: Callable[[], float],
    ) -> None:
        if not isinstance(issuer, str) or not issuer:
            raise ConfigurationError("issuer must be a non-empty string (the token's 'iss')")
        expected = _expected_claims(expected_claims)
        audiences: frozenset[str] | None = None
        if audience is None:
            if not expected:
                # Without aud, any token of the issuer (an ID token, another client's
                # token, a token for another API) would pass: something must pin it.
                raise ConfigurationError(
                    "audience=None skips the 'aud' check; it needs expected_claims= to pin "
                    "what the token is for (e.g. Cognito: token_use and client_id)"
                )
        else:
            listed = [audience] if isinstance(audience, str) else list(audience)
            if not listed or not all(isinstance(a, str) and a for a in listed):
                raise ConfigurationError(
                    "audience must be a non-empty string or list of strings "
                    "(or None, with expected_claims=, to skip the 'aud' check)"
                )
            audiences = frozenset(listed)
        if isinstance(algorithms, str):
            algorithms = [algorithms]
        bad = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
        if bad or not algorithms:
            raise ConfigurationError(
                f"algorithms {bad} are not supported; choose from {sorted(SUPPORTED_ALGORITHMS)} "
                "(none and HMAC are refused: the keys are public)"
            )
        if not 0 <= leeway <= 300:
            raise ConfigurationError("leeway must be between 0 and 300 seconds")
        if token_type not in _TOKEN_TYPES:
            raise ConfigurationError("token_type must be None or 'at+jwt'")
        if not 0 < jwks_min_ttl <= jwks_max_ttl:
            raise ConfigurationError("need 0 < jwks_min_ttl <= jwks_max_ttl")
        if unknown_kid_cooldown < 0 or cache_size < 0:
            raise ConfigurationError("unknown_kid_cooldown and cache_size must be >= 0")
        self.algorithms = frozenset(algorithms)
        self.token_type = token_type
        self.clock = clock
        self.claims_policy = ClaimsPolicy(
            issuer=issuer,
            audiences=audiences,
            leeway=float(leeway),
            required=tuple(required_claims),
            roles_claim=roles_claim,
            expected=expected,
        )
        self.keys = KeySetState(
            issuer,
            jwks_url,
            JwksPolicy(
                min_ttl=jwks_min_ttl,
                max_ttl=jwks_max_ttl,
                default_ttl=min(max(600.0, jwks_min_ttl), jwks_max_ttl),
                unknown_kid_cooldown=unknown_kid_cooldown,
                error_retry=min(unknown_kid_cooldown, 5.0),
            ),
        )
        self.cache_size = cache_size
        # token -> (claims, exp). Keyed by the whole token: canonical encoding is
        # enforced, so a token has exactly one spelling.
        self._cache: dict[str, tuple[Claims, float]] = {}
        self._headers: dict[str, dict[str, Any]] = {}

    # --- verified-token cache -------------------------------------------------------
    def cached(self, token: object, now: float) -> Claims | None:
        """Claims of an already verified token, if it is cached and not past its exp."""
        if type(token) is not str:
            return None
        entry = self._cache.get(token)
        if entry is None:
            return None
        if now < entry[1]:
            return entry[0]
        # Past exp (maybe still within leeway): let a full verification decide, so the
        # cache can never change an outcome.
        self._cache.pop(token, None)
        return None

    def _remember(self, token: str, claims: Claims, generation: int) -> None:
        if self.cache_size == 0 or generation != self.keys.generation:
            return  # the key set changed while we verified: don't cache against it
        cache = self._cache
        if len(cache) >= self.cache_size:
            # Oldest first; another thread may evict concurrently (sync verifier).
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del cache[next(iter(cache))]
        cache[token] = (claims, claims.expires_at)

    def clear_cache(self) -> None:
        self._cache = {}

    # --- verification steps -----------------------------------------------------------
    def parse(self, token: object) -> tuple[ParsedToken, str, str | None]:
        parsed = parse_compact(token, self._headers)
        alg, kid = check_header(parsed.header, self.algorithms, self.token_type)
        return parsed, alg, kid

    def finish(
        self, token: object, parsed: ParsedToken, alg: str, key: VerificationKey, now: float
    ) -> Claims:
        generation = self.keys.generation
        try:
            ok = _ALGORITHMS[alg].verify(parsed.signing_input, key.key, parsed.signature)
        except Exception as exc:  # malformed signature bytes must not escape as 500s
            raise InvalidToken("the token's signature is malformed") from exc
        if not ok:
            raise InvalidToken("the token's signature does not verify")
        claims = validate_payload(parsed.payload(), self.claims_policy, now)
        if type(token) is str:
            self._remember(token, claims, generation)
        return claims

    def after_refresh(self, changed: bool) -> None:
        if changed:
            # A key may have been withdrawn: tokens verified with it must verify again.
            self.clear_cache()

    def check(
        self,
        claims: Claims,
        scopes: Iterable[str],
        permissions: Iterable[str],
        roles: Iterable[str],
    ) -> None:
        check_rights(claims, scopes=scopes, permissions=permissions, roles=roles)


def _expected_claims(
    expected_claims: Mapping[str, str | Sequence[str]],
) -> tuple[tuple[str, frozenset[str]], ...]:
    if not isinstance(expected_claims, Mapping):
        raise ConfigurationError("expected_claims must be a mapping of claim name to value(s)")
    result: list[tuple[str, frozenset[str]]] = []
    for name, value in expected_claims.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError("expected_claims names must be non-empty strings")
        # A bare string is one value, not a set of characters.
        values = [value] if isinstance(value, str) else value
        if isinstance(values, (bytes, Mapping)) or not isinstance(values, Iterable):
            raise ConfigurationError(
                f"expected_claims[{name!r}] must be a string or a list of strings"
            )
        allowed = list(values)
        if not allowed or not all(isinstance(v, str) and v for v in allowed):
            raise ConfigurationError(
                f"expected_claims[{name!r}] must be a non-empty string or list of them"
            )
        result.append((name, frozenset(allowed)))
    return tuple(result)


def _result(response: httpx.Response, body: bytes) -> HttpResult:
    return HttpResult(response.status_code, body, response.headers.get("cache-control"))


class _BaseVerifier:
    """Constructor and non-I/O methods shared by both verifiers.

    Options (keyword-only; ``issuer`` and ``audience`` are required):

    ``issuer``: the exact ``iss``; the JWKS is found by OIDC/RFC 8414 discovery unless
    ``jwks_url`` is given.
    ``audience``: the accepted ``aud`` value(s); a token must name at least one of them.
    ``None`` skips the ``aud`` check, for issuers whose access tokens carry no ``aud``
    (Amazon Cognito). It must be written out (there is no default) and is refused with
    :class:`~m2m_client.errors.ConfigurationError` unless ``expected_claims`` is non-empty,
    since otherwise any token of the issuer would pass. A token that does carry an ``aud``
    is then accepted whatever its value. ``iss``, ``exp``, ``nbf``, ``iat``, the signature
    and every other check still apply.
    ``expected_claims``: claim name -> a string or a list of strings; each claim must be
    present, be a string and equal the value (or one of the list). A missing or different
    claim is :class:`~m2m_client.errors.InvalidToken` naming the claim, not its value.
    Names are top-level claim names. For Cognito, as AWS recommends::

        TokenVerifier(issuer="https://cognito-idp.<region>.amazonaws.com/<pool-id>",
                      audience=None,
                      expected_claims={"token_use": "access", "client_id": ["<app-client-id>"]})

    ``required_claims``: claim names that must be present (any value).
    ``algorithms`` (default RS256), ``leeway`` (seconds of clock skew, 0-300),
    ``roles_claim`` (a name, or a dotted path such as ``realm_access.roles``),
    ``token_type`` (``"at+jwt"`` to demand RFC 9068's ``typ``), ``timeout`` for JWKS
    requests, ``jwks_min_ttl``/``jwks_max_ttl``/``unknown_kid_cooldown`` (refresh
    bounds), ``cache_size`` (verified tokens remembered) and ``clock``.
    """

    _http_client_type: type[httpx.AsyncClient | httpx.Client]
    _http_client: httpx.AsyncClient | httpx.Client | None

    def __init__(
        self,
        *,
        issuer: str,
        audience: str | Sequence[str] | None,
        algorithms: Sequence[str] = ("RS256",),
        leeway: float = 30,
        roles_claim: str = "roles",
        jwks_url: str | None = None,
        required_claims: Iterable[str] = (),
        expected_claims: Mapping[str, str | Sequence[str]] | None = None,
        token_type: str | None = None,
        timeout: float = 5.0,
        jwks_min_ttl: float = 60.0,
        jwks_max_ttl: float = 86400.0,
        unknown_kid_cooldown: float = 30.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
        http_client: httpx.Client | httpx.AsyncClient | None = None,
    ) -> None:
        # One typed signature for both verifiers (a **kwargs passthrough would hide typos
        # from type checkers); each shell checks that the client type fits it.
        if http_client is not None and not isinstance(http_client, self._http_client_type):
            raise ConfigurationError(
                f"{type(self).__name__} needs http_client to be an "
                f"httpx.{self._http_client_type.__qualname__}"
            )
        self._http_client = http_client
        if not timeout > 0:
            raise ConfigurationError("timeout must be > 0 seconds")
        self._timeout = float(timeout)
        self._core = _VerifierCore(
            issuer=issuer,
            audience=audience,
            algorithms=algorithms,
            leeway=leeway,
            roles_claim=roles_claim,
            jwks_url=jwks_url,
            required_claims=required_claims,
            expected_claims={} if expected_claims is None else expected_claims,
            token_type=token_type,
            jwks_min_ttl=jwks_min_ttl,
            jwks_max_ttl=jwks_max_ttl,
            unknown_kid_cooldown=unknown_kid_cooldown,
            cache_size=cache_size,
            clock=clock,
        )
        self._lock = self._new_lock()

    def _new_lock(self) -> Any:
        raise NotImplementedError

    @property
    def issuer(self) -> str:
        """The expected ``iss``."""
        return self._core.claims_policy.issuer

    def check(
        self,
        claims: Claims,
        *,
        scopes: Iterable[str] = (),
        permissions: Iterable[str] = (),
        roles: Iterable[str] = (),
    ) -> None:
        """Raise InsufficientPermissions unless ``claims`` grant everything asked for.

        >>> verifier.check(claims, permissions=["read:dashboard"], roles=["admin"])
        """
        self._core.check(claims, scopes, permissions, roles)

    def retry_after(self) -> float:
        """Seconds until the JWKS endpoint will be tried again (for ``Retry-After``)."""
        return self._core.keys.retry_after(self._core.clock())

    def clear_cache(self) -> None:
        """Forget every verified token (the next verification of each is full)."""
        self._core.clear_cache()


class AsyncTokenVerifier(_BaseVerifier):
    """Verify JWT access tokens in async code (asyncio or trio); JWKS I/O never blocks.

    >>> verifier = AsyncTokenVerifier(issuer="https://tenant.example.com/",
    ...                               audience="https://api.example.com")
    >>> claims = await verifier.verify(token)

    ``http_client`` (an ``httpx.AsyncClient``) is used for discovery and JWKS requests
    if given; otherwise a short-lived client with ``timeout`` is made per refresh.
    """

    _http_client_type: type[httpx.AsyncClient | httpx.Client] = httpx.AsyncClient
    _http_client: httpx.AsyncClient | None
    _lock: anyio.Lock

    def _new_lock(self) -> anyio.Lock:
        return anyio.Lock()

    async def verify(self, token: str) -> Claims:
        """Verify ``token``; return its Claims or raise a VerificationError subclass."""
        core = self._core
        now = core.clock()
        claims = core.cached(token, now)
        if claims is not None:
            return claims
        parsed, alg, kid = core.parse(token)
        key = core.keys.lookup(kid, alg, now)
        if key is None:
            async with self._lock:  # single flight: waiters re-ask after the fetch
                if core.keys.should_fetch(kid, alg, core.clock()):
                    core.after_refresh(await self._drive(core.keys.refresh_flow(core.clock())))
            key = core.keys.key_after_refresh(kid, alg)
        return core.finish(token, parsed, alg, key, now)

    async def refresh(self) -> None:
        """Fetch the key set now (e.g. at start-up); raise KeySetUnavailable on failure."""
        core = self._core
        async with self._lock:
            core.after_refresh(await self._drive(core.keys.refresh_flow(core.clock())))
        if core.keys.last_error is not None:
            raise KeySetUnavailable(f"JWKS refresh failed: {core.keys.last_error}")

    async def _drive(self, flow: Generator[str, HttpResult, bool]) -> bool:
        try:
            url = next(flow)
            while True:
                url = flow.send(await self._get(url))
        except StopIteration as stop:
            return bool(stop.value)

    async def _get(self, url: str) -> HttpResult:
        try:
            with anyio.fail_after(self._timeout * 2):
                if self._http_client is not None:
                    return await self._get_with(self._http_client, url)
                async with httpx.AsyncClient(timeout=self._timeout) as client:
                    return await self._get_with(client, url)
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return HttpResult(error=f"{type(exc).__name__} fetching {url}")

    async def _get_with(self, client: httpx.AsyncClient, url: str) -> HttpResult:
        buffer = BodyBuffer(limit=MAX_JWKS_BYTES, too_large=KeySetUnavailable)
        async with client.stream("GET", url, timeout=self._timeout) as response:
            try:
                buffer.check_length_header(response.headers.get("content-length"))
                async for chunk in response.aiter_bytes():
                    buffer.add(chunk)
            except KeySetUnavailable as exc:
                return HttpResult(error=str(exc))
            return _result(response, buffer.body())


class TokenVerifier(_BaseVerifier):
    """Verify JWT access tokens in synchronous code; thread-safe.

    >>> verifier = TokenVerifier(issuer="https://tenant.example.com/",
    ...                          audience="https://api.example.com")
    >>> claims = verifier.verify(token)
    """

    _http_client_type: type[httpx.AsyncClient | httpx.Client] = httpx.Client
    _http_client: httpx.Client | None
    _lock: threading.Lock

    def _new_lock(self) -> threading.Lock:
        return threading.Lock()

    def verify(self, token: str) -> Claims:
        """Verify ``token``; return its Claims or raise a VerificationError subclass."""
        core = self._core
        now = core.clock()
        claims = core.cached(token, now)
        if claims is not None:
            return claims
        parsed, alg, kid = core.parse(token)
        key = core.keys.lookup(kid, alg, now)
        if key is None:
            with self._lock:  # single flight: waiters re-ask after the fetch
                if core.keys.should_fetch(kid, alg, core.clock()):
                    core.after_refresh(self._drive(core.keys.refresh_flow(core.clock())))
            key = core.keys.key_after_refresh(kid, alg)
        return core.finish(token, parsed, alg, key, now)

    def refresh(self) -> None:
        """Fetch the key set now (e.g. at start-up); raise KeySetUnavailable on failure."""
        core = self._core
        with self._lock:
            core.after_refresh(self._drive(core.keys.refresh_flow(core.clock())))
        if core.keys.last_error is not None:
            raise KeySetUnavailable(f"JWKS refresh failed: {core.keys.last_error}")

    def _drive(self, flow: Generator[str, HttpResult, bool]) -> bool:
        try:
            url = next(flow)
            while True:
                url = flow.send(self._get(url))
        except StopIteration as stop:
            return bool(stop.value)

    def _get(self, url: str) -> HttpResult:
        try:
            if self._http_client is not None:
                return self._get_with(self._http_client, url)
            with httpx.Client(timeout=self._timeout) as client:
                return self._get_with(client, url)
        except (httpx.HTTPError, OSError) as exc:
            return HttpResult(error=f"{type(exc).__name__} fetching {url}")

    def _get_with(self, client: httpx.Client, url: str) -> HttpResult:
        buffer = BodyBuffer(limit=MAX_JWKS_BYTES, too_large=KeySetUnavailable)
        with client.stream("GET", url, timeout=self._timeout) as response:
            try:
                buffer.check_length_header(response.headers.get("content-length"))
                for chunk in response.iter_bytes():
                    buffer.add(chunk)
            except KeySetUnavailable as exc:
                return HttpResult(error=str(exc))
            return _result(response, buffer.body())
