"""BearerAuth and redirects the client follows (issue 19, item 10): a same-origin hop gets a
DPoP proof of its own, nothing bound to the token reaches another origin, and an answer from
another origin never renews the token. Two real servers on 127.0.0.1, two ports: two origins.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from m2m_client import AsyncTokenClient, BearerAuth, TokenClient

from ._loopback import Loopback, stack

STACKS = ["httpx", "httpx2"]


def _claims(proof: str) -> dict[str, Any]:
    payload = proof.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


class Origins:
    """``a`` (token endpoint and API) and ``b``, another origin.

    On ``a``: ``/same`` redirects to ``/final``; ``/cross`` to ``b``'s ``/data``; ``/bounce``
    to ``b``'s ``/back``, which redirects to ``a``'s ``/final``. ``/final`` and ``/data``
    answer 200 to a token with a proof for exactly that request, else 401.
    """

    def __init__(self, stack_name: str) -> None:
        self.stack = stack(stack_name)
        self._exit = ExitStack()
        self.a = self._exit.enter_context(Loopback(self._route_a))
        self.b = self._exit.enter_context(Loopback(self._route_b))

    def close(self) -> None:
        self._exit.close()

    def _check(self, base: str, method: str, path: str, headers: dict[str, str]) -> int:
        authorization = headers.get("authorization")
        if authorization is None:
            return 401
        proof = headers.get("dpop")
        if authorization.startswith("DPoP "):
            if proof is None:
                return 401
            claims = _claims(proof)
            if (claims.get("htm"), claims.get("htu")) != (method, base + path):
                return 400  # told apart from a refused token in the assertions
        return 200

    def _route_a(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        where = {"/same": "/final", "/cross": f"{self.b.url}/data", "/bounce": f"{self.b.url}/back"}
        if path in where:
            return 307, {"Location": where[path]}, b""
        status = self._check(self.a.url, method, path, headers)
        if status == 400:
            return 401, {"WWW-Authenticate": 'DPoP error="invalid_dpop_proof"'}, b""
        return status, {"WWW-Authenticate": "Bearer"} if status == 401 else {}, body or b"ok"

    def _route_b(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if path == "/back":
            return 307, {"Location": f"{self.a.url}/final"}, b""
        # Another origin that answers 401 when no token came: a plain "Bearer" challenge,
        # which from the origin the token was for would mean "token refused".
        status = 200 if headers.get("authorization") else 401
        return status, {"WWW-Authenticate": "Bearer"} if status == 401 else {}, b""

    def paths(self, server: Loopback) -> list[str]:
        return [path for path, _, _ in server.seen]

    def token_bound_headers(self, server: Loopback) -> list[tuple[str | None, str | None]]:
        return [(auth, proof) for _, auth, proof in server.seen if auth or proof]


@contextmanager
def origins(stack_name: str) -> Iterator[Origins]:
    pair = Origins(stack_name)
    try:
        yield pair
    finally:
        pair.close()


def _get_sync(pair: Origins, path: str, dpop: bool, hook: bool) -> Any:
    http_stack = pair.stack
    with (
        http_stack.Client() as token_http,
        TokenClient(pair.a.credentials(dpop=dpop), http_client=token_http) as tokens,
    ):
        auth = BearerAuth(tokens)
        hooks = {"request": [auth.redirect_hop]} if hook else {}
        with http_stack.Client(auth=auth, follow_redirects=True, event_hooks=hooks) as http:
            return http.post(f"{pair.a.url}{path}", content=b"payload")


async def _get_async(pair: Origins, path: str, dpop: bool, hook: bool) -> Any:
    http_stack = pair.stack
    async with (
        http_stack.AsyncClient() as token_http,
        AsyncTokenClient(pair.a.credentials(dpop=dpop), http_client=token_http) as tokens,
    ):
        auth = BearerAuth(tokens)
        hooks = {"request": [auth.aredirect_hop]} if hook else {}
        async with http_stack.AsyncClient(
            auth=auth, follow_redirects=True, event_hooks=hooks
        ) as http:
            return await http.post(f"{pair.a.url}{path}", content=b"payload")


def _same_origin_checks(pair: Origins, response: Any, dpop: bool, hook: bool) -> None:
    assert response.status_code == 200
    assert response.content == b"payload"  # a 307 keeps the body, on each hop
    assert pair.a.token_requests == 1  # no renewal
    finals = [(auth, proof) for path, auth, proof in pair.a.seen if path == "/final"]
    if dpop:
        assert finals[-1][1] is not None
        assert _claims(finals[-1][1])["htu"] == f"{pair.a.url}/final"
        # With the hook, the hop's first proof is its own: no 401 to recover from.
        assert len(finals) == (1 if hook else 2)
    else:
        assert finals == [("Bearer tok-1", None)]


def _cross_origin_checks(pair: Origins, response: Any, dpop: bool, hook: bool, path: str) -> None:
    assert response.status_code == 401  # the other origin's answer, returned as is
    assert pair.a.token_requests == 1  # another origin's 401 says nothing about our token
    assert pair.paths(pair.a).count(path) == 1  # and is not replayed
    # Authorization never goes to the other origin (httpx strips it); with the hook the
    # DPoP proof does not either.
    assert all(auth is None for _, auth, _ in pair.b.seen)
    if hook or not dpop:
        assert pair.token_bound_headers(pair.b) == []
    if path == "/bounce":  # A -> B -> A: nothing bound to the token after leaving
        assert next(seen for seen in pair.a.seen if seen[0] == "/final")[1] is None


MODES = [
    pytest.param(dpop, hook, id=f"{'dpop' if dpop else 'bearer'}-{'hook' if hook else 'plain'}")
    for dpop in (False, True)
    for hook in (False, True)
]


@pytest.mark.parametrize("stack_name", STACKS)
@pytest.mark.parametrize(("dpop", "hook"), MODES)
def test_sync_same_origin_redirect_gets_its_own_proof_and_no_renewal(
    stack_name: str, dpop: bool, hook: bool
) -> None:
    # Before (DPoP): the hop carried the first URL's proof, got a 401 and renewed the token.
    with origins(stack_name) as pair:
        _same_origin_checks(pair, _get_sync(pair, "/same", dpop, hook), dpop, hook)


@pytest.mark.anyio
@pytest.mark.parametrize("stack_name", STACKS)
@pytest.mark.parametrize(("dpop", "hook"), MODES)
async def test_async_same_origin_redirect_gets_its_own_proof_and_no_renewal(
    stack_name: str, dpop: bool, hook: bool
) -> None:
    with origins(stack_name) as pair:
        _same_origin_checks(pair, await _get_async(pair, "/same", dpop, hook), dpop, hook)


@pytest.mark.parametrize("path", ["/cross", "/bounce"])
@pytest.mark.parametrize("stack_name", STACKS)
@pytest.mark.parametrize(("dpop", "hook"), MODES)
def test_sync_cross_origin_redirect_gets_nothing_bound_to_the_token_and_renews_nothing(
    stack_name: str, dpop: bool, hook: bool, path: str
) -> None:
    # Before: the other origin's 401 renewed the token and replayed the request (its DPoP
    # proof, with `ath`, went there twice).
    with origins(stack_name) as pair:
        _cross_origin_checks(pair, _get_sync(pair, path, dpop, hook), dpop, hook, path)


def test_a_dpop_proof_sent_to_another_origin_without_the_hook_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with origins("httpx") as pair, caplog.at_level("WARNING", logger="m2m_client"):
        http_stack = pair.stack
        with (
            http_stack.Client() as token_http,
            TokenClient(pair.a.credentials(dpop=True), http_client=token_http) as tokens,
            http_stack.Client(auth=BearerAuth(tokens), follow_redirects=True) as http,
        ):
            for _ in range(3):
                assert http.get(f"{pair.a.url}/cross").status_code == 401
    warnings = [r for r in caplog.records if "redirect_hop" in r.getMessage()]
    assert len(warnings) == 1
    assert "tok-" not in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/cross", "/bounce"])
@pytest.mark.parametrize("stack_name", STACKS)
@pytest.mark.parametrize(("dpop", "hook"), MODES)
async def test_async_cross_origin_redirect_gets_nothing_bound_to_the_token(
    stack_name: str, dpop: bool, hook: bool, path: str
) -> None:
    with origins(stack_name) as pair:
        _cross_origin_checks(pair, await _get_async(pair, path, dpop, hook), dpop, hook, path)
