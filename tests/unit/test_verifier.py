"""TokenVerifier / AsyncTokenVerifier end to end, JWKS served by httpx.MockTransport
or a real loopback HTTP server (m2m_client/verify/_verifier.py)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import httpx
import pytest

from m2m_client._http import AsyncDriver
from m2m_client.errors import (
    ConfigurationError,
    ExpiredToken,
    InsufficientPermissions,
    InvalidToken,
    KeySetUnavailable,
)
from m2m_client.verify import AsyncTokenVerifier, Claims, TokenVerifier

from ._jwt_factory import (
    AUDIENCE,
    DROP,
    ISSUER,
    NOW,
    FakeClock,
    JwksEndpoint,
    claims,
    ec_key,
    ed_key,
    jwks,
    public_jwk,
    refused,
    rsa_key,
    sign,
    streamed,
    token,
    verifier_options,
)


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def sync_verifier(ep: JwksEndpoint, clock: FakeClock, **overrides: Any) -> TokenVerifier:
    client = httpx.Client(transport=ep.transport())
    return TokenVerifier(http_client=client, **verifier_options(clock, **overrides))


def async_verifier(ep: JwksEndpoint, clock: FakeClock, **overrides: Any) -> AsyncTokenVerifier:
    client = httpx.AsyncClient(transport=ep.transport())
    return AsyncTokenVerifier(http_client=client, **verifier_options(clock, **overrides))


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"algorithms": ["HS256"]},
        {"algorithms": ["none"]},
        {"algorithms": []},
        {"audience": []},
        {"audience": [""]},
        {"issuer": ""},
        {"leeway": -1},
        {"token_type": "JWT"},
        {"jwks_min_ttl": 100, "jwks_max_ttl": 10},
        {"timeout": 0},
        {"cache_size": -1},
        {"audience": None},
        {"audience": None, "expected_claims": {}},
        {"audience": None, "required_claims": ["client_id"]},
        {"expected_claims": {"token_use": []}},
        {"expected_claims": {"token_use": [""]}},
        {"expected_claims": {"token_use": 1}},
        {"expected_claims": {"": "access"}},
        {"expected_claims": "token_use=access"},
    ],
)
def test_unsafe_or_invalid_configuration_is_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        TokenVerifier(**verifier_options(FakeClock(), **overrides))


# --- verification ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "key"),
    [("RS256", rsa_key()), ("PS256", rsa_key()), ("ES256", ec_key()), ("EdDSA", ed_key())],
)
def test_tokens_of_every_supported_algorithm_verify(alg: str, key: Any) -> None:
    ep = JwksEndpoint(keys=jwks(public_jwk(key, "k1")))
    verifier = sync_verifier(ep, FakeClock(), algorithms=[alg])
    result = verifier.verify(sign(claims(), key, alg=alg))
    assert isinstance(result, Claims)
    assert result.subject == "worker@clients"


def test_a_token_signed_by_another_key_is_rejected() -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock())
    with refused("signature"):
        verifier.verify(sign(claims(), rsa_key("other")))


def test_malformed_signature_bytes_are_invalid_token_not_a_crash() -> None:
    ep = JwksEndpoint(keys=jwks(public_jwk(ec_key(), "k1")))
    verifier = sync_verifier(ep, FakeClock(), algorithms=["ES256"])
    h, p, _ = sign(claims(), ec_key(), alg="ES256").split(".")
    with refused("signature"):
        verifier.verify(f"{h}.{p}.AAAA")


def test_at_jwt_type_is_enforced_when_configured() -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock(), token_type="at+jwt")
    assert verifier.verify(sign(claims(), headers={"typ": "at+jwt"}))
    with refused("token_type"):
        verifier.verify(token())


def test_required_claims_and_roles_claim_are_configurable() -> None:
    verifier = sync_verifier(
        JwksEndpoint(), FakeClock(), required_claims=["jti"], roles_claim="realm_access.roles"
    )
    with refused("missing_claim"):
        verifier.verify(token())
    result = verifier.verify(token(jti="1", realm_access={"roles": ["admin"]}))
    assert result.roles == {"admin"}


# --- audience=None and expected_claims (Amazon Cognito access tokens) -------------------

COGNITO = {"token_use": "access", "client_id": ["abc", "def"]}


def cognito_token(key: Any = None, **overrides: Any) -> str:
    fields: dict[str, Any] = {"aud": DROP, "azp": DROP, "token_use": "access", "client_id": "abc"}
    return sign(claims(**{**fields, **overrides}), key)


def test_audience_must_be_given_explicitly_even_to_skip_it() -> None:
    options = verifier_options(FakeClock(), expected_claims=COGNITO)
    del options["audience"]
    with pytest.raises(TypeError):
        TokenVerifier(**options)


def test_audience_none_with_expected_claims_accepts_a_token_without_aud() -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock(), audience=None, expected_claims=COGNITO)
    result = verifier.verify(cognito_token())
    assert result.client_id == "abc"
    assert result.audience == ()
    assert verifier.verify(cognito_token(client_id="def")).client_id == "def"


def test_audience_none_accepts_a_token_that_has_an_aud_anyway() -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock(), audience=None, expected_claims=COGNITO)
    assert verifier.verify(cognito_token(aud="https://whatever.test")).audience == (
        "https://whatever.test",
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"token_use": "id"}, "claim_value"),
        ({"client_id": "another-app-client"}, "claim_value"),
        ({"token_use": DROP}, "missing_claim"),
        ({"client_id": DROP}, "missing_claim"),
    ],
)
def test_expected_claims_mismatch_or_absence_is_invalid_token(
    overrides: dict[str, Any], reason: str
) -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock(), audience=None, expected_claims=COGNITO)
    with refused(reason):
        verifier.verify(cognito_token(**overrides))


def test_expected_claims_also_work_alongside_an_audience() -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock(), expected_claims={"gty": "client-cred"})
    assert verifier.verify(token(gty="client-cred"))
    with refused("claim_value"):
        verifier.verify(token(gty="password"))
    with refused("audience"):
        verifier.verify(token(gty="client-cred", aud="https://other.test"))


@pytest.mark.parametrize(
    ("make_token", "error", "match"),
    [
        (lambda: cognito_token(rsa_key("other")), InvalidToken, "signature"),
        (lambda: cognito_token(iss="https://evil.test/"), InvalidToken, "issuer"),
        (lambda: cognito_token(exp=int(NOW) - 3600), ExpiredToken, "expired"),
    ],
)
def test_audience_none_does_not_disable_signature_issuer_or_expiry_checks(
    make_token: Any, error: type[Exception], match: str
) -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock(), audience=None, expected_claims=COGNITO)
    with pytest.raises(error, match=match):
        verifier.verify(make_token())


@pytest.mark.anyio
async def test_async_verifier_supports_audience_none_with_expected_claims() -> None:
    verifier = async_verifier(JwksEndpoint(), FakeClock(), audience=None, expected_claims=COGNITO)
    assert (await verifier.verify(cognito_token())).client_id == "abc"
    with refused("claim_value"):
        await verifier.verify(cognito_token(token_use="id"))


def test_check_raises_insufficient_permissions_with_the_missing_items() -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock())
    result = verifier.verify(token(permissions=["read:dashboard"]))
    verifier.check(result, scopes=["read:data"], permissions=["read:dashboard"])
    with pytest.raises(InsufficientPermissions) as info:
        verifier.check(result, scopes=["admin:all"], roles=["admin"])
    assert info.value.required == ("admin:all", "admin")


def test_discovery_is_used_when_no_jwks_url_is_given() -> None:
    ep = JwksEndpoint()
    verifier = sync_verifier(ep, FakeClock(), jwks_url=None)
    assert verifier.verify(token()).subject == "worker@clients"
    assert ep.requests[0] == f"{ISSUER}.well-known/openid-configuration"


def test_discovery_metadata_for_another_issuer_is_a_configuration_error_naming_both(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ep = JwksEndpoint(metadata_issuer="https://evil.test/")
    verifier = sync_verifier(ep, FakeClock(), jwks_url=None)
    with (
        caplog.at_level("ERROR", logger="m2m_client.verify"),
        pytest.raises(ConfigurationError) as caught,
    ):
        verifier.verify(token())
    assert "https://evil.test/" in str(caught.value)
    assert ISSUER in str(caught.value)
    assert "https://evil.test/" in caplog.text
    assert ISSUER in caplog.text
    assert ep.jwks_fetches == 0
    with pytest.raises(ConfigurationError):  # remembered for the back-off, not refetched
        verifier.verify(token())
    assert len(ep.requests) == 1


# --- key set lifecycle -----------------------------------------------------------------


def test_jwks_is_refreshed_ahead_in_the_background_before_its_max_age() -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=120"), FakeClock()
    verifier = sync_verifier(ep, clock)
    for _ in range(5):
        verifier.verify(token(jti=str(_)))
    assert ep.jwks_fetches == 1
    clock.advance(89)  # before 75% of the TTL: nothing to do
    verifier.verify(token(NOW + 89, jti="x"))
    assert ep.jwks_fetches == 1
    clock.advance(2)  # in the refresh-ahead window: the caller is answered, a thread fetches
    release = threading.Event()
    ep.on_request = lambda: release.wait(5)
    assert verifier.verify(token(NOW + 91, jti="y")).subject == "worker@clients"
    assert verifier.verify(token(NOW + 91, jti="z")).subject == "worker@clients"  # no wait
    release.set()
    wait_for(lambda: not verifier._lock.locked())
    assert ep.jwks_fetches == 2
    assert verifier._core.keys.refresh_at == clock.now + 90


def test_key_rotation_a_newly_published_key_verifies_without_restart() -> None:
    ep, clock = JwksEndpoint(), FakeClock()
    verifier = sync_verifier(ep, clock)
    verifier.verify(token())
    ep.keys = jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2"))
    clock.advance(60)
    rotated = sign(claims(clock.now), rsa_key("b"), kid="k2")
    assert verifier.verify(rotated).subject == "worker@clients"
    assert ep.jwks_fetches == 2


def test_random_unknown_kids_cause_at_most_one_fetch_per_cooldown() -> None:
    ep, clock = JwksEndpoint(), FakeClock()
    verifier = sync_verifier(ep, clock)
    verifier.verify(token())
    clock.advance(31)
    for i in range(50):
        with refused("unknown_kid"):
            verifier.verify(sign(claims(clock.now), kid=f"random-{i}"))
    assert ep.jwks_fetches == 2


def test_valid_tokens_keep_verifying_through_a_jwks_outage() -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=60"), FakeClock()
    verifier = sync_verifier(ep, clock)
    verifier.verify(token())
    ep.fail = True
    clock.advance(3600)
    for i in range(3):
        assert verifier.verify(token(clock.now, jti=str(i))).subject == "worker@clients"
    assert ep.jwks_fetches == 2  # one failed attempt, then backoff (no hammering)
    with pytest.raises(KeySetUnavailable):
        verifier.verify(sign(claims(clock.now), rsa_key("b"), kid="k2"))


def test_no_key_set_at_all_gives_key_set_unavailable_with_retry_after() -> None:
    ep, clock = JwksEndpoint(fail=True), FakeClock()
    verifier = sync_verifier(ep, clock)
    with pytest.raises(KeySetUnavailable, match="could not be fetched"):
        verifier.verify(token())
    assert 0 < verifier.retry_after() <= 5
    ep.fail = False
    clock.advance(5)
    assert verifier.verify(token())


def test_a_jwks_body_over_the_size_limit_is_refused() -> None:
    ep = JwksEndpoint(keys={"keys": [], "padding": "x" * 300_000})
    with pytest.raises(KeySetUnavailable, match="exceeds the 262144-byte limit"):
        sync_verifier(ep, FakeClock()).verify(token())


def test_refresh_fetches_now_and_reports_failure() -> None:
    ep = JwksEndpoint()
    verifier = sync_verifier(ep, FakeClock())
    verifier.refresh()
    assert ep.jwks_fetches == 1
    ep.status = 500
    with pytest.raises(KeySetUnavailable, match="500"):
        verifier.refresh()


def test_sync_single_flight_many_threads_with_a_new_kid_cause_one_fetch() -> None:
    ep, clock = JwksEndpoint(), FakeClock()
    started = threading.Event()
    ep.on_request = lambda: started.wait(0.05)
    verifier = sync_verifier(ep, clock)
    tok = token()
    results: list[object] = []

    def work() -> None:
        results.append(verifier.verify(tok).subject)

    threads = [threading.Thread(target=work) for _ in range(20)]
    for t in threads:
        t.start()
    started.set()
    for t in threads:
        t.join()
    assert results == ["worker@clients"] * 20
    assert ep.jwks_fetches == 1


# --- verified-token cache --------------------------------------------------------------


def test_a_repeated_token_is_served_from_the_cache() -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock())
    tok = token()
    assert verifier.verify(tok) is verifier.verify(tok)


def test_an_expired_token_is_rejected_even_if_it_was_cached() -> None:
    clock = FakeClock()
    verifier = sync_verifier(JwksEndpoint(cache_control="max-age=86400"), clock, leeway=30)
    tok = token(exp=int(NOW) + 100)
    first = verifier.verify(tok)
    clock.advance(110)  # past exp, within leeway: same answer as without a cache
    assert verifier.verify(tok) is not first
    clock.advance(30)
    with pytest.raises(ExpiredToken):
        verifier.verify(tok)


def test_the_cache_is_cleared_when_the_key_set_changes() -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=60"), FakeClock()
    verifier = sync_verifier(ep, clock)
    tok = token(exp=int(NOW) + 7200)
    verifier.verify(tok)
    ep.keys = jwks(public_jwk(rsa_key("b"), "k2"))  # k1 withdrawn
    clock.advance(60)
    verifier.verify(sign(claims(clock.now), rsa_key("b"), kid="k2"))  # triggers the refresh
    with refused("unknown_kid"):
        verifier.verify(tok)


def test_the_cache_is_bounded() -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock(), cache_size=2)
    tokens = [token(jti=str(i)) for i in range(5)]
    for tok in tokens:
        verifier.verify(tok)
    assert len(verifier._core.tokens) == 2
    assert set(verifier._core.tokens._entries) == set(tokens[-2:])


def test_a_zero_cache_size_disables_the_cache() -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock(), cache_size=0)
    tok = token()
    assert verifier.verify(tok) is not verifier.verify(tok)


def test_rejections_are_never_cached() -> None:
    clock = FakeClock()
    verifier = sync_verifier(JwksEndpoint(cache_control="max-age=86400"), clock)
    tok = token(nbf=int(NOW) + 100)
    with refused("not_yet_valid"):
        verifier.verify(tok)
    clock.advance(100)
    assert verifier.verify(tok).subject == "worker@clients"


def _no_full_path(*args: Any) -> Any:
    raise AssertionError("a repeated token must not be parsed or verified again")


def test_a_repeated_token_is_not_parsed_or_verified_again(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock())
    tok = token()
    first = verifier.verify(tok)
    monkeypatch.setattr(verifier._core, "begin", _no_full_path)
    assert verifier.verify(tok) is first


@pytest.mark.anyio
async def test_async_a_repeated_token_is_not_parsed_or_verified_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=86400"), FakeClock()
    verifier = async_verifier(ep, clock, leeway=0)
    tok = token(exp=int(NOW) + 100)
    first = await verifier.verify(tok)
    monkeypatch.setattr(verifier._core, "begin", _no_full_path)
    assert await verifier.verify(tok) is first
    monkeypatch.undo()
    clock.advance(100)  # exp is checked at each use, cached or not
    with pytest.raises(ExpiredToken):
        await verifier.verify(tok)


def test_a_hot_cached_token_still_triggers_the_refresh_ahead() -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=120"), FakeClock()
    verifier = sync_verifier(ep, clock)
    tok = token(exp=int(NOW) + 7200)
    verifier.verify(tok)
    clock.advance(91)  # in the refresh-ahead window: the cached verdict alone is not enough
    assert verifier.verify(tok).subject == "worker@clients"
    wait_for(lambda: ep.jwks_fetches == 2 and not verifier._lock.locked())
    assert verifier._core.keys.refresh_at == clock.now + 90


@pytest.mark.parametrize("policy", ["allowed", "required"])
def test_a_cached_verdict_never_lets_a_token_past_the_dpop_policy(policy: str) -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock(), dpop=policy)
    tok = token(cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"})
    for _ in range(2):  # the verdict is cached after the first refusal, not the acceptance
        with refused("dpop_binding"):
            verifier.verify(tok)
    assert len(verifier._core.tokens) == 1


# --- async -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_verifier_verifies_and_caches() -> None:
    ep = JwksEndpoint()
    verifier = async_verifier(ep, FakeClock())
    tok = token()
    first = await verifier.verify(tok)
    assert first.client_id == "worker"
    assert await verifier.verify(tok) is first
    with pytest.raises(InvalidToken):
        await verifier.verify("garbage")


@pytest.mark.anyio
async def test_async_single_flight_500_concurrent_verifications_with_a_new_kid_fetch_once() -> None:
    ep, clock = JwksEndpoint(), FakeClock()
    verifier = async_verifier(ep, clock)
    await verifier.verify(token())
    ep.keys = jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2"))
    clock.advance(60)
    rotated = [sign(claims(clock.now, jti=str(i)), rsa_key("b"), kid="k2") for i in range(500)]
    subjects: list[str | None] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(0.01)  # the fetch is slow: everybody piles up behind it
        return ep.handler(request)

    verifier._driver = AsyncDriver(
        httpx.AsyncClient(transport=httpx.MockTransport(handler)), timeout=5
    )

    async def work(tok: str) -> None:
        subjects.append((await verifier.verify(tok)).subject)

    async with anyio.create_task_group() as tg:
        for tok in rotated:
            tg.start_soon(work, tok)
    assert len(subjects) == 500
    assert ep.jwks_fetches == 2  # initial + exactly one for the new kid


@pytest.mark.anyio
async def test_async_outage_keeps_known_keys_and_reports_unknown_ones() -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=60"), FakeClock()
    verifier = async_verifier(ep, clock)
    await verifier.verify(token())
    ep.fail = True
    clock.advance(600)
    assert (await verifier.verify(token(clock.now, jti="a"))).subject == "worker@clients"
    with pytest.raises(KeySetUnavailable):
        await verifier.verify(sign(claims(clock.now), rsa_key("b"), kid="k2"))


@pytest.mark.anyio
async def test_async_refresh_and_timeouts_become_key_set_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    verifier = AsyncTokenVerifier(
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        **verifier_options(FakeClock()),
    )
    with pytest.raises(KeySetUnavailable, match="ReadTimeout"):
        await verifier.refresh()


# --- real HTTP on loopback -------------------------------------------------------------


@pytest.fixture
def loopback_jwks() -> Iterator[tuple[str, list[str]]]:
    document = json.dumps(jwks(public_jwk(rsa_key(), "k1"))).encode()
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "public, max-age=300")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", seen
    finally:
        server.shutdown()
        server.server_close()


def test_sync_verifier_fetches_a_real_jwks_over_loopback_http(
    loopback_jwks: tuple[str, list[str]],
) -> None:
    url, seen = loopback_jwks
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_url=url, timeout=2)
    assert verifier.verify(token(time.time())).subject == "worker@clients"
    assert seen == ["/jwks.json"]


@pytest.mark.anyio
async def test_async_verifier_fetches_a_real_jwks_over_loopback_http(
    loopback_jwks: tuple[str, list[str]],
) -> None:
    url, seen = loopback_jwks
    verifier = AsyncTokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_url=url, timeout=2)
    assert (await verifier.verify(token(time.time()))).subject == "worker@clients"
    assert seen == ["/jwks.json"]


def test_each_verifier_refuses_the_other_kind_of_http_client() -> None:
    sync_client, async_client = httpx.Client(), httpx.AsyncClient()
    with pytest.raises(ConfigurationError, match=r"needs an httpx\.AsyncClient"):
        AsyncTokenVerifier(issuer=ISSUER, audience=AUDIENCE, http_client=sync_client)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"needs an httpx\.Client"):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, http_client=async_client)  # type: ignore[arg-type]
    sync_client.close()


def test_a_misspelt_option_is_a_type_error_not_silently_ignored() -> None:
    with pytest.raises(TypeError):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, levay=10)  # type: ignore[call-arg]


# --- issue 15: faults of the issuer ----------------------------------------------------


def test_four_threads_against_a_hanging_jwks_make_one_fetch_and_fail_fast_after_it() -> None:
    # The fetch "hangs" for the whole 5 s timeout (the fake clock moves 5 s during it); the
    # back-off counts from its end, so the queued requests fail fast instead of each
    # running their own 5 s fetch (4 fetches and 20 s before).
    ep, clock = JwksEndpoint(fail=True), FakeClock()
    entered = threading.Event()

    def hang() -> None:
        entered.set()
        time.sleep(0.2)
        clock.advance(5)

    ep.on_request = hang
    verifier = sync_verifier(ep, clock)
    outcomes: list[str] = []

    def work() -> None:
        try:
            verifier.verify(token())
            outcomes.append("ok")
        except KeySetUnavailable as exc:
            outcomes.append(exc.reason)

    first = threading.Thread(target=work)
    first.start()
    entered.wait(5)
    others = [threading.Thread(target=work) for _ in range(3)]
    started = time.monotonic()
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(10)
    assert outcomes == ["keys_unavailable"] * 4
    assert ep.jwks_fetches == 1
    assert time.monotonic() - started < 2
    assert verifier.retry_after() == 5


def test_while_a_refresh_hangs_tokens_with_cached_keys_verify_at_once() -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=60"), FakeClock()
    verifier = sync_verifier(ep, clock)
    verifier.verify(token())
    clock.advance(120)  # expired: the next caller must refetch, and the fetch hangs
    release = threading.Event()
    ep.on_request = lambda: release.wait(5)
    holder = threading.Thread(target=verifier.verify, args=(token(clock.now, jti="a"),))
    holder.start()
    wait_for(lambda: verifier._core.keys.fetching)
    started = time.monotonic()
    assert verifier.verify(token(clock.now, jti="b")).subject == "worker@clients"
    assert time.monotonic() - started < 1  # did not queue behind the hung fetch
    release.set()
    holder.join(5)
    assert ep.jwks_fetches == 2


def test_a_hot_cached_token_of_a_withdrawn_key_is_refused_once_the_set_is_refreshed() -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=60"), FakeClock()
    verifier = sync_verifier(ep, clock)
    hot = token(exp=int(NOW) + 7200)
    verifier.verify(hot)
    ep.keys = jwks(public_jwk(rsa_key("b"), "k2"))  # the issuer retires (compromised) k1
    clock.advance(50)  # in the refresh-ahead window: served, and refreshed behind
    assert verifier.verify(hot).subject == "worker@clients"
    wait_for(lambda: ep.jwks_fetches == 2 and not verifier._lock.locked())
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(hot)
    assert caught.value.reason == "unknown_kid"


def test_a_cached_token_is_not_served_from_an_expired_key_set_without_a_refetch() -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=60"), FakeClock()
    verifier = sync_verifier(ep, clock)
    hot = token(exp=int(NOW) + 7200)
    verifier.verify(hot)
    ep.keys = jwks(public_jwk(rsa_key("b"), "k2"))
    clock.advance(3300)  # no traffic for the whole TTL: no refresh ahead happened
    with pytest.raises(InvalidToken):
        verifier.verify(hot)
    assert ep.jwks_fetches == 2


def test_a_verdict_is_not_cached_if_its_key_left_the_set_while_it_was_verified() -> None:
    from m2m_client.verify._cache import VerifiedTokens
    from m2m_client.verify._jwks import parse_jwks

    old = parse_jwks(json.dumps(jwks(public_jwk(rsa_key(), "k1"))).encode())
    new = parse_jwks(json.dumps(jwks(public_jwk(rsa_key("b"), "k2"))).encode())
    cache = VerifiedTokens(10)
    view = Claims(claims())
    cache.remember("t1", view, old.keys[0], lambda: old)
    cache.remember("t2", view, old.keys[0], lambda: new)  # a refresh ran in between
    assert cache.get("t1", NOW) is view
    assert cache.get("t2", NOW) is None


def test_exp_is_checked_against_the_time_after_waiting_for_the_key_set() -> None:
    ep, clock = JwksEndpoint(), FakeClock()
    ep.on_request = lambda: clock.advance(20)  # the cold fetch takes 20 s
    verifier = sync_verifier(ep, clock, leeway=0)
    with pytest.raises(ExpiredToken):
        verifier.verify(token(exp=int(NOW) + 10))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("jwks_url", "https://issuer.test:99999/jwks.json"),
        ("jwks_url", "https://exa mple.test/jwks.json"),
        ("jwks_url", "http://idp.example.com/jwks.json"),
        ("issuer", "http://idp.example.com/"),
    ],
)
def test_a_bad_or_plain_http_configured_url_is_a_configuration_error(
    option: str, value: str
) -> None:
    overrides: dict[str, Any] = {option: value}
    if option == "issuer":
        overrides["jwks_url"] = None  # the issuer is fetched from only for discovery
    with pytest.raises(ConfigurationError):
        TokenVerifier(**verifier_options(FakeClock(), **overrides))


@pytest.mark.parametrize("kind", ["issuer", "jwks_url"])
def test_plain_http_is_allowed_for_loopback_and_opted_in_development_hosts(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def options(url: str) -> dict[str, Any]:
        return verifier_options(FakeClock(), **{"jwks_url": None, kind: url})

    TokenVerifier(**options("http://127.0.0.1:8080/x"))
    with pytest.raises(ConfigurationError, match="M2M_INSECURE_HTTP_HOSTS"):
        TokenVerifier(**options("http://keycloak:8080/x"))
    monkeypatch.setenv("M2M_INSECURE_HTTP_HOSTS", "keycloak")
    TokenVerifier(**options("http://keycloak:8080/x"))


@pytest.mark.parametrize("jwks_uri", ["http://evil.example.com/jwks", "https://x.test:0/jwks"])
def test_a_discovered_plain_http_or_invalid_jwks_uri_is_refused_not_fetched(
    jwks_uri: str,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return streamed(200, {"issuer": ISSUER, "jwks_uri": jwks_uri})

    seen: list[str] = []
    verifier = TokenVerifier(
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        **verifier_options(FakeClock(), jwks_url=None),
    )
    with pytest.raises(KeySetUnavailable, match="jwks_uri") as caught:
        verifier.verify(token())
    assert jwks_uri in str(caught.value)
    assert all("openid-configuration" in url for url in seen)


def test_rotation_right_after_a_scheduled_fetch_needs_no_cooldown() -> None:
    ep, clock = JwksEndpoint(), FakeClock()
    verifier = sync_verifier(ep, clock)
    verifier.verify(token())
    ep.keys = jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2"))
    clock.advance(1)  # the issuer signs with its new key as soon as it publishes it
    rotated = sign(claims(clock.now), rsa_key("b"), kid="k2")
    assert verifier.verify(rotated).subject == "worker@clients"
    assert ep.jwks_fetches == 2


def test_fifty_random_kids_cause_at_most_two_fetches() -> None:
    ep, clock = JwksEndpoint(), FakeClock()
    verifier = sync_verifier(ep, clock)
    verifier.verify(token())
    for i in range(50):
        with pytest.raises(InvalidToken) as caught:
            verifier.verify(sign(claims(clock.now), kid=f"random-{i}"))
        assert caught.value.reason == "unknown_kid"
        clock.advance(0.1)
    assert ep.jwks_fetches - 1 <= 2


@pytest.mark.anyio
async def test_async_200_concurrent_tokens_with_a_new_kid_right_after_a_fetch_one_fetch() -> None:
    ep, clock = JwksEndpoint(), FakeClock()
    verifier = async_verifier(ep, clock)
    await verifier.verify(token())
    ep.keys = jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2"))
    rotated = [sign(claims(clock.now, jti=str(i)), rsa_key("b"), kid="k2") for i in range(200)]

    async def handler(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(0.01)
        return ep.handler(request)

    verifier._driver = AsyncDriver(
        httpx.AsyncClient(transport=httpx.MockTransport(handler)), timeout=5
    )
    subjects: list[str | None] = []

    async def work(tok: str) -> None:
        subjects.append((await verifier.verify(tok)).subject)

    async with anyio.create_task_group() as tg:
        for tok in rotated:
            tg.start_soon(work, tok)
    assert subjects == ["worker@clients"] * 200
    assert ep.jwks_fetches == 2


@pytest.mark.anyio
async def test_async_refresh_ahead_runs_in_a_background_task_callers_do_not_wait() -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=60"), FakeClock()
    verifier = async_verifier(ep, clock)
    await verifier.verify(token())
    release = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return ep.handler(request)

    verifier._driver = AsyncDriver(
        httpx.AsyncClient(transport=httpx.MockTransport(handler)), timeout=5
    )
    clock.advance(50)
    with anyio.fail_after(1):  # would hang here if the caller waited for the refresh
        assert (await verifier.verify(token(clock.now, jti="x"))).subject == "worker@clients"
        await anyio.sleep(0.05)
        assert verifier._core.keys.fetching
        assert (await verifier.verify(token(clock.now, jti="y"))).subject == "worker@clients"
    release.set()
    for _ in range(200):  # the background task lands
        if not (verifier._core.keys.fetching or verifier._behind):
            break
        await anyio.sleep(0.01)
    assert ep.jwks_fetches == 2
    assert verifier._core.keys.refresh_at == clock.now + 45


@pytest.mark.anyio
async def test_async_hanging_jwks_back_off_counts_from_the_end_and_waiters_fail_fast() -> None:
    clock = FakeClock()
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.2)
        clock.advance(5)
        raise httpx.ReadTimeout("hung", request=request)

    verifier = AsyncTokenVerifier(
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        **verifier_options(clock),
    )
    reasons: list[str] = []

    async def work() -> None:
        try:
            await verifier.verify(token())
        except KeySetUnavailable as exc:
            reasons.append(exc.reason)

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(work)
    assert reasons == ["keys_unavailable"] * 4
    assert calls == 1


def test_a_refusal_is_logged_at_debug_with_its_reason_and_never_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    verifier = sync_verifier(JwksEndpoint(), FakeClock())
    bad = token(aud="https://other.test")
    with caplog.at_level("DEBUG", logger="m2m_client.verify"), refused("audience"):
        verifier.verify(bad)
    assert "token refused (audience)" in caplog.text
    for part in bad.split("."):
        assert part not in caplog.text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_a_refresh_held_the_lock_can_still_fetch() -> None:
    ep, clock = JwksEndpoint(cache_control="max-age=60"), FakeClock()
    verifier = sync_verifier(ep, clock, timeout=0.5)
    verifier.verify(token())
    release = threading.Event()
    ep.on_request = lambda: release.wait(5)
    clock.advance(50)
    verifier.verify(token(clock.now, jti="x"))  # starts a background refresh holding the lock
    wait_for(lambda: verifier._core.keys.fetching)
    pid = os.fork()
    if pid == 0:  # the child: no refresh thread; it must not wait for one forever
        code = 1
        try:
            ep.on_request = None
            ep.keys = jwks(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2"))
            verifier._driver = sync_verifier(ep, clock)._driver
            rotated = sign(claims(clock.now), rsa_key("b"), kid="k2")  # needs a fetch
            code = 0 if verifier.verify(rotated).subject else 1
        finally:
            os._exit(code)
    release.set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
