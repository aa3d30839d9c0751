"""ClientCredentials: validation, defaults, from_env (M2M_* and AUTH0_*)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from m2m_client import ClientCredentials, ConfigurationError

URL = "https://as.example.com/oauth/token"


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_pem() -> str:
    return pem(ec.generate_private_key(ec.SECP256R1()))


def test_secret_defaults_to_client_secret_basic_and_scope_is_normalised() -> None:
    creds = ClientCredentials(
        token_url=URL, client_id="w", client_secret="s", scope="read write,read"
    )
    assert creds.auth_method == "client_secret_basic"
    assert creds.scope == ("read", "write")
    assert ClientCredentials(
        token_url=URL, client_id="w", client_secret="s", scope=["a b", "c"]
    ).scope == ("a", "b", "c")
    assert creds.timeout == 10.0


def test_private_key_defaults_to_private_key_jwt_with_algorithm_from_key(
    rsa_pem: str, ec_pem: str
) -> None:
    assert (
        ClientCredentials(token_url=URL, client_id="w", private_key=rsa_pem).signing_algorithm
        == "RS256"
    )
    creds = ClientCredentials(token_url=URL, client_id="w", private_key=ec_pem)
    assert (creds.auth_method, creds.signing_algorithm) == ("private_key_jwt", "ES256")
    pss = ClientCredentials(
        token_url=URL, client_id="w", private_key=rsa_pem, signing_algorithm="PS256"
    )
    assert pss.signing_algorithm == "PS256"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"token_url": "http://as.example.com/token"}, "token_url"),
        ({"token_url": "ftp://as.example.com/token"}, "token_url"),
        ({"token_url": "https://user:pw@as.example.com/token"}, "token_url"),
        ({"token_url": None}, "token_url"),
        ({"issuer": "not a url", "token_url": None}, "issuer"),
        ({"client_secret": None}, "client_secret"),
        ({"auth_method": "private_key_jwt"}, "private_key"),
        ({"auth_method": "magic"}, "auth_method"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
        ({"scope": 5}, "scope"),
        ({"extra_params": {"grant_type": "password"}}, "extra_params"),
        ({"client_id": ""}, "client_id"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_every_invalid_value_is_a_configuration_error_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {"token_url": URL, "client_id": "w", "client_secret": "s3cret"}
    args.update(kwargs)
    with pytest.raises(ConfigurationError) as info:
        ClientCredentials(**args)
    assert f"ClientCredentials.{field}" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_loopback_http_is_allowed_for_local_servers() -> None:
    for url in ("http://127.0.0.1:8080/token", "http://localhost/token", "http://[::1]:9/t"):
        assert ClientCredentials(token_url=url, client_id="w", client_secret="s").token_url == url


def test_both_secret_and_key_without_auth_method_is_ambiguous(rsa_pem: str) -> None:
    with pytest.raises(ConfigurationError, match="auth_method"):
        ClientCredentials(token_url=URL, client_id="w", client_secret="s", private_key=rsa_pem)
    creds = ClientCredentials(
        token_url=URL,
        client_id="w",
        client_secret="s",
        private_key=rsa_pem,
        auth_method="client_secret_post",
    )
    assert creds.auth_method == "client_secret_post"


def test_key_and_algorithm_must_agree(rsa_pem: str, ec_pem: str) -> None:
    with pytest.raises(ConfigurationError, match="signing_algorithm"):
        ClientCredentials(
            token_url=URL, client_id="w", private_key=rsa_pem, signing_algorithm="ES256"
        )
    with pytest.raises(ConfigurationError, match="signing_algorithm"):
        ClientCredentials(
            token_url=URL, client_id="w", private_key=ec_pem, signing_algorithm="RS256"
        )
    with pytest.raises(ConfigurationError, match="private_key"):
        ClientCredentials(token_url=URL, client_id="w", private_key="-----BEGIN garbage")


def test_credentials_are_frozen() -> None:
    creds = ClientCredentials(token_url=URL, client_id="w", client_secret="s")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type
        creds.client_id = "other"  # type: ignore[misc]


def test_from_env_reads_m2m_variables(tmp_path: Path, rsa_pem: str) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_text(rsa_pem)
    creds = ClientCredentials.from_env(
        {
            "M2M_ISSUER": "https://as.example.com/",
            "M2M_CLIENT_ID": "w",
            "M2M_PRIVATE_KEY_FILE": str(key_file),
            "M2M_PRIVATE_KEY_ID": "k1",
            "M2M_AUDIENCE": "https://api",
            "M2M_RESOURCE": "https://res",
            "M2M_SCOPE": "a b",
            "M2M_TIMEOUT": "2.5",
        }
    )
    assert creds.issuer == "https://as.example.com/"
    assert creds.token_url is None
    assert creds.auth_method == "private_key_jwt"
    assert creds.private_key_id == "k1"
    assert (creds.audience, creds.resource, creds.scope, creds.timeout) == (
        "https://api",
        "https://res",
        ("a", "b"),
        2.5,
    )


def test_from_env_accepts_a_pem_with_escaped_newlines(rsa_pem: str) -> None:
    creds = ClientCredentials.from_env(
        {
            "M2M_TOKEN_URL": URL,
            "M2M_CLIENT_ID": "w",
            "M2M_PRIVATE_KEY": rsa_pem.replace("\n", "\\n"),
        }
    )
    assert creds.auth_method == "private_key_jwt"


def test_from_env_understands_auth0_names_and_m2m_wins() -> None:
    env = {
        "AUTH0_DOMAIN": "tenant.eu.auth0.com",
        "AUTH0_CLIENT_ID": "auth0-id",
        "AUTH0_CLIENT_SECRET": "auth0-secret",
        "AUTH0_AUDIENCE": "https://api.example.com",
    }
    creds = ClientCredentials.from_env(env)
    assert creds.token_url == "https://tenant.eu.auth0.com/oauth/token"
    assert creds.issuer == "https://tenant.eu.auth0.com/"
    assert creds.client_id == "auth0-id"
    assert creds.audience == "https://api.example.com"
    assert creds.client_secret is not None
    assert creds.client_secret.get_secret_value() == "auth0-secret"
    with pytest.warns(UserWarning, match="both set and differ"):
        overridden = ClientCredentials.from_env(
            # Another client id needs its own secret (AUTH0_CLIENT_SECRET is auth0-id's).
            {**env, "M2M_CLIENT_ID": "mine", "M2M_CLIENT_SECRET": "mine-s", "M2M_AUDIENCE": "x"}
        )
    assert (overridden.client_id, overridden.audience) == ("mine", "x")


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"M2M_TOKEN_URL": "http://example.com/t"}, ["token_url", "M2M_TOKEN_URL"]),
        ({"M2M_TIMEOUT": "abc"}, ["timeout", "M2M_TIMEOUT"]),
        ({"M2M_AUTH_METHOD": "nope"}, ["auth_method", "M2M_AUTH_METHOD"]),
        ({"M2M_CLIENT_ID": ""}, ["client_id", "M2M_CLIENT_ID or AUTH0_CLIENT_ID"]),
        ({"AUTH0_DOMAIN": "bad host/"}, ["issuer", "AUTH0_DOMAIN"]),
    ],
)
def test_from_env_errors_name_field_and_variable_without_the_secret(
    env: dict[str, str], names: list[str]
) -> None:
    base = {"M2M_TOKEN_URL": URL, "M2M_CLIENT_ID": "w", "M2M_CLIENT_SECRET": "s3cret-value"}
    if "AUTH0_DOMAIN" in env:
        del base["M2M_TOKEN_URL"]  # else AUTH0_DOMAIN is not read at all
    base.update(env)
    with pytest.raises(ConfigurationError) as info:
        ClientCredentials.from_env(base)
    for name in names:
        assert name in str(info.value)
    assert "s3cret-value" not in str(info.value)


def test_from_env_reports_an_unreadable_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="M2M_PRIVATE_KEY_FILE"):
        ClientCredentials.from_env(
            {
                "M2M_TOKEN_URL": URL,
                "M2M_CLIENT_ID": "w",
                "M2M_PRIVATE_KEY_FILE": str(tmp_path / "no"),
            }
        )


def test_from_env_with_nothing_set_says_what_to_set() -> None:
    with pytest.raises(ConfigurationError) as info:
        ClientCredentials.from_env({})
    assert "M2M_CLIENT_ID" in str(info.value)


def test_from_env_warns_about_a_misspelt_variable_naming_the_closest_known_one() -> None:
    env = {
        "M2M_TOKEN_URL": "https://idp.example.com/oauth/token",
        "M2M_CLIENT_ID": "worker",
        "M2M_CLIENT_SECRET": "s3cret-value",
        "M2M_AUDEINCE": "https://api.example.com",
        "M2M_ISSUER_URL": "https://idp.example.com/",
        "M2M_API_URL": "https://api.example.com",  # read by the examples: no warning
    }
    with pytest.warns(UserWarning, match="not read by ClientCredentials.from_env") as caught:
        ClientCredentials.from_env(env)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "M2M_AUDEINCE" in messages[0]
    assert "did you mean M2M_AUDIENCE?" in messages[0]
    assert "M2M_ISSUER_URL" in messages[1]
    assert "did you mean M2M_ISSUER?" in messages[1]
    assert all("s3cret-value" not in m for m in messages)


def test_from_env_error_has_no_pydantic_traceback_in_front_and_names_m2m_issuer() -> None:
    with pytest.raises(ConfigurationError) as caught:
        ClientCredentials.from_env({"M2M_CLIENT_ID": "worker", "M2M_CLIENT_SECRET": "x"})
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    assert "M2M_ISSUER" in str(caught.value)
    assert "M2M_TOKEN_URL" in str(caught.value)


def test_an_unreadable_private_key_file_says_why() -> None:
    env = {
        "M2M_TOKEN_URL": "https://idp.example.com/oauth/token",
        "M2M_CLIENT_ID": "worker",
        "M2M_PRIVATE_KEY_FILE": "/nonexistent/key.pem",
    }
    with pytest.raises(ConfigurationError, match="No such file or directory") as caught:
        ClientCredentials.from_env(env)
    assert caught.value.__cause__ is None


# --- M2M_* against leftover AUTH0_* variables (issue 19 item 5) -------------------------

_TWINS = [
    # (M2M variable, its value, AUTH0 variable, a different value, the field, the expected)
    ("M2M_ISSUER", "https://idp.example.com/", "AUTH0_DOMAIN", "tenant.auth0.com", "issuer"),
    ("M2M_TOKEN_URL", "https://idp.example.com/t", "AUTH0_DOMAIN", "tenant.auth0.com", "token_url"),
    ("M2M_CLIENT_ID", "ours", "AUTH0_CLIENT_ID", "theirs", "client_id"),
    ("M2M_CLIENT_SECRET", "our-secret-41", "AUTH0_CLIENT_SECRET", "their-sec-97", "client_secret"),
    ("M2M_AUDIENCE", "https://api.example.com", "AUTH0_AUDIENCE", "https://other", "audience"),
]
_BASE = {
    "M2M_TOKEN_URL": "https://idp.example.com/t",
    "M2M_CLIENT_ID": "ours",
    "M2M_CLIENT_SECRET": "our-secret-41",
}


@pytest.mark.parametrize(("m2m", "ours", "auth0", "theirs", "field"), _TWINS)
def test_from_env_m2m_variable_wins_over_a_different_auth0_twin_with_a_warning_naming_both(
    m2m: str, ours: str, auth0: str, theirs: str, field: str
) -> None:
    env = {**_BASE, m2m: ours, auth0: theirs}
    if m2m == "M2M_ISSUER":
        del env["M2M_TOKEN_URL"]  # discovery: the endpoint comes from M2M_ISSUER alone
    with pytest.warns(UserWarning, match="both set and differ") as caught:
        creds = ClientCredentials.from_env(env)
    got = getattr(creds, field)
    if field == "client_secret":
        got = got.get_secret_value()
    assert got == ours
    if auth0 == "AUTH0_DOMAIN":
        # Nothing of the Auth0 tenant is left: the secret can only go where M2M_* says.
        assert "auth0" not in f"{creds.token_url} {creds.issuer}"
        if m2m == "M2M_ISSUER":
            assert creds.token_url is None
    messages = [str(w.message) for w in caught if m2m in str(w.message)]
    assert len(messages) == 1
    assert auth0 in messages[0]
    assert theirs not in messages[0]  # never the values
    assert ours not in messages[0]


@pytest.mark.parametrize(("m2m", "ours", "auth0", "theirs", "field"), _TWINS)
def test_from_env_equal_twins_are_not_a_conflict(
    m2m: str, ours: str, auth0: str, theirs: str, field: str, recwarn: pytest.WarningsRecorder
) -> None:
    same = {
        "AUTH0_DOMAIN": "idp.example.com",
    }.get(auth0, ours)
    env = {**_BASE, m2m: ours, auth0: same}
    if auth0 == "AUTH0_DOMAIN":
        env[m2m] = (
            "https://idp.example.com/oauth/token"
            if m2m == "M2M_TOKEN_URL"
            else ("https://idp.example.com")
        )
        if m2m == "M2M_ISSUER":
            del env["M2M_TOKEN_URL"]
    ClientCredentials.from_env(env)
    assert not [w for w in recwarn if auth0 in str(w.message)]


def test_from_env_auth0_domain_alone_still_fills_token_url_and_issuer() -> None:
    env = {"AUTH0_DOMAIN": "t.auth0.com", "M2M_CLIENT_ID": "a", "M2M_CLIENT_SECRET": "b"}
    creds = ClientCredentials.from_env(env)
    assert (creds.token_url, creds.issuer) == (
        "https://t.auth0.com/oauth/token",
        "https://t.auth0.com/",
    )


def test_from_env_never_pairs_a_client_id_with_the_secret_of_another_client() -> None:
    """``AUTH0_CLIENT_SECRET`` is the secret of ``AUTH0_CLIENT_ID`` (Auth0's SDKs read the
    pair for another application of the tenant). When ``M2M_CLIENT_ID`` names a different
    client and ``M2M_CLIENT_SECRET`` is missing (unset, misspelt, its secret not mounted),
    that other application's secret must not be sent as this client's: a ConfigurationError,
    never a token request carrying it (to an ``M2M_TOKEN_URL`` of another provider, too)."""
    env = {
        "M2M_TOKEN_URL": "https://idp.example.com/oauth2/v1/token",
        "M2M_CLIENT_ID": "billing-worker",
        "AUTH0_CLIENT_ID": "user-login-app",
        "AUTH0_CLIENT_SECRET": "login-app-secret-83",
    }
    with (
        pytest.warns(UserWarning, match="M2M_CLIENT_ID and AUTH0_CLIENT_ID"),
        pytest.raises(ConfigurationError) as caught,
    ):
        ClientCredentials.from_env(env)  # before: billing-worker with the login app's secret
    assert "login-app-secret-83" not in str(caught.value)
    assert "client_secret" in str(caught.value)
    # The same client id in both: one client, its secret may come from either name.
    same = ClientCredentials.from_env({**env, "AUTH0_CLIENT_ID": "billing-worker"})
    assert same.client_secret is not None
    assert same.client_secret.get_secret_value() == "login-app-secret-83"
    # And with M2M_CLIENT_SECRET set, that one is used, as before.
    with pytest.warns(UserWarning, match="both set and differ") as caught_warnings:
        ours = ClientCredentials.from_env({**env, "M2M_CLIENT_SECRET": "billing-secret-12"})
    assert any("M2M_CLIENT_ID and AUTH0_CLIENT_ID" in str(w.message) for w in caught_warnings)
    assert ours.client_secret is not None
    assert ours.client_secret.get_secret_value() == "billing-secret-12"
