"""JOSE tables and limits, one definition each, for the calling and the receiving side.

Which algorithms exist and which key each needs (RFC 7518), which JWK members a key type has
(RFC 7517, RFC 7638), and every size bound on what an unauthenticated peer can send us (a
DPoP proof, an access token, a JWKS body, a target URL). ``DPoPKey`` signs with these
tables, the verifier checks tokens and proofs with them: a limit changed here changes both
sides at once, so a proof we make is never refused by our own verifier for its size or key.
Data only: no I/O, no imports beyond ``cryptography``'s curve, hash, padding and ECDSA
classes (the signature schemes are made once, at import, for the verifier's hot path).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

__all__ = [
    "CURVE_ALG",
    "DEFAULT_DPOP_ALGORITHMS",
    "DPOP_ALGORITHMS",
    "EC_CURVES",
    "EC_SCHEMES",
    "JWKS_CURVE_ALGS",
    "MAX_HTU",
    "MAX_JWKS_BYTES",
    "MAX_KID_LENGTH",
    "MAX_PROOF_HEADER_SEGMENT",
    "MAX_PROOF_JTI",
    "MAX_PROOF_LENGTH",
    "MAX_PROOF_PAYLOAD_SEGMENT",
    "MAX_PROOF_SIGNATURE_SEGMENT",
    "MAX_RSA_BITS",
    "MAX_TOKEN_HEADER_SEGMENT",
    "MAX_TOKEN_LENGTH",
    "MIN_RSA_BITS",
    "PRIVATE_MEMBERS",
    "PUBLIC_MEMBERS",
    "RSA_ALGS",
    "RSA_HASHES",
    "RSA_SCHEMES",
    "SUPPORTED_ALGORITHMS",
    "THUMBPRINT_MEMBERS",
    "Curve",
]


# --- algorithms ------------------------------------------------------------------------------


class Curve(NamedTuple):
    """What an ``ES*`` algorithm signs with: its curve, JWK ``crv``, coordinate bytes, hash."""

    curve: type[ec.EllipticCurve]
    crv: str
    size: int
    digest: hashes.HashAlgorithm


#: RFC 7518 §3.4: the curve (and hash) each ECDSA algorithm is defined with.
EC_CURVES: Mapping[str, Curve] = {
    "ES256": Curve(ec.SECP256R1, "P-256", 32, hashes.SHA256()),
    "ES384": Curve(ec.SECP384R1, "P-384", 48, hashes.SHA384()),
    "ES512": Curve(ec.SECP521R1, "P-521", 66, hashes.SHA512()),
}
#: cryptography's curve name -> the algorithm a key on that curve signs with.
CURVE_ALG: Mapping[str, str] = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
#: RFC 7518 §3.3/§3.5: the hash of each RSA algorithm (RS* PKCS#1 v1.5, PS* PSS).
RSA_HASHES: Mapping[str, hashes.HashAlgorithm] = {
    "RS256": hashes.SHA256(),
    "RS384": hashes.SHA384(),
    "RS512": hashes.SHA512(),
    "PS256": hashes.SHA256(),
    "PS384": hashes.SHA384(),
    "PS512": hashes.SHA512(),
}
RSA_ALGS = frozenset(RSA_HASHES)
#: JWKS keys: a JWK's ``crv`` -> the algorithms a key on it may verify (ES521 is an alias
#: some issuers publish for ES512).
JWKS_CURVE_ALGS: Mapping[str, frozenset[str]] = {
    "P-256": frozenset({"ES256"}),
    "P-384": frozenset({"ES384"}),
    "P-521": frozenset({"ES512", "ES521"}),
    "secp256k1": frozenset({"ES256K"}),
    "Ed25519": frozenset({"EdDSA"}),
    "Ed448": frozenset({"EdDSA"}),
}
#: Every algorithm a token verifier may allow: asymmetric only (no "none", no HMAC).
SUPPORTED_ALGORITHMS = RSA_ALGS.union(*JWKS_CURVE_ALGS.values())
#: The padding and hash each RSA algorithm verifies with, made once (not per token or proof).
RSA_SCHEMES: Mapping[str, tuple[padding.AsymmetricPadding, hashes.HashAlgorithm]] = {
    alg: (
        padding.PSS(padding.MGF1(digest), padding.PSS.DIGEST_LENGTH)
        if alg.startswith("PS")
        else padding.PKCS1v15(),
        digest,
    )
    for alg, digest in RSA_HASHES.items()
}
#: The ECDSA scheme each EC algorithm verifies with: PyJWT's hash choices, aliases included
#: (ES256K signs with SHA-256, ES521 is ES512; a unit test compares with PyJWT's table).
EC_SCHEMES: Mapping[str, ec.ECDSA] = {
    name: ec.ECDSA(digest)
    for name, digest in (
        *((name, curve.digest) for name, curve in EC_CURVES.items()),
        ("ES256K", hashes.SHA256()),
        ("ES521", hashes.SHA512()),
    )
}
#: Algorithms ``DPoPKey.generate`` can make keys for (RFC 9449 §4.2: asymmetric only).
DPOP_ALGORITHMS = ("ES256", "ES384", "ES512", "PS256", "RS256", "EdDSA")
#: DPoP proof algorithms accepted by default (RFC 9449 §4.3 step 4; no "none", no HMAC).
DEFAULT_DPOP_ALGORITHMS = RSA_ALGS | frozenset(EC_CURVES) | {"EdDSA"}

# --- JWK members -----------------------------------------------------------------------------

#: RFC 7638 §3.2: the required members of each key type, in lexicographic order.
THUMBPRINT_MEMBERS: Mapping[str, tuple[str, ...]] = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}
#: The public members a JWKS key of each type must have.
# A dict, not a Mapping: mypy narrows `kty in PUBLIC_MEMBERS` to str only for a dict.
PUBLIC_MEMBERS: dict[str, tuple[str, ...]] = {
    "RSA": ("n", "e"),
    "EC": ("crv", "x", "y"),
    "OKP": ("crv", "x"),
}
#: RFC 7517/7518: members that make a JWK private (or symmetric).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

# --- limits ----------------------------------------------------------------------------------
# Each bounds the work an unauthenticated peer can cause before a signature check, and each
# is the largest a proof DPoPKey makes can need. Every refusal names its limit.

#: Smallest RSA key taken anywhere (JWKS keys, DPoP keys, proofs).
MIN_RSA_BITS = 2048
#: Largest RSA key a proof may carry: what the verifier accepts, so what DPoPKey takes.
MAX_RSA_BITS = 8192
#: Longest ``htu`` (RFC 9110 §4.1 asks servers to take request targets of 8000 octets at least).
MAX_HTU = 8192
#: Largest JWKS body read; real key sets are a few KiB. It also bounds the number of keys
#: (about 600 RSA keys), so no key is ever dropped by a count limit.
MAX_JWKS_BYTES = 256 * 1024
#: Longest access token accepted. Access tokens are ~1 KiB.
MAX_TOKEN_LENGTH = 16 * 1024
#: Longest access token header segment (about 1.5 KiB of JSON); a proof's is longer.
MAX_TOKEN_HEADER_SEGMENT = 2048
#: Longest ``kid`` in an access token header.
MAX_KID_LENGTH = 256
#: Longest proof header segment: an RSA-8192 JWK makes ~1,900 characters.
MAX_PROOF_HEADER_SEGMENT = 4096
#: Longest proof payload segment: base64url of 10 KiB of claims (``htu`` plus 2 KiB).
MAX_PROOF_PAYLOAD_SEGMENT = -(-(MAX_HTU + 2048) * 4 // 3)
#: Longest proof signature segment: an RSA-8192 signature (1,024 bytes).
MAX_PROOF_SIGNATURE_SEGMENT = -(-(MAX_RSA_BITS // 8) * 4 // 3)
#: Longest proof accepted: the three segment limits and the two dots.
MAX_PROOF_LENGTH = (
    MAX_PROOF_HEADER_SEGMENT + MAX_PROOF_PAYLOAD_SEGMENT + MAX_PROOF_SIGNATURE_SEGMENT + 2
)
#: Longest proof ``jti``.
MAX_PROOF_JTI = 256
