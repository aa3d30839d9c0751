"""No secret, private key or access token in any repr, str, log line or error message."""

from __future__ import annotations

import dataclasses
import logging

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from m2m_client import (
    AsyncTokenClient,
    BearerAuth,
    ClientCredentials,
    ConfigurationError,
    RetryPolicy,
    TokenClient,
    TokenEndpointError,
    TokenEndpointUnavailable,
)
from m2m_client._oauth import ClientAuthenticator

from ._calling import SECRET, TOKEN_URL, FakeClock, TokenEndpoint, oauth_error

ACCESS_TOKEN = "eyJhbGciOiJub25lIn0.eyJleHAiOjF9.VERY-SECRET-ACCESS-TOKEN"
KEY_PEM = (
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    .private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    .decode()
)
KEY_BODY = KEY_PEM.splitlines()[5]  # a line of key material


def leaks(text: str) -> list[str]:
    return [s for s in (SECRET, ACCESS_TOKEN, KEY_BODY, "VERY-SECRET") if s in text]


def texts(*objects: object) -> str:
    return "\n".join(f"{o!r}\n{o!s}" for o in objects)


def test_credentials_repr_and_str_hide_secret_and_key() -> None:
    basic = ClientCredentials(token_url=TOKEN_URL, client_id="w", client_secret=SECRET)
    jwt_creds = ClientCredentials(token_url=TOKEN_URL, client_id="w", private_key=KEY_PEM)
    assert leaks(texts(basic, jwt_creds, basic.model_dump(), ClientAuthenticator(jwt_creds))) == []
    request = ClientAuthenticator(basic).token_request(
        TOKEN_URL, audience=None, resource=None, scopes=(), now=0
    )
    assert leaks(texts(request)) == []


def test_configuration_errors_never_echo_the_secret() -> None:
    bad = [
        {"token_url": "http://evil.example/t", "client_id": "w", "client_secret": SECRET},
        {"token_url": TOKEN_URL, "client_id": "w", "private_key": SECRET},
        {"token_url": TOKEN_URL, "client_id": 5, "client_secret": SECRET, "timeout": SECRET},
        {"token_url": TOKEN_URL, "client_id": "w", "client_secret": SECRET, "private_key": KEY_PEM},
    ]
    for kwargs in bad:
        with pytest.raises(ConfigurationError) as info:
            ClientCredentials(**kwargs)  # type: ignore[arg-type]
        assert leaks(texts(info.value, info.value.__cause__)) == []
    with pytest.raises(ConfigurationError) as info:
        ClientCredentials.from_env({"M2M_CLIENT_SECRET": SECRET, "M2M_TIMEOUT": SECRET})
    assert leaks(texts(info.value, info.value.__cause__)) == []


def scripted(replies: list[httpx.Response | Exception]) -> TokenEndpoint:
    server = TokenEndpoint()
    server.script = list(replies)
    return server


def test_sync_objects_logs_and_errors_are_clean(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = httpx.Response(
        200, json={"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 60}
    )
    server = scripted([httpx.Response(503), good, oauth_error(401, "invalid_client")])
    clock = FakeClock()
    creds = ClientCredentials(token_url=TOKEN_URL, client_id="w", client_secret=SECRET)
    with TokenClient(creds, http_client=server.client(), clock=clock, sleep=clock.sleep) as tokens:
        token = tokens.get_token()
        assert token.access_token == ACCESS_TOKEN
        auth = BearerAuth(tokens)
        errors: list[BaseException] = []
        for call in (
            lambda: tokens.get_token(force_refresh=True),
            lambda: tokens.get_token(force_refresh=True),
        ):
            try:
                call()
            except TokenEndpointError as exc:
                errors.append(exc)
        server.script = [httpx.Response(500)] * 4
        try:
            tokens.get_token(audience="other")
        except TokenEndpointUnavailable as exc:
            errors.append(exc)
        assert len(errors) == 3
        everything = texts(creds, tokens, token, auth, tokens.stats, *errors) + caplog.text
    assert leaks(everything) == []
    assert token.fingerprint in caplog.text  # logs do identify the token, by fingerprint


@pytest.mark.anyio
async def test_async_objects_and_logs_are_clean(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = httpx.Response(
        200, json={"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 60}
    )
    server = scripted([good])
    clock = FakeClock()
    creds = ClientCredentials(
        token_url=TOKEN_URL, client_id="w", private_key=KEY_PEM, private_key_id="k"
    )
    events: list[object] = []
    async with AsyncTokenClient(
        creds,
        http_client=server.async_client(),
        clock=clock,
        sleep=clock.async_sleep,
        retry=RetryPolicy(max_attempts=1),
        on_event=events.append,
    ) as tokens:
        token = await tokens.get_token()
        clock.now = token.refresh_at + 1
        server.script = [httpx.Response(503)]
        await tokens.get_token()
        await anyio.wait_all_tasks_blocked()
        everything = texts(creds, tokens, token, BearerAuth(tokens), *events) + caplog.text
        # Before: dataclasses.asdict(TokenEvent) held the AccessToken, so the raw token.
        everything += repr([dataclasses.asdict(e) for e in events])  # type: ignore[call-overload]
    assert "token_fetched" in everything
    assert "token_refresh_failed" in everything
    assert leaks(everything) == []
