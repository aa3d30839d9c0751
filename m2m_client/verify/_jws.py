"""Compact JWS parsing and header checks (RFC 7515), sans-IO.

Every check PyJWT makes on the encoding (alphabet, no padding, canonical last character)
is kept, but done with a few C-speed string passes and set lookups instead of a
per-character Python loop, so parsing costs a few microseconds next to the signature check.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import re
from collections.abc import Callable
from json.scanner import make_scanner
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import Algorithm, get_default_algorithms

from m2m_client._jose import (
    EC_SCHEMES,
    MAX_KID_LENGTH,
    MAX_TOKEN_HEADER_SEGMENT,
    MAX_TOKEN_LENGTH,
    RSA_SCHEMES,
)
from m2m_client.errors import InvalidToken

__all__ = [
    "HeaderCache",
    "ParsedToken",
    "b64url_decode",
    "check_header",
    "check_signature",
    "json_object",
    "parse_compact",
]

# The base64url alphabet of every segment (RFC 7515 §2: no padding, no other characters):
# with '-', '_' and the dots made letters, the ASCII bytes must all be alphanumeric. Three
# C-speed passes (memchr-driven replaces and a table walk): fewer instructions than a
# regex, or than bytes.translate deleting the alphabet (valgrind: ~5k against 6.6k).
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# A segment of length 4k+2 (4k+3) ends in a character carrying 4 (2) unused bits; a
# canonical encoder leaves them zero. Accepting other characters would let one token
# have many spellings (GHSA-hxm8-2xgr-2p9m), which also defeats a cache keyed by token.
# By length % 4; a segment of length 4k+1 is never valid (no character fits).
_LAST_CHAR_OK: tuple[frozenset[str], ...] = (
    frozenset(),
    frozenset(),
    frozenset("AQgw"),
    frozenset("AEIMQUYcgkosw048"),
)
# The "=" padding a2b_base64 needs, by length % 4 (4k+1 is refused before decoding).
_PADDING = ("", "", "==", "=")
_a2b = binascii.a2b_base64
# The C scanner JSONDecoder.raw_decode calls (json.scanner.c_make_scanner wherever the
# _json accelerator exists), called directly: one Python frame less per token.
_scan_once: Callable[[str, int], tuple[Any, int]] = make_scanner(cast(Any, json.JSONDecoder()))
_JSON_WS = " \t\n\r"
#: Distinct header segments remembered per verifier: one issuer uses a handful.
HEADER_CACHE_SIZE = 256
# kid values are opaque, but a sane one is short printable ASCII; base64 ("+/="),
# URL and URN characters are used by real issuers (Cognito, Entra, Keycloak).
_KID = re.compile(rf"[A-Za-z0-9._~+/=:@#-]{{1,{MAX_KID_LENGTH}}}")
# The key must come from the issuer's JWKS only: a token naming its own key or key URL
# is the CVE-2018-0114 family of attacks. "zip" is JWE-only (RFC 7516 §4.1.3).
_FORBIDDEN_HEADERS = frozenset({"jku", "jwk", "x5u", "zip"})
_TYP_ACCESS_TOKEN = frozenset({"at+jwt", "application/at+jwt"})


def json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Parse UTF-8 JSON (RFC 7515 §5.2 requires UTF-8) that must be an object.

    ``raw_decode`` skips json.loads's encoding sniffing (which would also accept
    UTF-16/32); the rare input with surrounding whitespace takes the slow path.
    """
    try:
        text = raw.decode("utf-8")
        try:
            # The decoder's C scanner itself: raw_decode minus one Python frame.
            value, end = _scan_once(text, 0)
        except (ValueError, StopIteration):  # not JSON at 0 (maybe leading whitespace)
            value, end = json.loads(text), len(text)
        if end != len(text) and text[end:].strip(_JSON_WS):
            raise ValueError("extra data after the JSON value")
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidToken(f"the token's {what} is not JSON", reason="malformed") from exc
    if type(value) is not dict:
        raise InvalidToken(f"the token's {what} is not a JSON object", reason="malformed")
    return value


def b64url_decode(segment: str, what: str) -> bytes:
    """Decode one base64url segment whose alphabet was already checked."""
    rem = len(segment) & 3
    if rem and segment[-1] not in _LAST_CHAR_OK[rem]:
        raise _not_canonical(what)
    try:
        return _a2b(segment.replace("-", "+").replace("_", "/") + _PADDING[rem])
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - alphabet checked
        raise InvalidToken(
            f"the token's {what} is not valid base64url", reason="malformed"
        ) from exc


def _not_canonical(what: str) -> InvalidToken:
    return InvalidToken(f"the token's {what} is not canonical base64url", reason="malformed")


class ParsedToken:
    """A compact JWS split and decoded; the signature is not checked yet.

    ``checked`` is the ``(alg, kid)`` of a header that already passed :func:`check_header`
    under the same policy (from the :class:`HeaderCache`), else None.
    """

    __slots__ = (
        "checked",
        "header",
        "header_segment",
        "payload_segment",
        "signature",
        "signing_input",
    )

    def __init__(
        self,
        header: dict[str, Any],
        signing_input: bytes,
        payload_segment: str,
        signature: bytes,
        header_segment: str = "",
    ) -> None:
        self.header = header
        self.signing_input = signing_input
        self.payload_segment = payload_segment
        self.signature = signature
        self.header_segment = header_segment
        self.checked: tuple[str, str | None] | None = None

    def payload(self) -> dict[str, Any]:
        """Decode the payload; call only after the signature verified."""
        segment = self.payload_segment
        rem = len(segment) & 3
        if rem and segment[-1] not in _LAST_CHAR_OK[rem]:
            raise _not_canonical("payload")
        try:
            raw = _a2b(segment.replace("-", "+").replace("_", "/") + _PADDING[rem])
        except (binascii.Error, ValueError) as exc:  # a ParsedToken not from parse_compact
            raise InvalidToken(
                "the token's payload is not valid base64url", reason="malformed"
            ) from exc
        # json_object's usual case inline (a whole UTF-8 JSON object, nothing around it);
        # anything else, errors included, is decided by json_object itself.
        try:
            text = raw.decode("utf-8")
            value, end = _scan_once(text, 0)
        except (ValueError, StopIteration, RecursionError):
            return json_object(raw, "payload")
        if end != len(text) or type(value) is not dict:
            return json_object(raw, "payload")
        return value


def _diagnose(token: str) -> InvalidToken:
    """Explain why a token failed the fast shape check (slow path, errors only)."""
    if token[:7].lower() == "bearer ":
        return InvalidToken(
            "pass the token without the 'Bearer ' prefix (that belongs to the HTTP header)",
            reason="malformed",
        )
    segments = token.split(".")
    if len(segments) == 5:
        return InvalidToken(
            "the token is an encrypted JWE; only signed JWS access tokens are accepted",
            reason="malformed",
        )
    if len(segments) != 3:
        return InvalidToken(
            f"the token has {len(segments)} segments; a JWS has 3", reason="malformed"
        )
    names = ("header", "payload", "signature")
    for name, segment in zip(names, segments, strict=True):
        if not segment:
            return InvalidToken(f"the token's {name} is empty", reason="malformed")
        if not _B64URL.fullmatch(segment):
            return InvalidToken(
                f"the token's {name} contains characters outside base64url", reason="malformed"
            )
    if len(segments[0]) > MAX_TOKEN_HEADER_SEGMENT:
        return InvalidToken("the token's header is too large", reason="malformed")
    return InvalidToken("the token is malformed", reason="malformed")


class HeaderCache:
    """Decoded header segments of tokens whose signature verified, oldest evicted first.

    An issuer reuses one header per key, so a few entries serve every token. Filled only
    after a signature check, so unsigned junk cannot crowd the real headers out. Each entry
    may also hold the ``(alg, kid)`` :func:`check_header` returned for it: one cache serves
    one verifier, whose algorithms and token type never change, so the verdict on the same
    header bytes cannot either.
    """

    __slots__ = ("_entries", "size")

    def __init__(self, size: int = HEADER_CACHE_SIZE) -> None:
        self.size = size
        self._entries: dict[str, tuple[dict[str, Any], tuple[str, str | None] | None]] = {}

    def get(self, segment: str) -> dict[str, Any] | None:
        entry = self._entries.get(segment)
        return entry[0] if entry is not None else None

    def add(
        self,
        segment: str,
        header: dict[str, Any],
        checked: tuple[str, str | None] | None = None,
    ) -> None:
        entries = self._entries
        if segment in entries or not segment:
            return
        if len(entries) >= self.size:
            # Another thread may evict concurrently (sync verifier).
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del entries[next(iter(entries))]
        entries[segment] = (header, checked)

    def __len__(self) -> int:
        return len(self._entries)


def parse_compact(token: object, headers: HeaderCache | None = None) -> ParsedToken:
    """Split a compact JWS, check its encoding and decode header and signature.

    Raises InvalidToken for anything but a well-formed, canonically encoded JWS whose
    header is a JSON object. Messages never repeat any part of the token. ``headers``
    is an optional cache of decoded header segments; its values must not be mutated.
    """
    if type(token) is not str:
        token = _as_str(token)
    size = len(token)
    if size > MAX_TOKEN_LENGTH:
        raise InvalidToken(
            f"the token is longer than {MAX_TOKEN_LENGTH} characters", reason="malformed"
        )
    # Shape and alphabet: exactly three segments of base64url characters, each of at least
    # two, the header at most MAX_TOKEN_HEADER_SEGMENT; anything else is diagnosed (slow path).
    # (str.find is a memchr; str.split(".") would step through every character.)
    first = token.find(".")
    second = token.find(".", first + 1)
    if (
        not 2 <= first <= MAX_TOKEN_HEADER_SEGMENT
        or second - first < 3
        or size - second < 3
        or token.find(".", second + 1) != -1
        or not token.isascii()
    ):
        raise _diagnose(token)
    data = token.encode("ascii")
    if not data.replace(b"-", b"A").replace(b"_", b"A").replace(b".", b"A").isalnum():
        raise _diagnose(token)
    header_segment = token[:first]
    payload_segment = token[first + 1 : second]
    signature_segment = token[second + 1 :]
    entry = headers._entries.get(header_segment) if headers is not None else None
    if entry is None:
        header = json_object(b64url_decode(header_segment, "header"), "header")
    else:
        header = entry[0]
    # Checked before decoding the payload so an invalid signature costs no JSON work.
    # (b64url_decode inline.)
    rem = len(signature_segment) & 3
    if rem and signature_segment[-1] not in _LAST_CHAR_OK[rem]:
        raise _not_canonical("signature")
    try:
        signature = _a2b(signature_segment.replace("-", "+").replace("_", "/") + _PADDING[rem])
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - alphabet checked
        raise InvalidToken(
            "the token's signature is not valid base64url", reason="malformed"
        ) from exc
    rem = (second - first - 1) & 3
    if rem and payload_segment[-1] not in _LAST_CHAR_OK[rem]:
        raise _not_canonical("payload")
    parsed = ParsedToken(header, data[:second], payload_segment, signature, header_segment)
    if entry is not None:
        parsed.checked = entry[1]
    return parsed


def _as_str(token: object) -> str:
    """A token given as ASCII bytes, as str; anything else is refused."""
    if isinstance(token, bytes):
        try:
            return token.decode("ascii")
        except UnicodeDecodeError as exc:
            raise InvalidToken("the token contains non-ASCII bytes", reason="malformed") from exc
    if isinstance(token, str):  # a str subclass, taken as it is
        return token
    raise InvalidToken("the token must be a string", reason="malformed")


# Other algorithms (EdDSA) verify through PyJWT's algorithm objects; RSA and ECDSA with
# cryptography directly (_jose's schemes: the same call, without building the padding and
# hash objects again for each token).
_ALGORITHMS: dict[str, Algorithm] = get_default_algorithms()
# The kind ("RSA", "EC" or "") of each concrete key class met: the ABCs' isinstance costs a
# Python-level __instancecheck__ per token, a dict lookup of the exact type does not.
_KEY_KINDS: dict[type, str] = {}


def _key_kind(key: Any) -> str:
    if isinstance(key, RSAPublicKey):
        kind = "RSA"
    elif isinstance(key, EllipticCurvePublicKey):
        kind = "EC"
    else:
        kind = ""
    if len(_KEY_KINDS) < 16:  # bounded: a program has a few key classes
        _KEY_KINDS[type(key)] = kind
    return kind


def check_signature(parsed: ParsedToken, alg: str, key: Any) -> None:
    """Raise InvalidToken unless ``parsed`` carries a valid ``alg`` signature by ``key``.

    RSA signatures must be exactly the modulus length (RFC 8017 §8.1.2, §8.2.2): OpenSSL
    also accepts one with its leading zero byte dropped, which would give one token two
    spellings. ECDSA signatures are not normalised to low S: JWS does not require it, so
    (r, s) and (r, n - s) both verify (two spellings, two verified-token cache entries).
    """
    signature = parsed.signature
    kind = _KEY_KINDS.get(type(key))
    if kind is None:
        kind = _key_kind(key)
    rsa = RSA_SCHEMES.get(alg)
    if rsa is not None and kind == "RSA":
        if len(signature) != (key.key_size + 7) // 8:
            raise InvalidToken("the token's signature does not verify", reason="signature")
        try:
            key.verify(signature, parsed.signing_input, *rsa)
        except InvalidSignature:
            raise InvalidToken(
                "the token's signature does not verify", reason="signature"
            ) from None
        except Exception as exc:  # malformed signature bytes must not escape as 500s
            raise InvalidToken("the token's signature is malformed", reason="signature") from exc
        return
    ecdsa = EC_SCHEMES.get(alg)
    if ecdsa is not None and kind == "EC":
        # JWS's raw r || s (RFC 7518 §3.4), each exactly the curve's size, as PyJWT's
        # raw_to_der_signature requires, then DER for cryptography.
        size = (key.curve.key_size + 7) // 8
        if len(signature) != 2 * size:
            raise InvalidToken("the token's signature does not verify", reason="signature")
        try:
            key.verify(
                encode_dss_signature(
                    int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
                ),
                parsed.signing_input,
                ecdsa,
            )
        except InvalidSignature:
            raise InvalidToken(
                "the token's signature does not verify", reason="signature"
            ) from None
        except Exception as exc:  # malformed signature bytes must not escape as 500s
            raise InvalidToken("the token's signature is malformed", reason="signature") from exc
        return
    if kind == "RSA" and len(signature) != (key.key_size + 7) // 8:
        raise InvalidToken("the token's signature does not verify", reason="signature")
    try:
        ok = _ALGORITHMS[alg].verify(parsed.signing_input, key, signature)
    except Exception as exc:  # malformed signature bytes must not escape as 500s
        raise InvalidToken("the token's signature is malformed", reason="signature") from exc
    if not ok:
        raise InvalidToken("the token's signature does not verify", reason="signature")


def check_header(
    header: dict[str, Any], algorithms: frozenset[str], token_type: str | None
) -> tuple[str, str | None]:
    """Check a JWS header against the policy; return ``(alg, kid)``.

    Raises InvalidToken without echoing attacker-controlled values.
    """
    alg = header.get("alg")
    if type(alg) is not str:
        raise InvalidToken("the token's header has no 'alg' string", reason="algorithm")
    if alg not in algorithms:
        if alg.lower() == "none":
            raise InvalidToken(
                "unsigned tokens (alg 'none') are never accepted", reason="algorithm"
            )
        if alg.upper().startswith("HS"):
            # RFC 8725 §2.1/§3.1: an HMAC "signature" made with the public key would
            # verify if the key type were not bound to the algorithm.
            raise InvalidToken(
                "HMAC algorithms are not accepted: the issuer's keys are public", reason="algorithm"
            )
        raise InvalidToken(
            f"the token's algorithm is not one of {sorted(algorithms)}", reason="algorithm"
        )
    if not _FORBIDDEN_HEADERS.isdisjoint(header):
        raise InvalidToken(
            "the token names its own key or key URL (jku/jwk/x5u); keys come only from "
            "the issuer's JWKS",
            reason="header",
        )
    if "crit" in header:
        # RFC 7515 §4.1.11: extensions we do not understand must make the JWS invalid.
        raise InvalidToken(
            "the token lists critical header extensions this verifier does not support",
            reason="header",
        )
    if "b64" in header and header["b64"] is not True:
        raise InvalidToken(
            "unencoded payloads (RFC 7797 b64=false) are not accepted", reason="header"
        )
    kid = header.get("kid")
    if kid is not None and (type(kid) is not str or not _KID.fullmatch(kid) or ".." in kid):
        raise InvalidToken("the token's 'kid' is not a short printable identifier", reason="header")
    if token_type is not None:
        typ = header.get("typ")
        # RFC 9068 §4: reject access tokens without the at+jwt type (prevents an ID token
        # or another JWT from the same issuer being replayed as an access token).
        if type(typ) is not str or typ.lower() not in _TYP_ACCESS_TOKEN:
            raise InvalidToken(
                "the token's 'typ' header is not 'at+jwt' (RFC 9068)", reason="token_type"
            )
    return alg, kid
