"""DPoP (RFC 9449), receiving side, sans-IO: proof checks, replay cache, nonces, policy.

The checks of RFC 9449 §4.3, in its order, each failing with
:class:`~m2m_client.errors.DPoPProofError` (never another exception, never an echo of
attacker-controlled values):

1. exactly one ``DPoP`` header; 2. a compact JWS; 3. ``typ`` ``dpop+jwt``; 4. an asymmetric
``alg`` from the allowlist; 5. the signature verifies with the header's ``jwk``; 6. that
``jwk`` has no private members; 7-8. ``htm`` and ``htu`` match the request; 9. a server
nonce when one is required; 10. ``iat`` within the window; 11. ``jti`` not seen before;
12. ``ath`` is the hash of the presented token, and the token's ``cnf.jkt`` is the
thumbprint of the proof's key (§6.1, §7.1).

Everything here but the replay cache is a pure function of its arguments and ``now``.
The replay step is behind the small :class:`ReplayCache` protocol, so a shared cache
(``m2m_client.cache.RedisReplayCache``) can plug in. A cache that talks to a server may also
have the async method of :class:`AsyncReplayCache`, which the async verifier awaits; a cache
with only the sync method that is not a :class:`MemoryReplayCache` runs in a worker thread
there, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio.to_thread
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from m2m_client._dpop import (
    access_token_hash,
    jwk_thumbprint,
    normalize_htu,
    valid_nonce,
)
from m2m_client._jose import (
    DEFAULT_DPOP_ALGORITHMS,
    EC_CURVES,
    MAX_HTU,
    MAX_PROOF_HEADER_SEGMENT,
    MAX_PROOF_JTI,
    MAX_PROOF_LENGTH,
    MAX_PROOF_PAYLOAD_SEGMENT,
    MAX_PROOF_SIGNATURE_SEGMENT,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    PRIVATE_MEMBERS,
    RSA_SCHEMES,
)
from m2m_client.errors import (
    ConfigurationError,
    DPoPBindingError,
    DPoPNonceRequired,
    DPoPProofError,
    M2MError,
)
from m2m_client.verify._www_authenticate import challenge

__all__ = [
    "DEFAULT_DPOP_ALGORITHMS",
    "AsyncReplayCache",
    "DPoPChecker",
    "DPoPPolicy",
    "DPoPProof",
    "DPoPSettings",
    "HmacNonceSource",
    "MemoryReplayCache",
    "NonceSource",
    "ReplayCache",
    "check_proof",
    "checked_proof",
    "check_token_binding",
    "dpop_challenge",
    "dpop_decision",
    "dpop_options",
    "request_url",
]

logger = logging.getLogger("m2m_client.verify")

DPoPPolicy = Literal["disabled", "allowed", "required"]
_POLICIES = frozenset({"disabled", "allowed", "required"})

_SEGMENT = re.compile(r"[A-Za-z0-9_-]{2,}")
_TYP = frozenset({"dpop+jwt", "application/dpop+jwt"})
_KEY_CACHE_SIZE = 1024


@dataclass(frozen=True)
class DPoPSettings:
    """How proofs are checked. Times in seconds.

    ``max_age``: how old ``iat`` may be; ``max_future``: how far ahead of our clock it may
    be (client clock skew). Both sides of the window count: a proof made long ago, or
    post-dated to be replayed later, is refused (RFC 9449 §11.1).
    """

    algorithms: frozenset[str] = DEFAULT_DPOP_ALGORITHMS
    max_age: float = 300.0
    max_future: float = 60.0

    def __post_init__(self) -> None:
        unknown = set(self.algorithms) - DEFAULT_DPOP_ALGORITHMS
        if unknown or not self.algorithms:
            raise ConfigurationError(
                f"DPoP algorithms must be a non-empty subset of {sorted(DEFAULT_DPOP_ALGORITHMS)}"
            )
        for name in ("max_age", "max_future"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"DPoP {name} must be a finite number >= 0")

    @property
    def algs_parameter(self) -> str:
        """The ``algs`` value of the ``WWW-Authenticate: DPoP`` challenge (RFC 9449 §7.1)."""
        return " ".join(sorted(self.algorithms))


@dataclass(frozen=True)
class DPoPProof:
    """A proof that passed every check but replay (see :class:`DPoPChecker`)."""

    jkt: str
    jti: str
    htm: str
    htu: str
    iat: float
    nonce: str | None
    #: What the replay cache stores: the key's thumbprint and ``jti``, so one client
    #: cannot block another's proofs by guessing their ``jti`` values.
    replay_key: str
    #: When the entry may be forgotten: after it, ``iat`` fails the window anyway.
    replay_expires_at: float


# --- parsing helpers ---------------------------------------------------------------------


def _fail(message: str) -> DPoPProofError:
    return DPoPProofError(f"DPoP proof refused: {message}")


def _same(value: str, expected: str) -> bool:
    """Constant-time equality of two strings, whatever characters the attacker's one holds.

    ``hmac.compare_digest`` raises TypeError for a non-ASCII str: compare UTF-8 bytes
    (surrogatepass: JSON may carry a lone surrogate, which has no strict UTF-8 form).
    """
    return hmac.compare_digest(
        value.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def _b64decode(segment: str) -> bytes:
    # The alphabet was checked by _SEGMENT; a canonical encoder never leaves a 4k+1 tail
    # or non-zero padding bits (one proof must have one spelling, for the replay cache).
    rem = len(segment) % 4
    if rem == 1:
        raise _fail("not canonical base64url")
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - alphabet checked
        raise _fail("not valid base64url") from exc
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != segment:
        raise _fail("not canonical base64url")
    return data


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _fail(f"its {what} is not JSON") from exc
    if type(value) is not dict:
        raise _fail(f"its {what} is not a JSON object")
    return value


@dataclass(frozen=True)
class _ProofKey:
    alg: str
    key: Any
    jkt: str


def _b64int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if type(value) is not str or not value:
        raise _fail(f"its jwk has no {name!r}")
    return int.from_bytes(_b64decode(value), "big")


def _proof_key(alg: str, jwk: object) -> _ProofKey:
    """The public key of a proof header's ``jwk``, bound to ``alg`` (RFC 9449 §4.3 steps 5-6)."""
    if type(jwk) is not dict:
        raise _fail("its header has no 'jwk' object")
    if not PRIVATE_MEMBERS.isdisjoint(jwk):
        # A private key in a proof is a broken client; and "k" would be a symmetric key.
        raise _fail("its jwk contains private key members")
    kty = jwk.get("kty")
    key: Any
    try:
        if alg in EC_CURVES:
            curve, crv, size, _digest = EC_CURVES[alg]
            if kty != "EC" or jwk.get("crv") != crv:
                raise _fail("its jwk is not a key for its alg")
            x, y = (jwk.get("x"), jwk.get("y"))
            if type(x) is not str or type(y) is not str:
                raise _fail("its jwk has no 'x'/'y'")
            xb, yb = _b64decode(x), _b64decode(y)
            if len(xb) != size or len(yb) != size:
                raise _fail("its jwk coordinates have the wrong length")
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(xb, "big"), int.from_bytes(yb, "big"), curve()
            ).public_key()
        elif alg in RSA_SCHEMES:
            if kty != "RSA":
                raise _fail("its jwk is not a key for its alg")
            n, e = _b64int(jwk, "n"), _b64int(jwk, "e")
            if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
                raise _fail(f"its RSA key is not between {MIN_RSA_BITS} and {MAX_RSA_BITS} bits")
            if e < 3 or e > 2**64:
                raise _fail("its RSA key's public exponent is out of range")
            key = rsa.RSAPublicNumbers(e, n).public_key()
        else:  # EdDSA
            okp_crv, okp_x = jwk.get("crv"), jwk.get("x")
            if kty != "OKP" or type(okp_x) is not str:
                raise _fail("its jwk is not a key for its alg")
            raw = _b64decode(okp_x)
            if okp_crv == "Ed25519":
                key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            elif okp_crv == "Ed448":
                key = ed448.Ed448PublicKey.from_public_bytes(raw)
            else:
                raise _fail("its jwk is not an Ed25519 or Ed448 key")
    except DPoPProofError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:  # off-curve point, bad length ...
        raise _fail("its jwk is not a valid public key") from exc
    jkt_jwk = {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    try:
        jkt = jwk_thumbprint(jkt_jwk)
    except M2MError as exc:  # pragma: no cover - members checked above
        raise _fail("its jwk has no thumbprint") from exc
    return _ProofKey(alg, key, jkt)


def _verify_signature(proof_key: _ProofKey, signing_input: bytes, signature: bytes) -> None:
    key = proof_key.key
    alg = proof_key.alg
    try:
        if alg in EC_CURVES:
            _curve, _crv, size, digest = EC_CURVES[alg]
            if len(signature) != 2 * size:
                raise _fail("its signature does not verify")
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(digest))
        elif alg in RSA_SCHEMES:
            pad, digest = RSA_SCHEMES[alg]
            key.verify(signature, signing_input, pad, digest)
        else:
            key.verify(signature, signing_input)
    except InvalidSignature as exc:
        raise _fail("its signature does not verify") from exc
    except DPoPProofError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise _fail("its signature is malformed") from exc


# --- the checks ----------------------------------------------------------------------------


class NonceSource(Protocol):
    """Server-provided nonces (RFC 9449 §8-9): what to hand out, what to accept."""

    def current(self, now: float) -> str:
        """The nonce to send in ``DPoP-Nonce`` now."""
        ...

    def accepts(self, nonce: str, now: float) -> bool:
        """Whether a proof's nonce is (still) acceptable."""
        ...


class HmacNonceSource:
    """Stateless nonces: HMAC-SHA256 of the time step, accepted for ``window`` steps either side.

    Like node oidc-provider's: nothing to store or share but the secret (32 bytes), so a
    fleet of verifiers given the same secret accepts each other's nonces.
    """

    def __init__(self, secret: bytes | None = None, *, step: float = 60.0, window: int = 2):
        if secret is not None and len(secret) < 32:
            raise ConfigurationError("the DPoP nonce secret must have at least 32 bytes")
        if not (step > 0 and math.isfinite(step)) or window < 0:
            raise ConfigurationError("DPoP nonce step must be > 0 and window >= 0")
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._step = step
        self._window = window

    def _nonce(self, counter: int) -> str:
        digest = hmac.new(self._secret, counter.to_bytes(8, "big", signed=True), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")

    def current(self, now: float) -> str:
        return self._nonce(int(now // self._step))

    def accepts(self, nonce: str, now: float) -> bool:
        counter = int(now // self._step)
        ok = False
        for step in range(counter - self._window, counter + self._window + 1):
            ok |= _same(self._nonce(step), nonce)
        return ok

    def __repr__(self) -> str:
        return f"HmacNonceSource(step={self._step}, window={self._window})"


def check_proof(
    proofs: str | Sequence[str] | None,
    *,
    method: str,
    url: str,
    now: float,
    access_token: str | None = None,
    settings: DPoPSettings | None = None,
    nonces: NonceSource | None = None,
    key_cache: dict[str, _ProofKey] | None = None,
) -> DPoPProof:
    """Check a DPoP proof against the request it came with (RFC 9449 §4.3), but not replay.

    ``proofs``: the ``DPoP`` header value, or every value when the request had several
    (which is refused). ``method``/``url``: the request as the client addressed it (see
    :func:`request_url` behind a proxy). ``access_token``: the token presented with the
    proof, checked against ``ath`` (required at a resource server, absent at a token
    endpoint). ``nonces``: when given, a proof must carry an acceptable nonce, or
    :class:`~m2m_client.errors.DPoPNonceRequired` carries the one to send.
    """
    settings = settings or DPoPSettings()
    # Step 1: one header, one value (a comma means two headers were folded into one).
    if proofs is None:
        raise _fail("the request has no DPoP header")
    if not isinstance(proofs, str):
        try:
            values = list(proofs)
        except TypeError:
            raise _fail("the DPoP header is not text") from None
        if len(values) != 1:
            raise _fail("the request must carry exactly one DPoP header")
        proofs = values[0]
    if not isinstance(proofs, str):
        raise _fail("the DPoP header is not text")
    if "," in proofs:
        # A JWS has no comma: this is two DPoP headers a proxy or framework folded into one
        # value (RFC 9110 §5.3), and RFC 9449 §4.3 step 1 refuses them.
        raise _fail("the request must carry exactly one DPoP header")
    proof = proofs.strip(" \t")
    if len(proof) > MAX_PROOF_LENGTH:
        raise _fail(f"it is longer than {MAX_PROOF_LENGTH} characters, the limit for a proof")
    # Step 2: a well-formed compact JWS, each part within its limit.
    segments = proof.split(".")
    if len(segments) != 3 or not all(_SEGMENT.fullmatch(part) for part in segments):
        raise _fail("it is not a compact JWS (header.payload.signature)")
    header_segment, payload_segment, signature_segment = segments
    for segment, limit, what in (
        (header_segment, MAX_PROOF_HEADER_SEGMENT, "header"),
        (payload_segment, MAX_PROOF_PAYLOAD_SEGMENT, "payload"),
        (signature_segment, MAX_PROOF_SIGNATURE_SEGMENT, f"signature (an RSA-{MAX_RSA_BITS} one)"),
    ):
        if len(segment) > limit:
            raise _fail(f"its {what} is longer than {limit} characters, the limit for it")
    cached = key_cache.get(header_segment) if key_cache is not None else None
    if cached is None:
        header = _json_object(_b64decode(header_segment), "header")
        # Step 3: explicit typing, so no other JWT can pass as a proof.
        typ = header.get("typ")
        if type(typ) is not str or typ.lower() not in _TYP:
            raise _fail("its 'typ' is not 'dpop+jwt'")
        # Step 4: asymmetric algorithm from the allowlist.
        alg = header.get("alg")
        if type(alg) is not str or alg not in settings.algorithms:
            raise _fail("its 'alg' is not an accepted asymmetric algorithm")
        if "crit" in header:
            raise _fail("it lists critical header extensions (crit)")
        if "b64" in header and header["b64"] is not True:
            raise _fail("unencoded payloads (b64=false) are not accepted")
        # Steps 5-6: the header's public key, bound to the algorithm.
        cached = _proof_key(alg, header.get("jwk"))
        if key_cache is not None:
            if len(key_cache) >= _KEY_CACHE_SIZE:
                key_cache.clear()
            key_cache[header_segment] = cached
    elif cached.alg not in settings.algorithms:  # pragma: no cover - cache per settings
        raise _fail("its 'alg' is not an accepted asymmetric algorithm")
    signature = _b64decode(signature_segment)
    _verify_signature(cached, f"{header_segment}.{payload_segment}".encode("ascii"), signature)
    claims = _json_object(_b64decode(payload_segment), "payload")

    jti = claims.get("jti")
    if type(jti) is not str or not jti or len(jti) > MAX_PROOF_JTI:
        raise _fail("its 'jti' is missing or not a short string")
    # Step 7: the method, exact (methods are case-sensitive, RFC 9110 §9.1).
    htm = claims.get("htm")
    if type(htm) is not str or htm != method:
        raise _fail("its 'htm' does not match the request method")
    # Step 8: the URL, both sides normalised, query and fragment ignored.
    htu = claims.get("htu")
    if type(htu) is not str:
        raise _fail("its 'htu' is missing or not a string")
    if len(htu) > MAX_HTU:
        raise _fail(f"its 'htu' is longer than {MAX_HTU} characters, the limit for it")
    try:
        htu_normal = normalize_htu(htu)
    except M2MError as exc:
        raise _fail("its 'htu' is not an http(s) URL") from exc
    try:
        expected = normalize_htu(url)
    except M2MError as exc:
        # The URL is rebuilt from request headers (Host): a client's junk is a 401.
        raise _fail("the request URL could not be reconstructed") from exc
    if not _same(htu_normal, expected):
        raise _fail("its 'htu' does not match the request URL")
    # Step 9: the server's nonce, when it asks for one.
    nonce = claims.get("nonce")
    if nonce is not None and not (type(nonce) is str and valid_nonce(nonce)):
        raise _fail("its 'nonce' is not a valid nonce")
    if nonces is not None and (nonce is None or not nonces.accepts(nonce, now)):
        raise DPoPNonceRequired(
            "DPoP proof refused: the server requires a fresh nonce in the proof",
            nonce=nonces.current(now),
        )
    # Step 10: issued recently, and not post-dated.
    raw_iat: Any = claims.get("iat")
    try:
        if type(raw_iat) not in (int, float):
            raise TypeError
        iat = float(raw_iat)
        if not math.isfinite(iat):
            raise ValueError
    except (TypeError, ValueError, OverflowError) as exc:  # JSON allows 1e999 and 10**400
        raise _fail("its 'iat' is not a number") from exc
    if iat < now - settings.max_age:
        raise _fail("it is too old ('iat')")
    if iat > now + settings.max_future:
        raise _fail("it is issued in the future ('iat')")
    # Step 12a: it was made for this very token.
    if access_token is not None:
        ath = claims.get("ath")
        try:
            expected_ath = access_token_hash(access_token)
        except UnicodeEncodeError as exc:
            raise _fail("the access token is not ASCII") from exc
        if type(ath) is not str or not _same(ath, expected_ath):
            raise _fail("its 'ath' does not match the access token")
    return DPoPProof(
        jkt=cached.jkt,
        jti=jti,
        htm=htm,
        htu=htu_normal,
        iat=iat,
        nonce=nonce,
        replay_key=f"{cached.jkt}:{jti}",
        replay_expires_at=iat + settings.max_age + 1.0,
    )


def check_token_binding(claims: Mapping[str, Any], proof: DPoPProof) -> None:
    """The token's ``cnf.jkt`` must be the proof key's thumbprint (RFC 9449 §6.1, §7.1)."""
    jkt = token_jkt(claims)
    if jkt is None:
        raise DPoPBindingError(
            "the token is not DPoP-bound (no cnf.jkt) but was presented with the DPoP scheme"
        )
    if not _same(jkt, proof.jkt):
        raise DPoPProofError("DPoP proof refused: its key is not the key the token is bound to")


def token_jkt(claims: Mapping[str, Any]) -> str | None:
    """The ``cnf.jkt`` of verified token claims, or None for an unbound token."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    # Mapping, not dict: verified Claims hold nested objects as read-only mappings.
    if not isinstance(cnf, Mapping) or "jkt" not in cnf:
        # A cnf of another kind (x5t#S256: mTLS) is not ours to honour or drop silently.
        raise DPoPBindingError("the token's 'cnf' claim is not a DPoP binding (cnf.jkt)")
    jkt = cnf["jkt"]
    if type(jkt) is not str or not jkt:
        raise DPoPBindingError("the token's 'cnf.jkt' is not a string")
    return jkt


# --- replay --------------------------------------------------------------------------------


class ReplayCache(Protocol):
    """Remembers proof ``jti`` values until their proofs expire (RFC 9449 §11.1).

    A shared implementation (Redis ``SET key 1 NX PXAT expires_at``) lets a fleet of
    verifiers refuse a proof replayed to another instance.
    """

    def first_use(self, key: str, *, expires_at: float, now: float) -> bool:
        """Record ``key``; True if it was not already recorded (and unexpired)."""
        ...


class AsyncReplayCache(Protocol):
    """What a replay cache that does I/O adds for async verifiers: the same step, awaited.

    :class:`~m2m_client.verify.AsyncTokenVerifier` (and :meth:`DPoPChecker.check_async`)
    await this method when the cache has it, so a network round trip never blocks the
    event loop; :class:`~m2m_client.verify.TokenVerifier` calls :meth:`ReplayCache.first_use`.
    """

    async def first_use_async(self, key: str, *, expires_at: float, now: float) -> bool:
        """Record ``key``; True if it was not already recorded (and unexpired)."""
        ...


class MemoryReplayCache:
    """In-process replay cache, bounded by ``max_entries`` and expiring entries.

    When full of unexpired entries, the entry closest to expiry is dropped (and counted in
    :attr:`evicted`): size it above peak proofs per second times the ``iat`` window.
    Thread-safe.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ConfigurationError("the DPoP replay cache needs max_entries >= 1")
        self._max = max_entries
        # Insertion order is close to expiry order (expiry is iat + max_age, and iat
        # varies by the window), so the front holds the entries to expire first; an
        # expired entry further back is never taken for a replay and goes when it
        # reaches the front. The bound holds either way.
        self._entries: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        #: Unexpired entries dropped because the cache was full.
        self.evicted = 0

    def first_use(self, key: str, *, expires_at: float, now: float) -> bool:
        with self._lock:
            entries = self._entries
            seen = entries.get(key)
            if seen is not None and seen > now:
                return False
            while entries:
                oldest_key, oldest_expiry = next(iter(entries.items()))
                if oldest_expiry > now and len(entries) < self._max:
                    break
                del entries[oldest_key]
                if oldest_expiry > now:
                    if self.evicted == 0:
                        logger.warning(
                            "DPoP replay cache is full (%d entries): dropping unexpired entries",
                            self._max,
                        )
                    self.evicted += 1
            entries.pop(key, None)
            entries[key] = expires_at
            return True

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"MemoryReplayCache(entries={len(self._entries)}, max_entries={self._max})"


class DPoPChecker:
    """Proof checking with a replay cache and optional nonces: what a verifier holds.

    >>> checker = DPoPChecker()
    >>> proof = checker.check(request.headers.get_list("dpop"), method="GET",
    ...                       url=str(request.url), now=time.time(), access_token=token)
    >>> check_token_binding(claims, proof)
    """

    def __init__(
        self,
        settings: DPoPSettings | None = None,
        *,
        replay_cache: ReplayCache | None = None,
        nonces: NonceSource | None = None,
    ) -> None:
        self.settings = settings or DPoPSettings()
        self.replay_cache: ReplayCache = (
            replay_cache if replay_cache is not None else MemoryReplayCache()
        )
        self.nonces = nonces
        self._key_cache: dict[str, _ProofKey] = {}

    def check(
        self,
        proofs: str | Sequence[str] | None,
        *,
        method: str,
        url: str,
        now: float,
        access_token: str | None = None,
    ) -> DPoPProof:
        """:func:`check_proof`, then the replay check (step 11): a jti is good once."""
        proof = self.check_proof(proofs, method=method, url=url, now=now, access_token=access_token)
        self.check_replay(proof, now=now)
        return proof

    def check_proof(
        self,
        proofs: str | Sequence[str] | None,
        *,
        method: str,
        url: str,
        now: float,
        access_token: str | None = None,
    ) -> DPoPProof:
        """Every check but the replay step, with this checker's settings, nonces and keys."""
        return check_proof(
            proofs,
            method=method,
            url=url,
            now=now,
            access_token=access_token,
            settings=self.settings,
            nonces=self.nonces,
            key_cache=self._key_cache,
        )

    async def check_async(
        self,
        proofs: str | Sequence[str] | None,
        *,
        method: str,
        url: str,
        now: float,
        access_token: str | None = None,
    ) -> DPoPProof:
        """:meth:`check` for async code: the replay step never blocks the event loop."""
        proof = self.check_proof(proofs, method=method, url=url, now=now, access_token=access_token)
        await self.check_replay_async(proof, now=now)
        return proof

    @property
    def replay_does_io(self) -> bool:
        """False only for a :class:`MemoryReplayCache`: its check may run on an event loop."""
        return type(self.replay_cache) is not MemoryReplayCache

    def check_replay(self, proof: DPoPProof, *, now: float) -> None:
        """Step 11: refuse a proof whose ``jti`` was seen before, else remember it.

        Call it last, after every other check (the token binding too): only a proof that
        passed them all may take an entry. A shared cache that is down raises
        :class:`~m2m_client.errors.ReplayCacheUnavailable` (when it fails closed).
        """
        if not self.replay_cache.first_use(
            proof.replay_key, expires_at=proof.replay_expires_at, now=now
        ):
            raise _fail("it was already used (jti replay)")

    async def check_replay_async(self, proof: DPoPProof, *, now: float) -> None:
        """:meth:`check_replay` for async code (see :class:`AsyncReplayCache`)."""
        cache = self.replay_cache
        key, expires_at = proof.replay_key, proof.replay_expires_at
        first_use_async = getattr(cache, "first_use_async", None)
        if first_use_async is not None:
            first = bool(await first_use_async(key, expires_at=expires_at, now=now))
        elif not self.replay_does_io:
            first = cache.first_use(key, expires_at=expires_at, now=now)
        else:
            # A cache of its own with only the sync method may wait on a server: a
            # worker thread waits instead of the event loop (and every request on it).
            call = functools.partial(cache.first_use, key, expires_at=expires_at, now=now)
            first = await anyio.to_thread.run_sync(call)
        if not first:
            raise _fail("it was already used (jti replay)")

    def challenge(self, error: M2MError | None = None) -> str:
        """The ``WWW-Authenticate`` value for a refusal (or for a missing token)."""
        return dpop_challenge(error, algs=self.settings.algorithms)


# --- policy and answers ----------------------------------------------------------------------


def dpop_options(policy: object, checker: DPoPChecker | None) -> tuple[DPoPPolicy, DPoPChecker]:
    """A verifier's ``dpop`` and ``dpop_checker`` options, checked (ConfigurationError)."""
    if policy != "disabled" and policy != "allowed" and policy != "required":
        raise ConfigurationError("dpop must be 'disabled', 'allowed' or 'required'")
    if checker is not None and not isinstance(checker, DPoPChecker):
        raise ConfigurationError("dpop_checker must be a DPoPChecker")
    return policy, checker if checker is not None else DPoPChecker()


def dpop_decision(
    policy: DPoPPolicy, *, scheme: str, token_jkt: str | None
) -> Literal["bearer", "dpop"]:
    """How to accept a verified token under ``policy``: as a bearer token, or with a proof.

    ``scheme`` is the ``Authorization`` scheme (case-insensitive); ``token_jkt`` the token's
    ``cnf.jkt`` (:func:`token_jkt`). Raises :class:`~m2m_client.errors.DPoPBindingError`:

    - ``"disabled"``: DPoP is not spoken here; the DPoP scheme is refused, bearer use of
      any token accepted (as a server without DPoP support would, RFC 9449 §7.2).
    - ``"allowed"``: bearer for unbound tokens, DPoP with a proof for bound ones; a bound
      token sent as bearer is refused (the downgrade a thief would try).
    - ``"required"``: every token must come with the DPoP scheme and a proof.
    """
    if policy not in _POLICIES:
        raise ConfigurationError("dpop must be 'disabled', 'allowed' or 'required'")
    kind = scheme.lower()
    if kind == "bearer":
        if policy == "required":
            raise DPoPBindingError("this resource requires DPoP: send Authorization: DPoP")
        if policy == "allowed" and token_jkt is not None:
            raise DPoPBindingError(
                "the token is DPoP-bound and must be sent with Authorization: DPoP and a proof"
            )
        return "bearer"
    if kind == "dpop":
        if policy == "disabled":
            raise DPoPBindingError("this resource does not accept DPoP tokens")
        if token_jkt is None:
            raise DPoPBindingError("the token is not DPoP-bound but was sent as a DPoP token")
        return "dpop"
    raise DPoPBindingError("the Authorization scheme is neither Bearer nor DPoP")


def checked_proof(
    policy: DPoPPolicy,
    checker: DPoPChecker,
    token: str,
    claims: Mapping[str, Any],
    dpop_proof: str | Sequence[str] | None,
    method: str | None,
    url: str | None,
    clock: Callable[[], float],
) -> DPoPProof | None:
    """Apply ``policy`` to a verified token: None for bearer use, else its checked proof.

    Every check but the replay check, which the caller runs last (only a proof that passed
    every other check takes a replay-cache entry). Raises a DPoP error or, without the
    request's ``method`` and ``url``, ConfigurationError.
    """
    if dpop_proof is None and policy == "disabled":
        return None  # bearer use of any token: what dpop_decision answers here
    jkt = token_jkt(claims) if policy != "disabled" or dpop_proof is not None else None
    scheme = "bearer" if dpop_proof is None else "dpop"
    if dpop_decision(policy, scheme=scheme, token_jkt=jkt) == "bearer":
        return None
    if method is None or url is None:
        raise ConfigurationError("verify(dpop_proof=...) needs the request's method= and url=")
    proof = checker.check_proof(dpop_proof, method=method, url=url, now=clock(), access_token=token)
    check_token_binding(claims, proof)
    return proof


def dpop_challenge(
    error: M2MError | str | None = None,
    *,
    algs: Iterable[str] = DEFAULT_DPOP_ALGORITHMS,
    description: str | None = None,
    realm: str | None = None,
) -> str:
    """The ``WWW-Authenticate: DPoP ...`` value of a 401 (RFC 9449 §7.1).

    ``error`` is an exception from this package (its ``error_code``: ``invalid_dpop_proof``,
    ``use_dpop_nonce``, ``invalid_token``) or a code; None for a request without a token.
    A :class:`~m2m_client.errors.DPoPNonceRequired` answer must also carry its ``nonce``
    in a ``DPoP-Nonce`` header. ``description`` is never taken from the exception: its
    message may mention request details an attacker could use.
    """
    code = getattr(error, "error_code", "invalid_token") if isinstance(error, M2MError) else error
    return challenge(
        "DPoP",
        ("realm", realm),
        ("error", code),
        ("error_description", description),
        ("algs", " ".join(sorted(set(algs)))),
    )


def request_url(
    *,
    scheme: str,
    host: str,
    path: str,
    root_path: str = "",
    forwarded_proto: str | None = None,
    forwarded_host: str | None = None,
    trust_forwarded: bool = False,
) -> str:
    """The URL the client addressed, to compare with ``htu``: ``scheme://host/root_path+path``.

    ``host`` is the ``Host`` header (with its port). Behind a reverse proxy that
    terminates TLS or rewrites the host, pass ``X-Forwarded-Proto`` / ``X-Forwarded-Host``
    and ``trust_forwarded=True`` -- only when the proxy sets them and clients cannot
    (otherwise a client picks the URL its proof is checked against). The first value of a
    list is used: the one the outermost trusted proxy saw. ``root_path`` is a mount prefix
    the proxy strips (ASGI ``root_path``).
    """
    if trust_forwarded:
        if forwarded_proto:
            scheme = forwarded_proto.split(",")[0].strip()
        if forwarded_host:
            host = forwarded_host.split(",")[0].strip()
    if not host or any(c in host for c in "/?#@\\ "):
        raise DPoPProofError("DPoP proof refused: the request's Host header is not a host")
    return f"{scheme.lower()}://{host}{root_path}{path or '/'}"
