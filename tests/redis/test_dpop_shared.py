"""DPoP tokens in the shared (Redis) cache: clients holding the same key share one bound token;
clients holding different keys never take each other's (the cache key names the thumbprint)."""

from __future__ import annotations

import jwt
import redis

from m2m_client import ClientCredentials, DPoPKey, TokenClient
from m2m_client.cache import RedisTokenCache
from m2m_client.testing import LocalIssuer
from tests.redis._fleet import Fleet
from tests.redis.test_client_integration import KEY, fleet

__all__ = ["fleet"]


def creds(fleet: Fleet, dpop: DPoPKey) -> ClientCredentials:
    return ClientCredentials(
        token_url=fleet.token_url,
        client_id=fleet.client_id,
        client_secret=fleet.client_secret,
        audience=fleet.audience,
        scope="read:data",
        dpop=dpop,
    )


def shared(fleet: Fleet) -> RedisTokenCache:
    return RedisTokenCache(redis.Redis.from_url(fleet.redis_url), encryption_key=KEY)


def jkt(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["cnf"]["jkt"])


def test_one_key_one_shared_token_another_key_its_own(fleet: Fleet, issuer: LocalIssuer) -> None:
    issuer.reset_counters()
    pem = DPoPKey.generate().private_key_pem()
    key_a, key_a_again, key_b = DPoPKey.from_pem(pem), DPoPKey.from_pem(pem), DPoPKey.generate()
    with (
        TokenClient(creds(fleet, key_a), shared_cache=shared(fleet)) as one,
        TokenClient(creds(fleet, key_a_again), shared_cache=shared(fleet)) as two,
        TokenClient(creds(fleet, key_b), shared_cache=shared(fleet)) as three,
    ):
        first, second, third = one.get_token(), two.get_token(), three.get_token()
    assert first.token_type == second.token_type == third.token_type == "DPoP"
    assert second.access_token == first.access_token  # same key: shared through Redis
    assert second.authorization == f"DPoP {first.access_token}"
    assert third.access_token != first.access_token  # another key: never the bound token
    assert jkt(first.access_token) == key_a.thumbprint
    assert jkt(third.access_token) == key_b.thumbprint
    assert issuer.token_requests == 2
