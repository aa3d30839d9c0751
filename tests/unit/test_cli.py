"""The m2m-client command: token, verify, decode, exit codes and messages."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest

from m2m_client.cli import main
from m2m_client.testing import LocalIssuer

SECRET = "cli-s3cret:with+odd%chars"


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    issuer = LocalIssuer()
    issuer.add_client("cli", SECRET, scope="read:data", roles=["admin"])
    with issuer:
        yield issuer


@pytest.fixture
def secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("M2M_TOKEN_URL", "M2M_ISSUER", "AUTH0_DOMAIN", "AUTH0_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("M2M_CLIENT_SECRET", SECRET)


def token_args(issuer: LocalIssuer, *extra: str) -> list[str]:
    return ["token", "--token-url", issuer.token_url, "--client-id", "cli", *extra]


@pytest.mark.usefixtures("secret_in_env")
def test_token_prints_only_the_access_token(
    issuer: LocalIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(token_args(issuer)) == 0
    out, err = capsys.readouterr()
    assert out.count(".") == 2  # one compact JWT, nothing else
    assert err == ""


@pytest.mark.usefixtures("secret_in_env")
def test_token_json_prints_the_token_response_without_the_secret(
    issuer: LocalIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(token_args(issuer, "--json", "--scope", "read:data")) == 0
    out = capsys.readouterr().out
    response = json.loads(out)
    assert response["token_type"] == "Bearer"
    assert response["scope"] == "read:data"
    assert 3590 <= response["expires_in"] <= 3600
    assert response["access_token"].count(".") == 2
    assert SECRET not in out


@pytest.mark.usefixtures("secret_in_env")
def test_token_from_discovery_with_the_issuer_flag(
    issuer: LocalIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "--issuer", issuer.url, "--client-id", "cli"]) == 0
    assert capsys.readouterr().out.strip().count(".") == 2


def test_client_secret_flag_works_but_warns(
    issuer: LocalIssuer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("M2M_CLIENT_SECRET", raising=False)
    assert main(token_args(issuer, "--client-secret", SECRET)) == 0
    err = capsys.readouterr().err
    assert "prefer M2M_CLIENT_SECRET" in err
    assert SECRET not in err


def test_refused_token_request_is_one_line_and_exit_1(
    issuer: LocalIssuer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("M2M_CLIENT_SECRET", "wrong-secret-value")
    assert main(token_args(issuer)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "invalid_client" in err
    assert "Traceback" not in err
    assert "wrong-secret-value" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.usefixtures("secret_in_env")
def test_bad_configuration_is_exit_2_and_names_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["token", "--token-url", "ftp://example.com/token", "--client-id", "x"]) == 2
    err = capsys.readouterr().err
    assert "--token-url" in err
    assert "configuration error" in err


def test_usage_errors_are_exit_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify"]) == 2
    assert main(["no-such-command"]) == 2
    assert main([]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    assert "2  usage or configuration error" in out


def verify_args(issuer: LocalIssuer, token: str) -> list[str]:
    return ["verify", token, "--issuer", issuer.url, "--audience", issuer.audience]


def test_verify_prints_the_claims_of_a_valid_token(
    issuer: LocalIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    token = issuer.mint(sub="svc@clients", permissions=["read:data"])
    assert main(verify_args(issuer, token)) == 0
    claims = json.loads(capsys.readouterr().out)
    assert claims["sub"] == "svc@clients"
    assert claims["permissions"] == ["read:data"]


def test_verify_reads_the_token_from_stdin(
    issuer: LocalIssuer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(issuer.mint(sub="stdin@clients") + "\n"))
    assert main(verify_args(issuer, "-")) == 0
    assert json.loads(capsys.readouterr().out)["sub"] == "stdin@clients"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [({"expires_in": -300}, "expired"), ({"audience": "https://other.test"}, "aud")],
)
def test_verify_rejects_with_a_one_line_reason_and_exit_1(
    issuer: LocalIssuer,
    capsys: pytest.CaptureFixture[str],
    claims: dict[str, object],
    reason: str,
) -> None:
    token = issuer.mint(**claims)  # type: ignore[arg-type]
    assert main(verify_args(issuer, token)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert reason in err.lower()
    assert len(err.strip().splitlines()) == 1
    assert token not in err


def test_verify_rejects_a_token_from_another_issuer(
    issuer: LocalIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = LocalIssuer(url=issuer.url)  # same iss, different key
    assert main(verify_args(issuer, stranger.mint())) == 1
    assert "token rejected" in capsys.readouterr().err


def test_decode_shows_header_and_claims_labelled_not_verified(
    issuer: LocalIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["decode", issuer.mint(sub="svc@clients", tenant="acme")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# NOT VERIFIED")
    assert '"tenant": "acme"' in out
    assert f'"kid": "{issuer.kid}"' in out
    assert "# expires" in out


def test_decode_json_marks_the_result_unverified(
    issuer: LocalIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["decode", "--json", "Bearer " + issuer.mint(sub="x@clients")]) == 0
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["verified"] is False
    assert document["claims"]["sub"] == "x@clients"
    assert document["header"]["alg"] == "RS256"
    assert "NOT VERIFIED" in err


@pytest.mark.parametrize("garbage", ["not-a-token", "a.b.c", "a.b.c.d.e", "e30.W10.sig"])
def test_decode_of_garbage_is_exit_1_with_a_reason(
    garbage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["decode", garbage]) == 1
    err = capsys.readouterr().err
    assert err.startswith("m2m-client: cannot decode") or "not" in err
    assert "Traceback" not in err
