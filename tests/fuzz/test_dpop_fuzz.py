"""DPoP proofs with one hostile field each, end to end: never a 500, never a stray exception.

Issue 19 item 9: a proof whose ``ath`` held a non-ASCII character made
``hmac.compare_digest`` raise TypeError (a 500 in JWTBearer), before the key-binding check,
so anyone holding a stolen token could cause it. The class: every header member, every
``jwk`` member, every claim of a proof, and the token's ``cnf.jkt``, set one at a time to a
non-ASCII, non-string, empty or huge value while everything else is valid and correctly
signed (so the check of that very field is reached). Through the verifiers (sync and async),
FastAPI's JWTBearer on Starlette's TestClient (with and without server nonces), and
LocalIssuer's token endpoint over real HTTP: a typed refusal (401 / 400
``invalid_dpop_proof`` / ``use_dpop_nonce``), or acceptance only where the value is in fact
valid.
"""

# No `from __future__ import annotations`: FastAPI evaluates the Annotated[..., Depends(x)]
# hints of the route functions at runtime.

import base64
import json
import secrets
import time
from typing import Annotated, Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2m_client._dpop import DPoPKey, access_token_hash, jwk_thumbprint, valid_nonce
from m2m_client.errors import VerificationError
from m2m_client.fastapi import JWTBearer
from m2m_client.testing import LocalIssuer
from m2m_client.verify import (
    AsyncTokenVerifier,
    Claims,
    DPoPChecker,
    HmacNonceSource,
    TokenVerifier,
)

ISSUER = LocalIssuer(url="http://127.0.0.1:1/")  # in process, through issuer.transport()
URL = "http://testserver/data"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEYS = {"ES256": EC_KEY, "RS256": RSA_KEY}
JWKS = {alg: DPoPKey(key, alg=alg).public_jwk for alg, key in KEYS.items()}

# Values that have broken parsers before: non-ASCII (also in the Latin-1 range, which a
# header decoded as Latin-1 holds), lone surrogates (JSON can carry them, UTF-8 cannot),
# non-strings of every JSON type (NaN and infinities too: Python's JSON writes and reads
# them), empty, and huge.
HOSTILE = st.one_of(
    st.text(min_size=1, max_size=12).filter(lambda text: not text.isascii()),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
    st.sampled_from(
        ["", " ", "\u00e9", "\u00ff" * 43, "\uff21", "\x00", "\ud800", "%", ",", "x" * 20_000]
    ),
    st.integers(),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)
# (where, name, key algorithm): every header member and claim of a proof, the members of
# both kinds of jwk, and the token's binding.
TARGETS = [
    ("header", "typ", "ES256"),
    ("header", "alg", "ES256"),
    ("header", "jwk", "ES256"),
    ("jwk", "kty", "ES256"),
    ("jwk", "crv", "ES256"),
    ("jwk", "x", "ES256"),
    ("jwk", "y", "ES256"),
    ("jwk", "kty", "RS256"),
    ("jwk", "n", "RS256"),
    ("jwk", "e", "RS256"),
    ("claim", "jti", "ES256"),
    ("claim", "htm", "ES256"),
    ("claim", "htu", "ES256"),
    ("claim", "iat", "ES256"),
    ("claim", "ath", "ES256"),
    ("claim", "nonce", "ES256"),
    ("token", "cnf.jkt", "ES256"),
    ("token", "cnf", "ES256"),
]
TARGET = st.sampled_from(TARGETS)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: Any) -> bytes:
    # ensure_ascii=True escapes lone surrogates as \ud800, which json.loads reads back.
    return json.dumps(value).encode("ascii")


def token_and_proof(
    where: str, name: str, alg: str, value: Any, *, method: str = "GET", url: str = URL
) -> tuple[str, str, Any]:
    """A token bound to a key and a proof signed by it (and the key), ``name`` set to ``value``.

    A fuzzed ``jti`` gets a key of its own each time: hypothesis repeats values, and a
    ``jti`` seen before with the same key is rightly a replay.
    """
    key = ec.generate_private_key(ec.SECP256R1()) if name == "jti" else KEYS[alg]
    jwk = DPoPKey(key, alg=alg).public_jwk
    cnf: Any = {"jkt": jwk_thumbprint(jwk)}
    if where == "token":
        cnf = {"jkt": value} if name == "cnf.jkt" else value
    token = ISSUER.mint(cnf=cnf)
    header: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": jwk}
    claims: dict[str, Any] = {
        "jti": secrets.token_urlsafe(16),
        "htm": method,
        "htu": url,
        "iat": int(time.time()),
        "ath": access_token_hash(token),
    }
    if where == "header":
        header[name] = value
    elif where == "jwk":
        header["jwk"] = {**jwk, name: value}
    elif where == "claim":
        claims[name] = value
    return token, _signed(key, f"{b64(_json(header))}.{b64(_json(claims))}"), key


def _signed(key: Any, signing_input: str) -> str:
    data = signing_input.encode("ascii")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def _resigned(proof: str, key: Any, *, nonce: str | None = None, drop: str | None = None) -> str:
    """``proof`` with a nonce added and/or a claim dropped, signed again."""
    header_segment, payload_segment, _ = proof.split(".")
    claims = json.loads(
        base64.urlsafe_b64decode(payload_segment + "=" * (-len(payload_segment) % 4))
    )
    if nonce is not None:
        claims["nonce"] = nonce
    if drop is not None:
        claims.pop(drop, None)
    return _signed(key, f"{header_segment}.{b64(_json(claims))}")


def may_pass(where: str, name: str, alg: str, value: Any, *, nonces: bool = False) -> bool:
    """Whether the proof (or token) is still valid with ``name`` set to ``value``."""
    if isinstance(value, str) and len(value) > 4096:
        return False  # past a size limit of the proof (or of a claim)
    if where == "claim" and name == "jti":
        return type(value) is str and 0 < len(value) <= 256
    if where == "claim" and name == "nonce":
        return not nonces and (value is None or valid_nonce(value))
    if where == "claim" and name == "iat":
        return (
            type(value) in (int, float)
            and time.time() - 290 < value < time.time() + 50  # False for NaN and 10**400
        )
    if where == "header" and name == "typ":
        return type(value) is str and value.lower() in ("dpop+jwt", "application/dpop+jwt")
    original: Any
    if where == "header":
        original = {"typ": "dpop+jwt", "alg": alg, "jwk": JWKS[alg]}[name]
    elif where == "jwk":
        original = JWKS[alg][name]
    elif where == "token":
        thumbprint = jwk_thumbprint(JWKS[alg])
        original = thumbprint if name == "cnf.jkt" else {"jkt": thumbprint}
    else:
        return False  # htm, htu, ath: only the right value passes, and that is not hostile
    return type(value) is type(original) and value == original


def verifier_options() -> dict[str, Any]:
    return {"issuer": ISSUER.url, "audience": ISSUER.audience, "dpop": "required"}


SYNC_VERIFIER = TokenVerifier(
    http_client=httpx.Client(transport=ISSUER.transport()), **verifier_options()
)
FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _outcome(call: Any) -> str:
    try:
        call()
    except VerificationError:
        return "refused"
    return "accepted"


@FUZZ
@given(TARGET, HOSTILE)
def test_sync_verifier_refuses_every_hostile_field_with_a_typed_error(
    target: tuple[str, str, str], value: Any
) -> None:
    token, proof, _ = token_and_proof(*target, value)
    outcome = _outcome(lambda: SYNC_VERIFIER.verify(token, dpop_proof=proof, method="GET", url=URL))
    assert outcome == ("accepted" if may_pass(*target, value) else "refused")


@pytest.mark.anyio
@FUZZ
@given(target=TARGET, value=HOSTILE)
async def test_async_verifier_refuses_every_hostile_field_with_a_typed_error(
    target: tuple[str, str, str], value: Any
) -> None:
    token, proof, _ = token_and_proof(*target, value)
    async with httpx.AsyncClient(transport=ISSUER.transport()) as http:
        verifier = AsyncTokenVerifier(http_client=http, **verifier_options())
        try:
            await verifier.verify(token, dpop_proof=proof, method="GET", url=URL)
            outcome = "accepted"
        except VerificationError:
            outcome = "refused"
    assert outcome == ("accepted" if may_pass(*target, value) else "refused")


def _api(verifier: TokenVerifier | AsyncTokenVerifier) -> TestClient:
    app = FastAPI()
    auth = JWTBearer(verifier)

    @app.get("/data")
    async def data(claims: Annotated[Claims, Depends(auth)]) -> dict[str, str]:
        return {"sub": claims.subject}

    # raise_server_exceptions=False: a crash must show as the 500 a client would get.
    return TestClient(app, raise_server_exceptions=False)


NONCES = HmacNonceSource(b"n" * 32)
APIS = {
    "sync": _api(SYNC_VERIFIER),
    "async": _api(
        AsyncTokenVerifier(
            http_client=httpx.AsyncClient(transport=ISSUER.transport()), **verifier_options()
        )
    ),
    "nonces": _api(
        TokenVerifier(
            http_client=httpx.Client(transport=ISSUER.transport()),
            dpop_checker=DPoPChecker(nonces=NONCES),
            **verifier_options(),
        )
    ),
}


def _with_nonce(target: tuple[str, str, str], value: Any) -> tuple[str, str]:
    """For the API with nonces: a current nonce in the proof unless the nonce is the target."""
    where, name, alg = target
    if (where, name) == ("claim", "nonce"):
        return token_and_proof(where, name, alg, value)[:2]
    token, proof, key = token_and_proof(where, name, alg, value)
    return token, _resigned(proof, key, nonce=NONCES.current(time.time()))


@FUZZ
@given(st.sampled_from(sorted(APIS)), TARGET, HOSTILE)
def test_jwtbearer_answers_every_hostile_field_with_a_401(
    api: str, target: tuple[str, str, str], value: Any
) -> None:
    nonces = api == "nonces"
    token, proof = _with_nonce(target, value) if nonces else token_and_proof(*target, value)[:2]
    response = APIS[api].get("/data", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
    if may_pass(*target, value, nonces=nonces):
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("DPoP ")
    assert 'algs="' in challenge
    if 'error="use_dpop_nonce"' in challenge:
        assert nonces
        assert valid_nonce(response.headers["dpop-nonce"])


HEADER_VALUES = st.one_of(
    st.binary(max_size=40).filter(lambda raw: b"\r" not in raw and b"\n" not in raw),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40),
    st.sampled_from(["", " ", ",", "a.b.c", "e30.e30.e30", "A" * 30_000]),
)


@FUZZ
@given(st.sampled_from(sorted(APIS)), st.lists(HEADER_VALUES, min_size=1, max_size=3))
def test_jwtbearer_answers_any_dpop_header_bytes_with_a_401(api: str, values: list[Any]) -> None:
    token = token_and_proof("claim", "jti", "ES256", "x")[0]
    headers: list[tuple[str, str | bytes]] = [("Authorization", f"DPoP {token}")]
    headers += [
        ("DPoP", value.encode("latin-1") if isinstance(value, str) else value) for value in values
    ]
    response = APIS[api].get("/data", headers=headers)
    assert response.status_code == 401, response.text
    assert 'error="invalid_dpop_proof"' in response.headers["www-authenticate"]


@pytest.mark.parametrize("api", sorted(APIS))
def test_jwtbearer_refuses_two_valid_dpop_headers(api: str) -> None:
    # RFC 9449 §4.3 step 1 / §7.1: not more than one DPoP header, even two good proofs.
    target = ("claim", "jti", "ES256")
    token, one = (
        _with_nonce(target, "one") if api == "nonces" else token_and_proof(*target, "one")[:2]
    )
    response = APIS[api].get(
        "/data", headers=[("Authorization", f"DPoP {token}"), ("DPoP", one), ("DPoP", one)]
    )
    assert response.status_code == 401
    assert 'error="invalid_dpop_proof"' in response.headers["www-authenticate"]
    # The same proof alone passes: it was the second header that was refused.
    response = APIS[api].get("/data", headers={"Authorization": f"DPoP {token}", "DPoP": one})
    assert response.status_code == 200, response.text


# --- LocalIssuer's token endpoint, over real HTTP ---------------------------------------------

CLIENT, SECRET = "fuzz-client", "fuzz-client-secret"


@pytest.fixture(scope="module")
def served_issuer() -> Any:
    with LocalIssuer() as issuer:
        issuer.add_client(CLIENT, SECRET)
        yield issuer


def token_request_proof(
    token_url: str, where: str, name: str, alg: str, value: Any, nonce: str | None
) -> str:
    if where == "token":  # no token at the token endpoint: a plain proof instead
        where, name, value = "claim", "jti", secrets.token_urlsafe(16)
    _, proof, key = token_and_proof(where, name, alg, value, method="POST", url=token_url)
    # A token request has no token yet: no ath (unless fuzzed: then it must be ignored);
    # the server's nonce unless the nonce is fuzzed.
    keep_nonce = nonce is None or (where, name) == ("claim", "nonce")
    drop = None if (where, name) == ("claim", "ath") else "ath"
    return _resigned(proof, key, nonce=None if keep_nonce else nonce, drop=drop)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(TARGET, HOSTILE, st.booleans())
def test_local_issuer_answers_every_hostile_proof_with_a_400(
    served_issuer: LocalIssuer, target: tuple[str, str, str], value: Any, nonce_required: bool
) -> None:
    served_issuer.dpop_nonce = nonce_required
    nonce = served_issuer._token_endpoint._dpop_nonces.current(time.time())
    proof = token_request_proof(
        served_issuer.token_url, *target, value, nonce if nonce_required else None
    )
    with httpx.Client(timeout=10) as http:
        response = http.post(
            served_issuer.token_url,
            data={"grant_type": "client_credentials"},
            auth=(CLIENT, SECRET),
            headers={"DPoP": proof},
        )
    where, name, alg = target
    # No token, so no ath to check (RFC 9449 §4.3 step 12 is for resource requests).
    huge_ath = (where, name) == ("claim", "ath") and isinstance(value, str) and len(value) > 4096
    ignored = where == "token" or ((where, name) == ("claim", "ath") and not huge_ath)
    passes = ignored or may_pass(where, name, alg, value, nonces=nonce_required)
    if passes:
        assert response.status_code == 200, response.text
        assert response.json()["token_type"] == "DPoP"
        return
    assert response.status_code == 400, response.text
    assert response.json()["error"] in ("invalid_dpop_proof", "use_dpop_nonce")
    if response.json()["error"] == "use_dpop_nonce":
        assert valid_nonce(response.headers["dpop-nonce"])


# --- every field x every kind of hostile value, deterministically ---------------------------

KINDS = {
    "non-ASCII": "\u00e9\u00e9",
    "lone surrogate": "\ud800",
    "full-width": "\uff21",
    "integer": 7,
    "huge integer": 10**400,
    "NaN": float("nan"),
    "infinity": float("inf"),
    "list": ["a"],
    "object": {"a": "b"},
    "null": None,
    "true": True,
    "empty": "",
    "huge": "x" * 20_000,
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("target", TARGETS, ids=["-".join(t) for t in TARGETS])
def test_every_field_with_every_kind_of_hostile_value(
    target: tuple[str, str, str], kind: str
) -> None:
    # Hypothesis samples; this covers each pair once: the ath non-ASCII case of issue 19
    # and its siblings (cnf.jkt, nonce, every claim) through the verifier and JWTBearer.
    value = KINDS[kind]
    expected = "accepted" if may_pass(*target, value) else "refused"
    token, proof, _ = token_and_proof(*target, value)
    outcome = _outcome(lambda: SYNC_VERIFIER.verify(token, dpop_proof=proof, method="GET", url=URL))
    assert outcome == expected
    for api in ("async", "nonces"):
        nonces = api == "nonces"
        token, proof = _with_nonce(target, value) if nonces else token_and_proof(*target, value)[:2]
        response = APIS[api].get("/data", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
        passes = may_pass(*target, value, nonces=nonces)
        assert response.status_code == (200 if passes else 401), (api, response.text)
