"""An async worker calling a protected API with client-credentials tokens (asyncio or trio).

Run it with no arguments: unless M2M_TOKEN_URL / M2M_ISSUER (or AUTH0_DOMAIN) is set, it starts
a local authorization server (m2m_client.testing.LocalIssuer) and a small protected API on
127.0.0.1, so the whole flow runs on a fresh machine. With your own settings::

    M2M_TOKEN_URL=https://tenant.example.com/oauth/token M2M_CLIENT_ID=... \
    M2M_CLIENT_SECRET=... M2M_AUDIENCE=https://api.example.com \
    M2M_API_URL=https://api.example.com/data python examples/async_worker.py
"""

from __future__ import annotations

import logging
import os

import anyio
import httpx

from m2m_client import AsyncTokenClient, BearerAuth, ClientCredentials, TokenEvent


def report(event: TokenEvent) -> None:
    print(f"  [event] {event.kind}" + (f" ({event.error})" if event.error else ""))


async def work(creds: ClientCredentials, api_url: str | None) -> None:
    async with AsyncTokenClient(creds, on_event=report) as tokens:
        token = await tokens.get_token()
        print(f"got a token: {token!r}")
        if api_url is None:
            print("set M2M_API_URL to call your API with it")
            return
        async with httpx.AsyncClient(auth=BearerAuth(tokens), timeout=10) as http:
            results: list[int] = []

            async def call(i: int) -> None:
                response = await http.get(api_url)
                results.append(response.status_code)

            async with anyio.create_task_group() as tg:  # 20 concurrent calls, one token
                for i in range(20):
                    tg.start_soon(call, i)
            print(f"20 concurrent API calls -> statuses {sorted(set(results))}")
            print(f"token requests made: {tokens.stats.token_requests}")
            if set(results) != {200}:
                raise SystemExit(1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    api_url = os.environ.get("M2M_API_URL")
    if any(os.environ.get(v) for v in ("M2M_TOKEN_URL", "M2M_ISSUER", "AUTH0_DOMAIN")):
        print("using the authorization server from the environment")
        anyio.run(work, ClientCredentials.from_env(), api_url)
        return
    print("no M2M_* settings: starting a local authorization server and API on 127.0.0.1")
    from _local import local_setup  # examples/_local.py, beside this file

    with local_setup() as (creds, local_api):
        print(f"issuer {creds.issuer}, API {local_api}")
        anyio.run(work, creds, local_api)
    print("done")


if __name__ == "__main__":
    main()
