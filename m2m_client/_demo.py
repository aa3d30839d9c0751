"""``m2m-client demo``: the whole client-credentials flow on loopback, no account needed.

A :class:`~m2m_client.testing.LocalIssuer` (real HTTP), the guide's FastAPI routes served by
uvicorn, and a worker using ``AsyncTokenClient`` + ``BearerAuth``. The worker's clock is a
seam: the demo moves it one hour ahead to show an expired token being replaced, without
waiting. Tokens are shown by fingerprint only (first 12 hex digits of their SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import anyio

from m2m_client import _stacks
from m2m_client._proxy import own_client

if TYPE_CHECKING:
    import httpx

    from m2m_client._client import TokenEvent
    from m2m_client.testing import LocalIssuer

__all__ = ["run_demo"]

API_AUDIENCE = "https://api.example.com"
WORKER_ID = "demo-worker"
WORKER_SCOPE = "read:data read:dashboard"
WORKER_ROLES = ("reader",)
STARTUP_TIMEOUT = 15.0
DEMO_TIMEOUT = 60.0


def run_demo(out: TextIO | None = None, *, dpop: bool = False) -> int:
    """Run the demo, printing to ``out`` (default stdout); return the exit code.

    ``dpop``: the worker gets DPoP-bound tokens (RFC 9449), the API requires them, and an
    attacker holding a copy of the token (but not the worker's key) is refused.
    """
    return anyio.run(_demo, out or sys.stdout, dpop, backend="asyncio")


def _fingerprint(authorization: str | None) -> str:
    if not authorization:
        return "-"
    token = authorization.partition(" ")[2]
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _short(response: httpx.Response, limit: int = 72) -> str:
    try:
        text = json.dumps(response.json(), separators=(",", ":"))
    except ValueError:
        text = response.text
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _WorkerClock:
    """The worker's clock: real time plus a jump the demo controls."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class _Trace:
    fetched: list[str] = field(default_factory=list)
    last_sent: str = "-"

    def on_event(self, event: TokenEvent) -> None:
        if event.kind == "token_fetched" and event.token is not None:
            self.fetched.append(event.token.fingerprint)

    async def on_request(self, request: httpx.Request) -> None:
        self.last_sent = _fingerprint(request.headers.get("authorization"))


async def _demo(out: TextIO, dpop: bool = False) -> int:
    from m2m_client.testing import LocalIssuer

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    issuer = LocalIssuer(audience=API_AUDIENCE)
    issuer.add_client(
        WORKER_ID, secrets.token_urlsafe(24), scope=WORKER_SCOPE, roles=list(WORKER_ROLES)
    )
    exit_code = 1
    with anyio.fail_after(DEMO_TIMEOUT):
        async with issuer:
            exit_code = await _with_issuer(issuer, say, dpop)
    say("")
    say("servers stopped, ports released")
    if exit_code == 0:
        say("")
        say("next: run an issuer for your own service and worker with")
        say("  m2m-client issuer --client worker --permissions read:data --roles reader")
        say("(README: 'From the demo to your own system')")
    return exit_code


async def _with_issuer(issuer: LocalIssuer, say: Callable[[str], None], dpop: bool) -> int:
    import uvicorn

    from m2m_client._demo_app import create_app
    from m2m_client.verify import AsyncTokenVerifier

    verifier = AsyncTokenVerifier(
        issuer=issuer.url,
        audience=API_AUDIENCE,
        roles_claim=issuer.roles_claim,
        dpop="required" if dpop else "disabled",
    )
    config = uvicorn.Config(
        create_app(verifier), log_config=None, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    api_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    exit_code = 1
    try:
        async with anyio.create_task_group() as servers:
            servers.start_soon(server.serve, [sock])
            try:
                with anyio.fail_after(STARTUP_TIMEOUT):
                    while not server.started:  # noqa: ASYNC110 (uvicorn only has a flag)
                        await anyio.sleep(0.01)
                say("m2m-client demo: the client-credentials flow on 127.0.0.1, no account needed")
                say("")
                say(f"  authorization server  LocalIssuer {issuer.url} ({issuer.algorithm})")
                api = "FastAPI + JWTBearer, DPoP required" if dpop else "FastAPI + JWTBearer"
                say(f"  protected API         {api} {api_url}/")
                say(
                    f"  worker                client {WORKER_ID!r}, scopes {WORKER_SCOPE!r}, "
                    f"roles {list(WORKER_ROLES)}"
                )
                say("")
                if dpop:
                    exit_code = await _dpop_worker(issuer, api_url, say)
                else:
                    exit_code = await _worker(issuer, api_url, say)
            finally:
                server.should_exit = True
    finally:
        sock.close()
    return exit_code


async def _worker(issuer: LocalIssuer, api_url: str, say: Callable[[str], None]) -> int:
    from m2m_client._auth import BearerAuth
    from m2m_client._client import AsyncTokenClient
    from m2m_client.config import ClientCredentials

    credentials = ClientCredentials(
        issuer=issuer.url,
        client_id=WORKER_ID,
        client_secret=issuer.client_secret(WORKER_ID),
        audience=API_AUDIENCE,
    )
    clock = _WorkerClock()
    trace = _Trace()
    statuses: list[int] = []

    async with (
        AsyncTokenClient(credentials, clock=clock, on_event=trace.on_event) as tokens,
        own_client(
            _stacks.default(),
            asynchronous=True,
            base_url=api_url,
            auth=BearerAuth(tokens),
            timeout=10,
            event_hooks={"request": [trace.on_request]},
        ) as http,
    ):

        async def call(path: str, *, public: bool = False, note: str = "") -> None:
            before = len(trace.fetched)
            trace.last_sent = "-"
            if public:
                response = await http.get(path, auth=None)
            else:
                response = await http.get(path)
            statuses.append(response.status_code)
            n = len(statuses)
            say(f"{n}. GET {path:<11} -> {response.status_code} {_short(response)}")
            if public:
                say("   no token sent (public route)")
            elif len(trace.fetched) > before:
                kind = "fetched" if before == 0 else "refreshed"
                say(
                    f"   token {trace.last_sent}  {kind} from the issuer "
                    f"(token request #{len(trace.fetched)})"
                )
            else:
                say(f"   token {trace.last_sent}  reused from the cache (no token request)")
            if note:
                say(f"   {note}")

        await call("/", public=True)
        await call("/protected")
        await call("/dashboard", note="route needs permission read:dashboard (the worker has it)")
        await call("/admin", note="route needs role admin (the worker has only 'reader')")
        await call("/profile")
        say("")
        say("... one hour passes on the worker's clock: the cached token has expired ...")
        clock.offset = 3600 + 60
        await call("/protected")
        await call("/dashboard")

    fetched = len(trace.fetched)
    say("")
    say(
        f"{len(statuses)} calls, {fetched} token requests (issuer counted "
        f"{issuer.token_requests}), {statuses.count(403)} refused with 403"
    )
    if statuses != [200, 200, 200, 403, 200, 200, 200] or fetched != 2:
        say("unexpected outcome: expected one 403 (/admin) and 2 token requests")
        return 1
    say("as expected: one token fetched, reused, refreshed after expiry; /admin refused")
    return 0


async def _dpop_worker(issuer: LocalIssuer, api_url: str, say: Callable[[str], None]) -> int:
    """DPoP: the worker's calls succeed; a copy of its token without its key does not."""
    from m2m_client._auth import BearerAuth
    from m2m_client._client import AsyncTokenClient
    from m2m_client._dpop import DPoPKey
    from m2m_client.config import ClientCredentials

    key = DPoPKey.generate()
    credentials = ClientCredentials(
        issuer=issuer.url,
        client_id=WORKER_ID,
        client_secret=issuer.client_secret(WORKER_ID),
        audience=API_AUDIENCE,
        dpop=key,
    )
    captured: list[httpx.Request] = []

    async def capture(request: httpx.Request) -> None:
        captured.append(request)

    statuses: list[int] = []

    def show(label: str, response: httpx.Response) -> None:
        statuses.append(response.status_code)
        say(f"{len(statuses)}. {label:<44} -> {response.status_code} {_short(response, 60)}")

    say(f"worker DPoP key: {key.alg}, thumbprint {key.thumbprint}")
    async with (
        AsyncTokenClient(credentials) as tokens,
        own_client(
            _stacks.default(),
            asynchronous=True,
            base_url=api_url,
            auth=BearerAuth(tokens),
            timeout=10,
            event_hooks={"request": [capture]},
        ) as http,
    ):
        show("worker: GET /protected", await http.get("/protected"))
        token = await tokens.get_token()
        sent = captured[-1]
        say(f"   token {_fingerprint(token.authorization)} is bound to the worker's key (cnf.jkt)")
        say("   sent as 'Authorization: DPoP <token>' with a DPoP proof signed by the key")
        show("worker: GET /dashboard (a fresh proof)", await http.get("/dashboard"))
        say("")
        say("... an attacker copies the token and a proof from a log ...")
        url = f"{api_url}/protected"
        access = token.access_token
        thief = DPoPKey.generate()
        async with own_client(_stacks.default(), asynchronous=True, timeout=10) as attacker:
            attempts = [
                ("attacker: the token as a bearer token", {"Authorization": f"Bearer {access}"}),
                (
                    "attacker: the token + the copied proof",
                    {"Authorization": f"DPoP {access}", "DPoP": sent.headers["dpop"]},
                ),
                (
                    "attacker: the token + a proof by its own key",
                    {
                        "Authorization": f"DPoP {access}",
                        "DPoP": thief.proof("GET", url, now=time.time(), access_token=access),
                    },
                ),
            ]
            for label, headers in attempts:
                response = await attacker.get(url, headers=headers)
                show(label, response)
                challenge = response.headers.get("www-authenticate", "-")
                say(f"   WWW-Authenticate: {challenge.partition(', error_description')[0]}")
    say("")
    if statuses != [200, 200, 401, 401, 401]:
        say("unexpected outcome: expected the worker's 2 calls to pass and 3 attacks refused")
        return 1
    say("as expected: the worker's calls pass; the stolen token is useless without the key")
    return 0
