"""Issue 21 against node oidc-provider: private_key_jwt assertions from a file the platform
rewrites mid-run (kubelet-style atomic symlink swap), ``aud`` equal to the issuer."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from m2m_client import ClientCredentials, TokenClient
from m2m_client.testing import ProjectedTokenFile

from .conftest import IdP

pytestmark = pytest.mark.interop


def test_assertions_from_a_file_rewritten_mid_run_lose_no_call(idp: IdP, tmp_path: Path) -> None:
    key = idp.key_client
    projected = ProjectedTokenFile(
        issuer=key.client_id,
        subject=key.client_id,
        audience=idp.issuer,  # RFC 7523bis: the issuer identifier
        directory=tmp_path,
        lifetime=120,
        private_key=load_pem_private_key(key.rsa_private_pem.encode(), password=None),
        kid=key.rsa_kid,
    )
    sent: list[str] = []

    def record(request: httpx.Request) -> None:
        if request.url.path.endswith("/token"):
            form = parse_qs(request.read().decode())
            sent.append(form["client_assertion"][0])

    creds = ClientCredentials(
        token_url=idp.token_url, client_id=key.client_id, client_assertion=projected.path
    )
    failures: list[BaseException] = []
    stop = threading.Event()
    http = httpx.Client(event_hooks={"request": [record]})
    calls = 0
    with TokenClient(creds, http_client=http) as client:

        def worker() -> None:  # the application: calls all along, never fails
            nonlocal calls
            while not stop.is_set():
                try:
                    client.get_token()
                    calls += 1
                except BaseException as exc:
                    failures.append(exc)
                time.sleep(0.005)

        client.get_token()
        thread = threading.Thread(target=worker)
        thread.start()
        try:
            for _ in range(4):
                # The kubelet rotates; the next token request (a refresh) sends the new one.
                # oidc-provider refuses a reused jti: success proves the new file was read.
                projected.rotate()
                client.get_token(force_refresh=True)
                assert sent[-1] == projected.token
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join(timeout=30)
    http.close()
    assert not thread.is_alive()
    assert failures == []
    assert calls > 0
    distinct = set(sent)
    assert len(sent) == len(distinct) == projected.rotations == 5
    for assertion in distinct:
        claims: dict[str, Any] = jwt.decode(assertion, options={"verify_signature": False})
        assert claims["aud"] == idp.issuer
