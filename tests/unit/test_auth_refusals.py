"""BearerAuth and 401s: every request refused with a revoked token recovers (one token request
in all), and only a refusal of the token itself renews it (issue 19, items 2 and 6)."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2m_client import AsyncTokenClient, BearerAuth, TokenClient
from m2m_client._refusal import parse_www_authenticate, token_refused

from ._calling import FakeClock, TokenEndpoint, credentials
from ._loopback import Loopback, serving, stack

CALLS = 50
STACKS = ["httpx", "httpx2"]


class Revoking:
    """An API that revokes ``tok-1``: its 401s are held until all ``CALLS`` requests carrying
    it arrived, so that every one of them meets the revoked token at once."""

    def __init__(self) -> None:
        self.arrived = threading.Barrier(CALLS)

    def __call__(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if headers.get("authorization") == "Bearer tok-1":
            try:
                self.arrived.wait(timeout=20)
            except threading.BrokenBarrierError:
                return 500, {}, b"not every request came with tok-1"
            return 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, b""
        return 200, {}, b"ok"


def _check(server: Loopback, statuses: list[int]) -> None:
    assert statuses == [200] * CALLS
    assert server.token_requests == 2  # the first token and one renewal
    refused = [seen for seen in server.seen if seen[1] == "Bearer tok-1"]
    replayed = [seen for seen in server.seen if seen[1] == "Bearer tok-2"]
    assert (len(refused), len(replayed)) == (CALLS, CALLS)  # each replayed exactly once


@pytest.mark.parametrize("stack_name", STACKS)
def test_fifty_threads_refused_with_a_revoked_token_all_replay_with_one_new_token(
    stack_name: str,
) -> None:
    # Before: one request was replayed, 49 got the 401 (the renewal limit refused them).
    http_stack = stack(stack_name)
    with serving(Revoking(), token_delay=0.3) as server:
        statuses: list[int] = []
        with (
            http_stack.Client() as token_http,
            TokenClient(server.credentials(), http_client=token_http) as tokens,
            http_stack.Client(auth=BearerAuth(tokens), timeout=30) as http,
        ):

            def call() -> None:
                statuses.append(http.get(f"{server.url}/data").status_code)

            threads = [threading.Thread(target=call) for _ in range(CALLS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
    _check(server, statuses)


@pytest.mark.anyio
@pytest.mark.parametrize("stack_name", STACKS)
async def test_fifty_tasks_refused_with_a_revoked_token_all_replay_with_one_new_token(
    stack_name: str,
) -> None:
    http_stack = stack(stack_name)
    with serving(Revoking(), token_delay=0.3) as server:
        statuses: list[int] = []
        async with (
            http_stack.AsyncClient() as token_http,
            AsyncTokenClient(server.credentials(), http_client=token_http) as tokens,
            http_stack.AsyncClient(auth=BearerAuth(tokens), timeout=30) as http,
        ):

            async def call() -> None:
                statuses.append((await http.get(f"{server.url}/data")).status_code)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as group:
                    for _ in range(CALLS):
                        group.start_soon(call)
    _check(server, statuses)


# --- which 401 renews the token ----------------------------------------------------------

NOT_THE_TOKEN = [
    'Bearer error="insufficient_scope", scope="write:data"',
    'Bearer realm="api", error="invalid_request"',
    'DPoP algs="ES256", error="invalid_dpop_proof"',
    'Basic realm="x", Bearer error="insufficient_scope"',
    'Bearer error="insufficient_scope", error_description="needs \\"write\\", not read"',
    'Bearer realm="ünïcödé, yes", error="insufficient_scope"',
]
THE_TOKEN = [
    None,
    "Bearer",
    'Bearer realm="api"',
    'Bearer error="invalid_token", error_description="revoked"',
    'Bearer error="INVALID_TOKEN"',
    'Basic realm="x", Bearer error="invalid_token"',
    'Bearer realm="a", DPoP error="invalid_token", algs="ES256"',
    "\x00\xff garbage ))) ==",
]


class Api:
    """A MockTransport API answering every call with ``status`` and ``challenge``."""

    def __init__(self, server: TokenEndpoint, status: int, challenge: str | None) -> None:
        self.server, self.status, self.challenge = server, status, challenge
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "as.example.com":
            return self.server.sync_handler(request)
        self.calls += 1
        # Bytes as a server sends them (UTF-8 inside a quoted string is not ASCII).
        headers = [] if self.challenge is None else [(b"WWW-Authenticate", self.challenge.encode())]
        return httpx.Response(self.status, headers=headers)


@pytest.mark.parametrize("challenge", NOT_THE_TOKEN)
def test_a_401_that_does_not_refuse_the_token_keeps_it(challenge: str) -> None:
    # Before: insufficient_scope renewed the token (and, the IdP being down, failed the call).
    server = TokenEndpoint()
    api = Api(server, 401, challenge)
    transport = httpx.MockTransport(api)
    with (
        TokenClient(
            credentials(), http_client=httpx.Client(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.Client(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        first = tokens.get_token()
        assert http.get("https://api.example.com/data").status_code == 401
        assert tokens.get_token() is first
    assert len(server.requests) == 1
    assert api.calls == 1  # no replay


@pytest.mark.parametrize("challenge", THE_TOKEN)
def test_a_401_that_refuses_the_token_renews_it_and_replays_once(challenge: str | None) -> None:
    server = TokenEndpoint()
    api = Api(server, 401, challenge)
    transport = httpx.MockTransport(api)
    with (
        TokenClient(
            credentials(), http_client=httpx.Client(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.Client(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        assert http.get("https://api.example.com/data").status_code == 401
    assert len(server.requests) == 2
    assert api.calls == 2


def test_a_403_never_renews_the_token() -> None:
    server = TokenEndpoint()
    api = Api(server, 403, 'Bearer error="invalid_token"')
    transport = httpx.MockTransport(api)
    with (
        TokenClient(
            credentials(), http_client=httpx.Client(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.Client(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        assert http.get("https://api.example.com/data").status_code == 403
    assert (len(server.requests), api.calls) == (1, 1)


@pytest.mark.anyio
async def test_an_idp_outage_does_not_turn_an_insufficient_scope_401_into_failed_calls() -> None:
    # Before: the 401 dropped a token valid for an hour; the IdP down, every later call raised.
    server = TokenEndpoint()
    api = Api(server, 401, 'Bearer error="insufficient_scope", scope="admin"')

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "as.example.com" and server.requests:
            server.requests.append(request)
            return httpx.Response(503)  # the outage starts after the first token
        if request.url.path == "/fine":
            return httpx.Response(200)
        return api(request)

    transport = httpx.MockTransport(handler)
    async with (
        AsyncTokenClient(
            credentials(), http_client=httpx.AsyncClient(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.AsyncClient(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        assert (await http.get("https://api.example.com/admin")).status_code == 401
        for _ in range(5):
            assert (await http.get("https://api.example.com/fine")).status_code == 200
    assert len(server.requests) == 1


# --- WWW-Authenticate, fuzzed -----------------------------------------------------------

_token = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~+!#$%&'*^`|",
    min_size=1,
    max_size=12,
)
_quoted_text = st.text(max_size=30).filter(lambda text: "\r" not in text and "\n" not in text)
_error = st.sampled_from(
    [
        "invalid_token",
        "insufficient_scope",
        "invalid_request",
        "invalid_dpop_proof",
        "use_dpop_nonce",
    ]
)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def _challenge(draw: st.DrawFn) -> tuple[str, str, str | None]:
    scheme = draw(st.sampled_from(["Bearer", "bearer", "DPoP", "Basic", "Digest", "Negotiate"]))
    names = draw(
        st.lists(_token.filter(lambda n: n.lower() != "error"), max_size=3, unique_by=str.lower)
    )
    params = [f"{name}={draw(st.one_of(_token, _quoted_text.map(_quote)))}" for name in names]
    error = draw(st.one_of(st.none(), _error))
    if error is not None:
        quoted = draw(st.booleans())
        params.insert(
            draw(st.integers(0, len(params))), f"error={_quote(error) if quoted else error}"
        )
    text = scheme if not params else f"{scheme} " + ", ".join(params)
    return text, scheme.lower(), error


@settings(max_examples=300, deadline=None)
@given(st.lists(_challenge(), min_size=1, max_size=4), st.booleans())
def test_token_refused_reads_every_well_formed_challenge_list(
    challenges: list[tuple[str, str, str | None]], split: bool
) -> None:
    values = [text for text, _, _ in challenges]
    header: Any = values if split else ", ".join(values)
    errors = {error for _, scheme, error in challenges if scheme in ("bearer", "dpop") and error}
    assert [scheme for scheme, _ in parse_www_authenticate(header)] == [
        scheme for _, scheme, _ in challenges
    ]
    assert token_refused(401, header) is (not errors or "invalid_token" in errors)
    assert token_refused(403, header) is False


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(st.text(max_size=100), max_size=4)))
def test_any_www_authenticate_value_gives_an_answer_never_an_exception(header: Any) -> None:
    assert token_refused(401, header) in (True, False)
    assert isinstance(parse_www_authenticate(header), list)
