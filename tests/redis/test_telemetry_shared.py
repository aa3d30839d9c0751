"""OpenTelemetry with a real shared cache: shared hits, the cache's operations, its breaker."""

from __future__ import annotations

import redis

from m2m_client import ClientCredentials, TokenClient
from m2m_client.cache import RedisTokenCache
from m2m_client.testing import LocalIssuer
from tests.redis.conftest import CLIENT_ID, RedisServer
from tests.unit.test_telemetry import Otel

KEY = "telemetry-shared-key-" + "q" * 24


def test_a_second_process_records_a_shared_hit_and_a_dead_redis_opens_the_breaker(
    redis_server: RedisServer, issuer: LocalIssuer
) -> None:
    otel = Otel()
    creds = ClientCredentials(
        token_url=issuer.token_url,
        client_id=CLIENT_ID,
        client_secret=issuer.client_secret(CLIENT_ID),
        audience=issuer.audience,
    )

    def shared() -> RedisTokenCache:
        connection = redis.Redis.from_url(redis_server.url, socket_timeout=2)
        return RedisTokenCache(connection, encryption_key=KEY, breaker_reset_seconds=60)

    with (
        TokenClient(creds, shared_cache=shared(), **otel.providers) as one,
        TokenClient(creds, shared_cache=shared(), **otel.providers) as two,
    ):
        token = one.get_token()
        assert two.get_token().access_token == token.access_token  # as another process would
        redis_server.stop()
        for _ in range(3):  # Redis is gone: each fetches for itself, the breaker opens
            two.get_token(force_refresh=True)
    acquired = "m2m_client.token.acquisition.duration"
    assert otel.total(acquired, m2m_client_outcome="fetched") == 4
    assert otel.total(acquired, m2m_client_outcome="shared_hit") == 1
    ops = "m2m_client.shared_cache.operations"
    assert otel.total(ops, m2m_client_operation="leases_won") == 1
    assert otel.total(ops, m2m_client_operation="shared_hits") == 1
    assert otel.total(ops, m2m_client_operation="redis_errors") >= 2
    assert otel.total(ops, m2m_client_operation="breaker_opened") == 1
    assert otel.total("m2m_client.shared_cache.breaker.open") == 1
    assert otel.total("m2m_client.token_endpoint.requests", m2m_client_outcome="ok") == 4
