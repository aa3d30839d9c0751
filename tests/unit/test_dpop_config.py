"""DPoP configuration: ClientCredentials(dpop=...), M2M_DPOP / M2M_DPOP_KEY_FILE, and what a
DPoP token looks like to the caches (m2m_client/config.py, _token.py, cache/_codec.py)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest

from m2m_client import AccessToken, ClientCredentials, DPoPKey
from m2m_client._token import CacheKey
from m2m_client.cache._codec import Codec
from m2m_client.errors import ConfigurationError

BASE = {"token_url": "https://idp.example.com/token", "client_id": "c", "client_secret": "s"}
ENV = {"M2M_TOKEN_URL": BASE["token_url"], "M2M_CLIENT_ID": "c", "M2M_CLIENT_SECRET": "s"}


def test_dpop_defaults_off_and_accepts_true_or_a_key() -> None:
    assert ClientCredentials(**BASE).dpop is False
    assert ClientCredentials(**BASE, dpop=True).dpop is True
    key = DPoPKey.generate()
    creds = ClientCredentials(**BASE, dpop=key)
    assert creds.dpop is key
    assert key.thumbprint in repr(creds)
    assert "dpop" not in repr(ClientCredentials(**BASE))
    with pytest.raises(ConfigurationError, match="dpop"):
        ClientCredentials(**BASE, dpop="maybe")
    with pytest.raises(ConfigurationError, match="dpop"):
        ClientCredentials(**BASE, dpop=object())


def test_credentials_with_a_key_never_pickle_or_print_it() -> None:
    key = DPoPKey.generate()
    creds = ClientCredentials(**BASE, dpop=key)
    pem = key.private_key_pem().decode()
    assert pem.splitlines()[1] not in repr(creds)
    with pytest.raises(TypeError):
        pickle.dumps(creds)


def test_from_env_m2m_dpop() -> None:
    assert ClientCredentials.from_env({**ENV, "M2M_DPOP": "true"}).dpop is True
    assert ClientCredentials.from_env({**ENV, "M2M_DPOP": "0"}).dpop is False
    with pytest.raises(ConfigurationError, match="M2M_DPOP"):
        ClientCredentials.from_env({**ENV, "M2M_DPOP": "perhaps"})


def test_from_env_m2m_dpop_key_file(tmp_path: Path) -> None:
    key = DPoPKey.generate("ES384")
    path = tmp_path / "dpop.pem"
    path.write_bytes(key.private_key_pem())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both names are known: no "unknown variable" warning
        creds = ClientCredentials.from_env({**ENV, "M2M_DPOP_KEY_FILE": str(path)})
    assert isinstance(creds.dpop, DPoPKey)
    assert creds.dpop.thumbprint == key.thumbprint
    with pytest.raises(ConfigurationError, match="M2M_DPOP_KEY_FILE") as missing:
        ClientCredentials.from_env({**ENV, "M2M_DPOP_KEY_FILE": str(tmp_path / "nope.pem")})
    assert "cannot read" in str(missing.value)
    path.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigurationError, match="M2M_DPOP_KEY_FILE") as broken:
        ClientCredentials.from_env({**ENV, "M2M_DPOP_KEY_FILE": str(path)})
    assert "not a key" not in str(broken.value)


def test_a_dpop_token_presents_itself_with_the_dpop_scheme() -> None:
    assert AccessToken("abc", token_type="DPoP").authorization == "DPoP abc"
    assert AccessToken("abc", token_type="dpop").authorization == "DPoP abc"
    assert AccessToken("abc").authorization == "Bearer abc"


def test_the_shared_cache_keeps_tokens_of_different_keys_apart() -> None:
    codec = Codec("m2m", "k" * 32)
    key = CacheKey("https://idp/token", "c", "https://api", None, ("read",))
    one, two = key._replace(dpop_jkt="jkt-one"), key._replace(dpop_jkt="jkt-two")
    assert len({codec.names(k).token for k in (key, one, two)}) == 3
    names = codec.names(one)
    token = AccessToken("abc", token_type="DPoP", expires_at=200.0, issued_at=100.0)
    entry = codec.decode_token(names, codec.encode_token(names, token))
    assert entry.token_type == "DPoP"
