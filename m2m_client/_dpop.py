"""DPoP (RFC 9449), calling side, sans-IO: the key, its proofs, server nonces.

Nothing here does I/O or reads the clock: every function that needs the time takes
``now``. The token clients and ``BearerAuth`` call :meth:`DPoPKey.proof` once per HTTP
request, so that path is kept short: the JOSE header is encoded once per key, ``htu``
and ``ath`` are memoised, and signing calls ``cryptography`` directly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import string
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import idna
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from m2m_client import _stacks
from m2m_client._jose import (
    CURVE_ALG,
    DPOP_ALGORITHMS,
    EC_CURVES,
    MAX_HTU,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    RSA_HASHES,
    THUMBPRINT_MEMBERS,
)
from m2m_client._refusal import parse_www_authenticate
from m2m_client.errors import ConfigurationError

__all__ = [
    "DPOP_ALGORITHMS",
    "DPoPKey",
    "NonceStore",
    "access_token_hash",
    "jwk_thumbprint",
    "normalize_htu",
    "resource_nonce_challenge",
    "token_endpoint_nonce_challenge",
    "wire_htu",
]

# RFC 9110 §5.6.2 token: an HTTP method is one; none of these characters needs JSON escaping.
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
# RFC 9449 §8.1: nonce = 1*NQCHAR (printable ASCII but '"' and '\'); bounded by us.
_NONCE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,512}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
# Characters RFC 3986 allows literally in a path (pchar + "/"); "%" keeps existing escapes.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_HTU_CACHE_SIZE = 64


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_int(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return _b64url(value.to_bytes(size, "big"))


def access_token_hash(access_token: str) -> str:
    """The ``ath`` claim for a token: base64url(SHA-256(ASCII token)) (RFC 9449 §4.2)."""
    return _b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the ``jkt`` that DPoP binds tokens to.

    Only the key type's required public members count, so ``kid``, ``alg`` or ``use``
    do not change it. Raises :class:`~m2m_client.errors.ConfigurationError` for a JWK
    without them.
    """
    members = THUMBPRINT_MEMBERS.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None:
        raise ConfigurationError("the JWK's 'kty' is not EC, RSA or OKP")
    canonical = {}
    for name in members:
        value = jwk.get(name)
        if type(value) is not str:
            raise ConfigurationError(f"the JWK has no {name!r} string")
        canonical[name] = value
    # RFC 7638 §3: members in lexicographic order, no whitespace. json.dumps escapes
    # exactly as RFC 7159 requires; the values are base64url or short ASCII names.
    text = json.dumps(canonical, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(text.encode("utf-8")).digest())


# --- htu --------------------------------------------------------------------------------


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 §5.2.4, on whole segments.
    if "." not in path:
        return path
    output: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    result = "/".join(output)
    return result if result.startswith("/") else "/" + result


def _normalize_pct(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _bad_url(why: str) -> NoReturn:
    raise ConfigurationError(f"the DPoP target URL {why}")


def wire_htu(url: str) -> str:
    """The ``htu`` for a request to ``url``: the URI exactly as httpx (or httpx2) sends it.

    Scheme, host (the IDNA A-label), the port unless it is the default one, and the path as
    it goes over the wire (``/a|b`` stays ``/a|b``, ``/%7euser`` stays ``/%7euser``),
    without query and fragment. A server that compares ``htu`` with the URI it received,
    as node oidc-provider does, then finds what it got; one that normalises both (RFC 9449
    §4.3, :func:`normalize_htu`) finds the same too.
    """
    if not isinstance(url, str):
        _bad_url("is not a string")
    stack = _stacks.default()  # httpx, else httpx2: both build the request target alike
    try:
        parsed = stack.URL(url)
        port = parsed.port
        host = parsed.raw_host.decode("ascii")
        path = parsed.raw_path.partition(b"?")[0].decode("ascii")
    except (stack.InvalidURL, ValueError, TypeError, UnicodeError):
        _bad_url("is not a valid URL")
    scheme = parsed.scheme
    if scheme not in _DEFAULT_PORTS:
        _bad_url("is not an absolute http(s) URL")
    if not host:
        _bad_url("has no host")
    if port is not None and not 0 < port < 65536:
        _bad_url("has a port outside 1...65535")
    if ":" in host:
        host = f"[{host}]"
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return f"{scheme}://{authority}{path or '/'}"


def normalize_htu(url: str) -> str:
    """The ``htu`` value for a request URL: no query, no fragment, RFC 3986 §6.2.2-6.2.3 normal.

    Lower-case scheme and host (a non-ASCII host as its UTS 46 A-label, as httpx sends it),
    no default port, no user info, an empty path made ``/``, percent-escapes upper-cased and
    unreserved ones decoded, dot segments removed. The verifier applies it to ``htu`` and to
    the request URL, so ``https://API.example.com:443/a/../data?x=1`` and
    ``https://api.example.com/data`` match (RFC 9449 §4.3 step 9).
    """
    if not isinstance(url, str):
        _bad_url("is not a string")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        _bad_url("is not a valid URL")
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        _bad_url("is not an absolute http(s) URL")
    host = parts.hostname
    if not host:
        _bad_url("has no host")
    if not host.isascii():
        # UTS 46 (IDNA 2008), as httpx and browsers send it: IDNA 2003 (Python's "idna"
        # codec) maps "faß.de" to "fass.de", which is another domain.
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            _bad_url("has a host name that is not valid IDNA")
    if ":" in host:
        host = f"[{host}]"
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = parts.path or "/"
    # Non-ASCII and other characters a URL may not carry literally are escaped as a WHATWG
    # parser (node, browsers) would; then escapes are made canonical (§6.2.2.1/§6.2.2.2).
    try:
        path = quote(path, safe=_PATH_SAFE)
    except UnicodeError:  # a lone surrogate (JSON can carry one) has no UTF-8 form
        _bad_url("has a path that is not valid Unicode")
    if "%" in path:
        path = _PCT.sub(_normalize_pct, path)
    path = _remove_dot_segments(path)
    return f"{scheme}://{authority}{path}"


# --- the key -----------------------------------------------------------------------------

_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DPoPKey:
    """A DPoP key pair: signs the per-request proofs that bind tokens to this client.

    >>> key = DPoPKey.generate()                    # ES256, the default
    >>> proof = key.proof("GET", "https://api.example.com/data", now=time.time(),
    ...                   access_token=token)
    >>> key.thumbprint                              # the ``cnf.jkt`` of tokens bound to it

    The private key never leaves the object: ``repr`` shows the algorithm and thumbprint
    only, and pickling is refused (a fleet that shares tokens shares the key through
    :meth:`from_pem`, never through a cache).
    """

    __slots__ = (
        "__weakref__",
        "_alg",
        "_ath_memo",
        "_header_segment",
        "_htu_memo",
        "_lock",
        "_private_key",
        "_public_jwk",
        "_sign",
        "_thumbprint",
    )

    def __init__(self, private_key: _PrivateKey, *, alg: str | None = None) -> None:
        """Wrap a ``cryptography`` private key; ``alg`` defaults from the key type.

        EC keys sign with ES256/ES384/ES512 (by curve), Ed25519 with EdDSA, RSA keys
        (2048 bits or more) with RS256 unless ``alg`` says ``PS256`` etc.
        """
        self._alg, self._public_jwk, self._sign = _signer(private_key, alg)
        self._private_key = private_key
        self._thumbprint = jwk_thumbprint(self._public_jwk)
        header = {"typ": "dpop+jwt", "alg": self._alg, "jwk": self._public_jwk}
        self._header_segment = _b64url(json.dumps(header, separators=(",", ":")).encode())
        self._htu_memo: OrderedDict[str, str] = OrderedDict()
        self._ath_memo: tuple[str, str] = ("", "")
        self._lock = threading.Lock()

    @classmethod
    def generate(cls, alg: str = "ES256") -> DPoPKey:
        """A new random key for ``alg`` (one of :data:`DPOP_ALGORITHMS`; ES256 by default)."""
        if alg in EC_CURVES:
            return cls(ec.generate_private_key(EC_CURVES[alg][0]()), alg=alg)
        if alg in ("PS256", "RS256"):
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), alg=alg)
        if alg == "EdDSA":
            return cls(ed25519.Ed25519PrivateKey.generate(), alg=alg)
        raise ConfigurationError(f"DPoP key algorithm must be one of {list(DPOP_ALGORITHMS)}")

    @classmethod
    def from_pem(
        cls, pem: str | bytes, password: str | bytes | None = None, *, alg: str | None = None
    ) -> DPoPKey:
        """Load a PEM private key (PKCS#8, or traditional EC/RSA), optionally encrypted."""
        return cls(_load_pem(pem, password), alg=alg)

    @property
    def alg(self) -> str:
        """The JWS algorithm of the proofs (``ES256`` ...)."""
        return self._alg

    @property
    def public_jwk(self) -> dict[str, str]:
        """The public key as a JWK (a copy): what every proof's header carries."""
        return dict(self._public_jwk)

    @property
    def thumbprint(self) -> str:
        """RFC 7638 thumbprint of the public key: the ``cnf.jkt`` of bound tokens."""
        return self._thumbprint

    def private_key_pem(self, password: str | bytes | None = None) -> bytes:
        """Export the private key as PKCS#8 PEM, encrypted when ``password`` is given.

        For handing the key to other processes of a fleet (see :meth:`from_pem`).
        """
        return _pkcs8_pem(self._private_key, password)

    def _htu(self, url: str) -> str:
        # Callers hit a handful of endpoints; memoise the normalised, JSON-quoted htu.
        base = url.partition("#")[0].partition("?")[0]
        memo = self._htu_memo
        quoted = memo.get(base)
        if quoted is None:
            htu = wire_htu(base)
            if len(htu) > MAX_HTU:
                raise ConfigurationError(
                    f"the DPoP target URL is longer than {MAX_HTU} characters (without its "
                    "query), the longest htu a verifier of this package accepts"
                )
            quoted = json.dumps(htu)
            with self._lock:
                if len(memo) >= _HTU_CACHE_SIZE:
                    memo.popitem(last=False)
                memo[base] = quoted
        return quoted

    def _ath(self, access_token: str) -> str:
        # One token serves thousands of requests: remember the last hash.
        token, ath = self._ath_memo
        if token != access_token:
            try:
                ath = access_token_hash(access_token)
            except UnicodeEncodeError as exc:
                raise ConfigurationError("the access token is not ASCII") from exc
            self._ath_memo = (access_token, ath)
        return ath

    def proof(
        self,
        method: str,
        url: str,
        *,
        now: float,
        access_token: str | None = None,
        nonce: str | None = None,
    ) -> str:
        """A fresh DPoP proof JWT for one HTTP request (RFC 9449 §4.2).

        ``htu`` is ``url`` as httpx sends it (:func:`wire_htu`), at most :data:`MAX_HTU`
        characters; ``url`` may carry a query and fragment (they are left out of ``htu``);
        ``access_token`` adds ``ath`` (resource requests); ``nonce`` is the server's last
        ``DPoP-Nonce``. Each call has a new random ``jti``.
        """
        if type(method) is not str or not _METHOD.fullmatch(method):
            raise ConfigurationError("the DPoP method is not an HTTP method name")
        htu = self._htu(url)
        jti = _b64url(os.urandom(16))
        # Every value is either escaped by json.dumps (htu) or restricted to characters
        # that need no escaping (method, jti, ath, nonce), so an f-string is valid JSON.
        try:
            iat = int(now)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigurationError("the DPoP proof time 'now' is not a finite number") from exc
        payload = f'{{"jti":"{jti}","htm":"{method}","htu":{htu},"iat":{iat}'
        if access_token is not None:
            payload += f',"ath":"{self._ath(access_token)}"'
        if nonce is not None:
            if type(nonce) is not str or not _NONCE.fullmatch(nonce):
                raise ConfigurationError("the DPoP nonce is not a valid nonce (RFC 9449 §8.1)")
            payload += f',"nonce":"{nonce}"'
        signing_input = f"{self._header_segment}.{_b64url(payload.encode() + b'}')}"
        signature = self._sign(signing_input.encode("ascii"))
        return f"{signing_input}.{_b64url(signature)}"

    def __repr__(self) -> str:
        return f"DPoPKey(alg={self._alg!r}, thumbprint={self._thumbprint!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "DPoPKey is not picklable: the private key must not travel through caches or "
            "logs; share it with DPoPKey.from_pem(...) where a fleet needs one key"
        )

    def __copy__(self) -> DPoPKey:
        return self  # immutable: copies (pydantic, dataclasses.replace) share the key

    def __deepcopy__(self, memo: dict[int, Any]) -> DPoPKey:
        return self


def _load_pem(pem: str | bytes, password: str | bytes | None) -> _PrivateKey:
    """The private key of a PEM document (what :meth:`DPoPKey.from_pem` wraps)."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    secret = password.encode("utf-8") if isinstance(password, str) else password
    try:
        key = serialization.load_pem_private_key(data, password=secret)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # cryptography's messages never contain key material, but say nothing
        # specific either way: a wrong password and a damaged file look alike.
        raise ConfigurationError(
            "the DPoP key is not a readable PEM private key (wrong or missing password?)"
        ) from exc
    if not isinstance(
        key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
    ):
        raise ConfigurationError("the DPoP key must be an EC, RSA or Ed25519 private key")
    return key


def _pkcs8_pem(private_key: _PrivateKey, password: str | bytes | None) -> bytes:
    """``private_key`` as PKCS#8 PEM, encrypted when ``password`` is given."""
    secret = password.encode("utf-8") if isinstance(password, str) else password
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    )
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _signer(
    private_key: object, alg: str | None
) -> tuple[str, dict[str, str], Callable[[bytes], bytes]]:
    """(alg, public JWK, sign function) for a private key, the alg checked against it."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        natural = CURVE_ALG.get(private_key.curve.name)
        if natural is None or (alg is not None and alg != natural):
            raise ConfigurationError(
                "a DPoP EC key must be P-256 (ES256), P-384 (ES384) or P-521 (ES512)"
            )
        _curve, crv, size, digest = EC_CURVES[natural]
        numbers = private_key.public_key().public_numbers()
        jwk = {
            "kty": "EC",
            "crv": crv,
            "x": _b64url_int(numbers.x, size),
            "y": _b64url_int(numbers.y, size),
        }
        ecdsa = ec.ECDSA(digest)
        sign_der = private_key.sign

        def sign_ec(data: bytes) -> bytes:
            # JWS wants the raw r || s (RFC 7518 §3.4), cryptography returns DER.
            r, s = decode_dss_signature(sign_der(data, ecdsa))
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")

        return natural, jwk, sign_ec
    if isinstance(private_key, rsa.RSAPrivateKey):
        chosen = alg or "RS256"
        if chosen not in RSA_HASHES:
            raise ConfigurationError("a DPoP RSA key signs with RS256/384/512 or PS256/384/512")
        if not MIN_RSA_BITS <= private_key.key_size <= MAX_RSA_BITS:
            # Above MAX_RSA_BITS every proof would be refused by the verifier: say so now.
            raise ConfigurationError(
                f"a DPoP RSA key must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
            )
        public = private_key.public_key().public_numbers()
        jwk = {"kty": "RSA", "e": _b64url_int(public.e), "n": _b64url_int(public.n)}
        digest = RSA_HASHES[chosen]
        pad: padding.AsymmetricPadding = (
            padding.PSS(padding.MGF1(digest), padding.PSS.DIGEST_LENGTH)  # RFC 7518 §3.5
            if chosen.startswith("PS")
            else padding.PKCS1v15()
        )
        sign_rsa = private_key.sign
        return chosen, jwk, lambda data: sign_rsa(data, pad, digest)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        if alg not in (None, "EdDSA"):
            raise ConfigurationError("a DPoP Ed25519 key signs with EdDSA")
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return "EdDSA", {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}, private_key.sign
    raise ConfigurationError("the DPoP key must be an EC, RSA or Ed25519 private key")


# --- server nonces ------------------------------------------------------------------------


def _origin(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, TypeError):
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def valid_nonce(value: object) -> bool:
    """Whether a ``DPoP-Nonce`` value has the RFC 9449 §8.1 syntax (and our length bound)."""
    return type(value) is str and _NONCE.fullmatch(value) is not None


class NonceStore:
    """The last ``DPoP-Nonce`` each origin (scheme, host, port) sent, bounded.

    RFC 9449 §8.2: a server may send a new nonce on any response; the client uses the
    latest one in its next proof to that server. Thread-safe; ``max_origins`` bounds
    memory (least recently updated origins are dropped first).
    """

    def __init__(self, *, max_origins: int = 256) -> None:
        if max_origins < 1:
            raise ConfigurationError("NonceStore max_origins must be at least 1")
        self._max = max_origins
        self._nonces: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, url: str) -> str | None:
        """The nonce to put in the next proof for ``url``, if its origin sent one."""
        origin = _origin(url)
        return None if origin is None else self._nonces.get(origin)

    def update(self, url: str, nonce: str | None) -> bool:
        """Remember ``nonce`` (a response's ``DPoP-Nonce`` header) for ``url``'s origin.

        A missing or malformed value is ignored (returns False): a broken header must
        not poison the next proof.
        """
        if nonce is None or not valid_nonce(nonce):
            return False
        origin = _origin(url)
        if origin is None:
            return False
        with self._lock:
            self._nonces[origin] = nonce
            self._nonces.move_to_end(origin)
            while len(self._nonces) > self._max:
                self._nonces.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._nonces)

    def __repr__(self) -> str:
        return f"NonceStore(origins={len(self._nonces)}, max_origins={self._max})"


def token_endpoint_nonce_challenge(
    status_code: int, error: str | None, dpop_nonce: str | None
) -> str | None:
    """The nonce to retry a token request with, or None if this is not a nonce challenge.

    RFC 9449 §8: HTTP 400, ``{"error": "use_dpop_nonce"}`` and a ``DPoP-Nonce`` header.
    ``error`` is the parsed OAuth error code of the body.
    """
    if status_code == 400 and error == "use_dpop_nonce" and valid_nonce(dpop_nonce):
        return dpop_nonce
    return None


def resource_nonce_challenge(
    status_code: int, www_authenticate: str | Iterable[str] | None, dpop_nonce: str | None
) -> str | None:
    """The nonce to retry a resource request with, or None if this is not a nonce challenge.

    RFC 9449 §9: HTTP 401, a ``WWW-Authenticate: DPoP error="use_dpop_nonce"`` challenge
    and a ``DPoP-Nonce`` header. ``www_authenticate`` is the header's value, or all its
    values when it was sent more than once.
    """
    if status_code != 401 or not valid_nonce(dpop_nonce) or www_authenticate is None:
        return None
    for scheme, params in parse_www_authenticate(www_authenticate):
        if scheme == "dpop" and params.get("error") == "use_dpop_nonce":
            return dpop_nonce
    return None
