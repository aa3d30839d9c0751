"""Users' code from issue 11, type-checked in CI (``mypy --strict`` with httpx and httpx2
installed): the same BearerAuth, token clients, verifiers and LocalIssuer transport are
accepted by both stacks' type signatures. Not a test module: nothing here runs.
"""

from __future__ import annotations

import httpx
import httpx2

from m2m_client import AsyncTokenClient, BearerAuth, ClientCredentials, TokenClient
from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier


async def users_code(creds: ClientCredentials, issuer: LocalIssuer) -> None:
    tokens = TokenClient(creds)
    tokens = TokenClient(creds, http_client=httpx2.Client())
    httpx.Client(auth=BearerAuth(tokens))
    httpx2.Client(auth=BearerAuth(tokens))
    async with AsyncTokenClient(creds, http_client=httpx2.AsyncClient()) as t:
        api = httpx2.AsyncClient(auth=BearerAuth(t))
        await api.get("https://api.example.com/data")
    AsyncTokenVerifier(issuer=issuer.url, audience="a", http_client=httpx2.AsyncClient())
    TokenVerifier(issuer=issuer.url, audience="a", http_client=httpx.Client())
    httpx2.Client(transport=issuer.transport())
    httpx.AsyncClient(transport=issuer.transport())
