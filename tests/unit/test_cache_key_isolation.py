"""What a cached token belongs to (issue 18): a property of every ClientCredentials field.

Two clients whose credentials differ in any one field never share an entry: not in the
in-process cache (their CacheKeys differ), not in Redis (their names differ, and a value
sealed for one does not open for the other, encrypted or not). The only exceptions are the
fields of ``NOT_IN_CACHE_KEY``, which cannot change what the server issues, and which
docs/security.md lists. The fields are read from the model itself: a field added later
without a decision here fails this test.
"""

from __future__ import annotations

import base64
import json
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from m2m_client import ClientCredentials, DPoPKey, RefreshPolicy
from m2m_client._client._decisions import NOT_IN_CACHE_KEY, _ClientCore
from m2m_client._singleflight import SingleFlight
from m2m_client._token import CacheKey
from m2m_client.cache._codec import Codec, UndecodableEntry

ROOT = Path(__file__).resolve().parents[2]
FLEET_KEY = "isolation-test-fleet-key-" + "f" * 20


def _pem(key: Any, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> str:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


_RSA = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]
RSA_A, RSA_B = (_pem(k) for k in _RSA)
RSA_A_PKCS1 = _pem(_RSA[0], serialization.PrivateFormat.TraditionalOpenSSL)
DPOP_A, DPOP_B = DPoPKey.generate(), DPoPKey.generate()

SECRET_BASE: dict[str, Any] = {
    "token_url": "https://idp.test/oauth/token",
    "issuer": "https://idp.test/",
    "client_id": "worker",
    "client_secret": "s3cret-" + "a" * 32,
    "auth_method": "client_secret_basic",
    "audience": "https://api.test",
    "resource": "https://api.test/r",
    "scope": ("read", "write"),
    "extra_params": {"organization": "org_A"},
}
KEY_BASE: dict[str, Any] = {
    "token_url": "https://idp.test/oauth/token",
    "client_id": "worker",
    "private_key": RSA_A,
    "private_key_id": "kid-1",
    "signing_algorithm": "RS256",
    "assertion_audience": "https://idp.test/",
    "audience": "https://api.test",
    "scope": ("read",),
}


def _jwt(**claims: Any) -> str:
    """An (unsigned) JWT: the identity in a cache key is read without verification."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    body = {"exp": int(time.time()) + 3600, "jti": random.random(), **claims}
    return f"{part({'alg': 'RS256'})}.{part(body)}.c2ln"


_FILES = Path(tempfile.mkdtemp(prefix="m2m-isolation-"))


def _file(name: str, text: str) -> Path:
    path = _FILES / name
    path.write_text(text, encoding="utf-8")
    return path


POD = {"iss": "https://k8s.test", "sub": "system:serviceaccount:ns:worker", "aud": "idp"}
ASSERTION_A = _file("assertion-a", _jwt(**POD))
ASSERTION_A2 = _file("assertion-a2", _jwt(**POD))  # another pod, the same identity
ASSERTION_OTHERS = [
    _file("assertion-sub", _jwt(**{**POD, "sub": "system:serviceaccount:ns:other"})),
    _file("assertion-iss", _jwt(**{**POD, "iss": "https://other.test"})),
    _file("assertion-aud", _jwt(**{**POD, "aud": ["idp", "x"]})),
]
SECRET_FILE_A = _file("secret-a", "file-s3cret-" + "a" * 20)
SECRET_FILE_B = _file("secret-b", "file-s3cret-" + "b" * 20)
KEY_FILE_A = _file("key-a.pem", RSA_A)
KEY_FILE_B = _file("key-b.pem", RSA_B)
SECRET_FILE_BASE: dict[str, Any] = {
    **{k: v for k, v in SECRET_BASE.items() if k != "client_secret"},
    "client_secret_file": SECRET_FILE_A,
}
KEY_FILE_BASE: dict[str, Any] = {
    **{k: v for k, v in KEY_BASE.items() if k != "private_key"},
    "private_key_file": KEY_FILE_A,
}
ASSERTION_BASE: dict[str, Any] = {
    "token_url": "https://idp.test/oauth/token",
    "client_id": "worker",
    "client_assertion": ASSERTION_A,
    "audience": "https://api.test",
}

# --- how to vary each field (given a base, draw another value of that field only) --------

urls = st.from_regex(r"https://[a-z]{1,8}\.test/[a-z]{0,6}", fullmatch=True)
texts = st.text(min_size=1, max_size=20)
maybe = st.one_of  # readability below
scope_lists = st.lists(st.from_regex(r"[a-z:.]{1,8}", fullmatch=True), min_size=0, max_size=4)
param_names = st.from_regex(r"[a-z_]{1,10}", fullmatch=True).filter(
    lambda n: (
        n not in {"grant_type", "client_id", "client_secret", "scope", "audience"}
        and n not in {"resource", "client_assertion", "client_assertion_type"}
    )
)
param_dicts = st.dictionaries(param_names, st.text(max_size=12), max_size=3)

Variant = Callable[[dict[str, Any]], st.SearchStrategy[Any]]
VARIANTS: dict[str, tuple[dict[str, Any], Variant]] = {
    # field: (the base to vary, a strategy for the field's new value given that base)
    "token_url": (SECRET_BASE, lambda b: urls),
    "issuer": (SECRET_BASE, lambda b: maybe(st.none(), urls)),
    "client_id": (SECRET_BASE, lambda b: texts),
    "client_secret": (SECRET_BASE, lambda b: texts),
    "private_key": (KEY_BASE, lambda b: st.just(RSA_B)),
    "private_key_id": (KEY_BASE, lambda b: maybe(st.none(), texts)),
    "signing_algorithm": (KEY_BASE, lambda b: st.just("PS256")),
    "assertion_audience": (KEY_BASE, lambda b: maybe(st.none(), urls)),
    "auth_method": (SECRET_BASE, lambda b: st.just("client_secret_post")),
    "audience": (SECRET_BASE, lambda b: maybe(st.none(), texts)),
    "resource": (SECRET_BASE, lambda b: maybe(st.none(), urls)),
    "scope": (SECRET_BASE, lambda b: scope_lists),
    "extra_params": (SECRET_BASE, lambda b: param_dicts),
    "dpop": (SECRET_BASE, lambda b: st.sampled_from([DPOP_A, DPOP_B])),
    # Issue 21: a file's content is the credential; an assertion's asserted identity is.
    "client_secret_file": (SECRET_FILE_BASE, lambda b: st.just(SECRET_FILE_B)),
    "private_key_file": (KEY_FILE_BASE, lambda b: st.just(KEY_FILE_B)),
    "client_assertion": (ASSERTION_BASE, lambda b: st.sampled_from(ASSERTION_OTHERS)),
}
# Fields that prove the right to a token: they must change the sealing key too, not only the
# name (holding the fleet key must not be enough to open another credential's entries).
CREDENTIAL_FIELDS = {
    "client_secret",
    "private_key",
    "private_key_id",
    "signing_algorithm",
    "assertion_audience",
    "issuer",
    "auth_method",
    "client_secret_file",
    "private_key_file",
    "client_assertion",
}


def key_of(creds: ClientCredentials) -> CacheKey:
    """The cache key a token client of ``creds`` uses (built as the client builds it)."""
    core = _ClientCore(creds, flights=SingleFlight(threading.Event))
    return core.default_key


def _token() -> Any:
    return RefreshPolicy().make_token(
        access_token="tok",
        token_type="Bearer",
        expires_in=600,
        scope=None,
        sent_at=1_800_000_000.0,
        rng=random.Random(1),
    )


def assert_never_shared(one: CacheKey, two: CacheKey, *, credential: bool) -> None:
    assert one != two  # in-process caches (a cache= shared by two clients) keep them apart
    for fleet_key in (FLEET_KEY, None):
        codec = Codec("m2m", fleet_key)
        a, b = codec.names(one), codec.names(two)
        assert {a.token, a.lease, a.negative, a.channel}.isdisjoint(
            {b.token, b.lease, b.negative, b.channel}
        )
        if credential:
            assert a.entry_key != b.entry_key
        # A's entry, copied under B's name (someone who can write Redis), does not open.
        value = codec.encode_token(a, _token())
        with pytest.raises(UndecodableEntry):
            codec.decode_token(b, value)


@pytest.mark.parametrize("field", sorted(ClientCredentials.model_fields))
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_credentials_differing_in_any_one_field_never_share_an_entry(
    field: str, data: st.DataObject
) -> None:
    if field in NOT_IN_CACHE_KEY:
        # Documented as unable to change what the server issues: such clients DO share.
        base = ClientCredentials(**SECRET_BASE)
        other = ClientCredentials(**{**SECRET_BASE, field: data.draw(st.floats(0.5, 300))})
        assert key_of(base) == key_of(other)
        return
    assert field in VARIANTS, (
        f"ClientCredentials.{field} is new: put it in the cache key (or the credential id) and "
        "add a variant here, or add it to NOT_IN_CACHE_KEY and docs/security.md if it cannot "
        "change what the server issues"
    )
    base_kwargs, variant = VARIANTS[field]
    value = data.draw(variant(base_kwargs))
    base = ClientCredentials(**base_kwargs)
    changed = ClientCredentials(**{**base_kwargs, field: value})
    if field == "scope":
        assume(set(changed.scope) != set(base.scope))  # RFC 6749 §3.3: a set, order is noise
    assume(getattr(changed, field) != getattr(base, field))
    for name in ClientCredentials.model_fields:  # exactly one field differs
        if name != field:
            assert getattr(changed, name) == getattr(base, name), name
    assert_never_shared(key_of(base), key_of(changed), credential=field in CREDENTIAL_FIELDS)


@pytest.mark.parametrize("base", [SECRET_BASE, KEY_BASE], ids=["secret", "private-key"])
def test_the_same_credentials_in_another_process_find_the_same_entry(base: dict[str, Any]) -> None:
    # Built twice (as two processes would): equal keys, equal names, and each opens the
    # other's entries. Order of scopes and extra parameters does not matter.
    one = key_of(ClientCredentials(**base))
    again = dict(base, scope=tuple(reversed(base["scope"])))
    if "extra_params" in base:
        again["extra_params"] = dict(reversed(list({**base["extra_params"], "x": "1"}.items())))
        base = dict(base, extra_params={**base["extra_params"], "x": "1"})
        one = key_of(ClientCredentials(**base))
    two = key_of(ClientCredentials(**again))
    assert one == two
    for fleet_key in (FLEET_KEY, None):
        codec = Codec("m2m", fleet_key)
        assert codec.names(one) == codec.names(two)
        value = codec.encode_token(codec.names(one), _token())
        assert codec.decode_token(codec.names(two), value).access_token == "tok"


def test_a_private_key_is_the_same_credential_in_any_pem_format() -> None:
    pkcs8 = key_of(ClientCredentials(**KEY_BASE))
    pkcs1 = key_of(ClientCredentials(**{**KEY_BASE, "private_key": RSA_A_PKCS1}))
    assert pkcs8 == pkcs1


def test_a_client_with_dpop_true_never_shares_its_key_with_another() -> None:
    # dpop=True is a fresh key per client object: its tokens are bound to that key.
    creds = ClientCredentials(**{**SECRET_BASE, "dpop": True})
    assert_never_shared(key_of(creds), key_of(creds), credential=False)


def test_no_secret_shows_in_a_cache_key_or_a_redis_name() -> None:
    creds = ClientCredentials(**SECRET_BASE)
    key = key_of(creds)
    assert SECRET_BASE["client_secret"] not in repr(key)
    assert key.credential is not None
    assert key.credential.digest.hex() not in repr(key)
    names = Codec("m2m", None).names(key)
    for name in (names.token, names.lease, names.negative, names.channel):
        assert key.credential.digest.hex()[:16] not in name
    assert names.entry_key.hex() not in repr(names)


def test_the_fields_outside_the_cache_key_are_few_and_documented() -> None:
    security = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    assert {"timeout"} == NOT_IN_CACHE_KEY
    for name in NOT_IN_CACHE_KEY:
        assert f"`{name}`" in security


def test_pods_asserting_the_same_identity_share_and_other_identities_never_do() -> None:
    # Issue 21: every pod's projected token differs (jti, iat, exp) but asserts the same
    # iss/sub/aud: they share entries. The raw assertion is never in the key.
    one = key_of(ClientCredentials(**ASSERTION_BASE))
    two = key_of(ClientCredentials(**{**ASSERTION_BASE, "client_assertion": ASSERTION_A2}))
    assert ASSERTION_A.read_text() != ASSERTION_A2.read_text()
    assert one == two
    for fleet_key in (FLEET_KEY, None):
        codec = Codec("m2m", fleet_key)
        assert codec.names(one) == codec.names(two)
    for other in ASSERTION_OTHERS:
        assert_never_shared(
            one,
            key_of(ClientCredentials(**{**ASSERTION_BASE, "client_assertion": other})),
            credential=True,
        )
    # Not the assertion, nor anything of it, in the key's repr.
    assert ASSERTION_A.read_text() not in repr(one)


def test_an_assertion_not_yet_read_shares_with_no_one(tmp_path: Path) -> None:
    # A callable (or an unreadable file) has no known identity before its first call: its
    # first token must not land where another identity would find it.
    source = tmp_path / "not-yet"
    first = key_of(ClientCredentials(**{**ASSERTION_BASE, "client_assertion": source}))
    second = key_of(ClientCredentials(**{**ASSERTION_BASE, "client_assertion": source}))
    assert_never_shared(first, second, credential=True)
    calls = key_of(ClientCredentials(**{**ASSERTION_BASE, "client_assertion": lambda: "x"}))
    assert_never_shared(first, calls, credential=True)


def test_the_same_secret_in_a_file_or_inline_is_one_credential() -> None:
    inline = key_of(
        ClientCredentials(**{**SECRET_BASE, "client_secret": SECRET_FILE_A.read_text()})
    )
    assert key_of(ClientCredentials(**SECRET_FILE_BASE)) == inline
