"""No socket outlives a sync attempt whose deadline passed before its connect began.

On a loaded machine the time between an attempt's start (its budget) and the building of its
request (leasing the HTTP client: a new one loads its TLS context) can exceed the whole
budget. The request was then built with a timeout below zero; httpcore's connect
(``socket.create_connection``) created the socket, failed in ``settimeout`` with a ValueError
(not an OSError, so not closed there) and the socket was left to the garbage collector: a
ResourceWarning, which the suite's ``filterwarnings = error`` turns into a failed test. Here
the lease is made to outlast the budget on every sync entry point that connects; and, the other
interleaving, the connect (the deadline fires while the socket exists, unknown to the watchdog:
it is shut when learnt, and httpcore, its owner, still closes it).
"""

from __future__ import annotations

import gc
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from m2m_client import ClientCredentials, RetryPolicy, TokenClient, discover_resource
from m2m_client import _http as http
from m2m_client.errors import M2MError
from m2m_client.verify import TokenVerifier
from tests.unit._jwt_factory import AUDIENCE, ISSUER, FakeClock, claims, jwks, public_jwk, sign
from tests.unit._jwt_factory import rsa_key as make_rsa_key

from ._faults import Fault, FaultServer

TIMEOUT = 0.3  # each attempt's budget
LEASE = TIMEOUT + 0.3  # how long leasing the HTTP client takes here: past the budget


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def _slow_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client the drivers create takes LEASE seconds to make (as under heavy load)."""
    real = http.own_client

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(LEASE)
        return real(*args, **kwargs)

    monkeypatch.setattr(http, "own_client", slow)


def _slow_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connect returns LEASE seconds after its socket connected: the deadline fires while
    the socket exists but no trace event has named it yet (the watchdog learns it after)."""
    real = socket.create_connection

    def slow(*args: Any, **kwargs: Any) -> socket.socket:
        sock = real(*args, **kwargs)
        time.sleep(LEASE)
        return sock

    monkeypatch.setattr(socket, "create_connection", slow)


SEAMS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "lease": _slow_lease,
    "connect": _slow_connect,
}


def _token(server: FaultServer) -> None:
    server.faults["/token"] = Fault.json({"access_token": "t", "token_type": "Bearer"})
    creds = ClientCredentials(
        token_url=f"{server.url}/token", client_id="w", client_secret="s", timeout=TIMEOUT
    )
    # The fetch's whole budget ends during the lease (an attempt's own timeout only starts
    # once it has its client: see test_building_the_client_does_not_use_up_the_attempts_time).
    with TokenClient(creds, retry=RetryPolicy(max_attempts=1, max_total_seconds=TIMEOUT)) as tokens:
        tokens.get_token()


def _verify(server: FaultServer, **options: Any) -> None:
    clock = FakeClock(time.time())
    verifier = TokenVerifier(audience=AUDIENCE, timeout=TIMEOUT, clock=clock, **options)
    verifier.verify(sign(claims(clock.now, iss=options["issuer"])))


def _jwks(server: FaultServer) -> None:
    server.faults["/jwks"] = Fault.json(jwks(public_jwk(make_rsa_key(), "k1")))
    _verify(server, issuer=ISSUER, jwks_url=f"{server.url}/jwks")


def _discovery(server: FaultServer) -> None:
    _verify(server, issuer=f"{server.url}/", jwks_url=None)


def _resource(server: FaultServer) -> None:
    discover_resource(server.url, timeout=TIMEOUT)


ENTRY_POINTS: dict[str, Callable[[FaultServer], None]] = {
    "token": _token,
    "jwks": _jwks,
    "discovery": _discovery,
    "resource": _resource,
}


@pytest.mark.parametrize("seam", list(SEAMS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_no_socket_leaks_when_the_deadline_passes_before_the_connect(
    server: FaultServer, entry: str, seam: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    SEAMS[seam](monkeypatch)
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(M2MError) as failed:
            ENTRY_POINTS[entry](server)
        gc.collect()
    assert "deadline" in str(failed.value) or "did not complete" in str(failed.value), repr(
        failed.value
    )
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []
    assert server.requests == []  # nothing was sent: out of time, or the socket shut first


def test_building_the_client_does_not_use_up_the_attempts_time(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An attempt's timeout is time on the network: making its HTTP client (a TLS context, slow
    # on a loaded machine) took all of it before, and the request never left. The fetch's
    # absolute budget still bounds both.
    _slow_lease(monkeypatch)
    server.faults["/token"] = Fault.json({"access_token": "t", "token_type": "Bearer"})
    creds = ClientCredentials(
        token_url=f"{server.url}/token", client_id="w", client_secret="s", timeout=TIMEOUT
    )
    with TokenClient(creds, retry=RetryPolicy(max_attempts=1, max_total_seconds=5)) as tokens:
        assert tokens.get_token().access_token == "t"
    assert server.count("/token") == 1
