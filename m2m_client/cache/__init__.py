"""Token caches: the in-process :class:`TokenCache`, and a level shared by a whole fleet.

:class:`RedisTokenCache` / :class:`AsyncRedisTokenCache` (extra ``m2m-client[redis]``) share
tokens between processes through Redis or Valkey, with one token request per cache key per
token lifetime for the whole fleet::

    shared = AsyncRedisTokenCache(redis.asyncio.Redis.from_url("redis://cache:6379/0"),
                                  encryption_key=os.environ["M2M_CACHE_KEY"])

Importing this module never needs redis-py; constructing a Redis cache without it raises
:class:`~m2m_client.errors.ConfigurationError`.
"""

from __future__ import annotations

from m2m_client._token import InMemoryTokenCache, TokenCache

from ._ledger import SharedCacheStats
from ._redis import AsyncRedisTokenCache, RedisTokenCache
from ._replay import RedisReplayCache

__all__ = [
    "AsyncRedisTokenCache",
    "InMemoryTokenCache",
    "RedisReplayCache",
    "RedisTokenCache",
    "SharedCacheStats",
    "TokenCache",
]
