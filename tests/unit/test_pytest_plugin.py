"""The pytest plugin, exercised as a user would: in a separate pytest run (pytester).

Subprocess runs: the plugin is found through its installed entry point, exactly as for a user,
and no module state is shared with (or re-imported under) this test session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_with_local_issuer.py"


def test_fixtures_give_a_running_issuer_and_a_verifier_that_trusts_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import httpx

        def test_issuer_runs_on_loopback(local_issuer):
            assert local_issuer.url.startswith("http://127.0.0.1:")
            assert httpx.get(local_issuer.jwks_url).status_code == 200

        def test_verifier_accepts_a_minted_token(token_verifier, bearer_headers):
            header = bearer_headers(permissions=["read:dashboard"], roles=["admin"], scope="a b")
            claims = token_verifier.verify(header["Authorization"].removeprefix("Bearer "))
            assert claims.permissions == {"read:dashboard"}
            assert set(claims.roles) == {"admin"}
            assert set(claims.scopes) == {"a", "b"}
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_async_verifier_fixture_works_in_async_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return request.param

        @pytest.mark.anyio
        async def test_verify(async_token_verifier, local_issuer):
            claims = await async_token_verifier.verify(local_issuer.mint(sub="svc@clients"))
            assert claims.subject == "svc@clients"
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_ini_options_set_audience_roles_claim_and_algorithm(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        m2m_audience = https://orders.internal
        m2m_roles_claim = roles
        m2m_algorithm = ES256
        """
    )
    pytester.makepyfile(
        """
        import jwt

        def test_settings(local_issuer, token_verifier, bearer_headers):
            token = bearer_headers(roles=["admin"])["Authorization"].split()[1]
            assert jwt.get_unverified_header(token)["alg"] == "ES256"
            payload = jwt.decode(token, options={"verify_signature": False})
            assert payload["aud"] == "https://orders.internal"
            assert payload["roles"] == ["admin"]
            assert set(token_verifier.verify(token).roles) == {"admin"}
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_each_test_starts_with_reset_counters_and_no_pending_failures(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import httpx

        def test_first(local_issuer):
            local_issuer.fail_next(5)
            httpx.post(local_issuer.token_url, data={})
            assert local_issuer.token_requests == 1

        def test_second(local_issuer):
            assert local_issuer.token_requests == 0
            secret = local_issuer.client_secret("test-client")
            response = httpx.post(
                local_issuer.token_url,
                data={"grant_type": "client_credentials"},
                auth=("test-client", secret),
            )
            assert response.status_code == 200
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_local_client_credentials_get_a_token_from_the_issuer(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from m2m_client import TokenClient

        def test_fetch(local_client_credentials, local_issuer, token_verifier):
            with TokenClient(local_client_credentials) as tokens:
                token = tokens.get_token()
                assert tokens.get_token() is token
            assert local_issuer.token_requests == 1
            assert token_verifier.verify(token.access_token).client_id == "test-client"
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_copyable_example_passes_as_a_user_would_run_it(pytester: pytest.Pytester) -> None:
    pytest.importorskip("fastapi")
    pytester.makepyfile(test_with_local_issuer=EXAMPLE.read_text())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)


def test_loading_the_plugin_imports_none_of_the_heavy_modules() -> None:
    # Every pytest run of every user loads the plugin: it must cost pytest's import, not ours.
    heavy = (
        "fastapi",
        "m2m_client.verify",
        "m2m_client._client",
        "cryptography",
        "pydantic",
        "httpx",
        "jwt",
        "tenacity",
        "anyio",
    )
    code = (
        "import sys, m2m_client.testing.pytest_plugin; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert output.strip() == "[]"


def test_a_dotted_roles_claim_is_minted_nested_and_read_by_the_verifier(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(
        """
        [pytest]
        m2m_roles_claim = realm_access.roles
        """
    )
    pytester.makepyfile(
        """
        import jwt

        def test_keycloak_shape(token_verifier, bearer_headers):
            token = bearer_headers(roles=["admin"])["Authorization"].split()[1]
            payload = jwt.decode(token, options={"verify_signature": False})
            assert payload["realm_access"] == {"roles": ["admin"]}
            assert "realm_access.roles" not in payload
            assert set(token_verifier.verify(token).roles) == {"admin"}
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_what_one_test_changes_on_the_issuer_does_not_leak_into_the_next(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import jwt

        KIDS = []

        def test_first_changes_everything(local_issuer):
            KIDS.append(local_issuer.kid)
            local_issuer.token_lifetime = 5
            local_issuer.typ = None
            local_issuer.add_client("extra", "extra-secret-value")
            local_issuer.rotate_keys("ES256")
            local_issuer.fail_next(3)

        def test_second_sees_the_session_defaults(local_issuer, bearer_headers):
            assert local_issuer.token_lifetime == 3600
            assert local_issuer.kid == KIDS[0]
            assert local_issuer.algorithm == "RS256"
            assert len(local_issuer.jwks()["keys"]) == 1
            token = bearer_headers()["Authorization"].split()[1]
            assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
            claims = jwt.decode(token, options={"verify_signature": False})
            assert claims["exp"] - claims["iat"] == 3600
            import pytest
            from m2m_client.errors import ConfigurationError
            with pytest.raises(ConfigurationError):
                local_issuer.client_secret("extra")
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_the_verifier_fixture_accepts_tokens_signed_after_rotate_keys_at_once(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        def test_rotation(local_issuer, token_verifier):
            before = local_issuer.mint(sub="before@clients")
            assert token_verifier.verify(before).subject == "before@clients"
            local_issuer.rotate_keys()
            after = local_issuer.mint(sub="after@clients")
            assert token_verifier.verify(after).subject == "after@clients"
            assert token_verifier.verify(before).subject == "before@clients"
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
