"""The shared cache on a real 3-node Redis Cluster (``redis-server --cluster-enabled yes``).

Every pipeline and Lua script of the cache names keys of one cache key only, and those carry
one hash tag (``m2m:{...}:token`` / ``:lease`` / ``:error``), so each lands in one slot: a
CROSSSLOT error would show here as a Redis error (and the test counts them). Several cache
keys spread over the three nodes; each is fetched once for three "processes" (caches with
their own cluster clients), the others waiting for the holder's wake-up.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

from m2m_client import AccessToken, RefreshPolicy
from m2m_client._token import CacheKey
from m2m_client.cache import AsyncRedisTokenCache, RedisTokenCache
from m2m_client.cache._codec import Codec
from tests.conftest import REDIS_INSTALL, require
from tests.redis.conftest import _free_port, server_binary

KEY = "cluster-test-key-" + "q" * 20
POLICY = RefreshPolicy()
OPTIONS: dict[str, Any] = {
    "encryption_key": KEY,
    "lease_seconds": 10.0,  # a holder that vanished is not what this tests
    "poll_interval": 5.0,  # so a waiter that returns in time was woken by the PUBLISH
    "operation_timeout": 2.0,  # a busy CI machine is not a Redis outage
}


class Cluster:
    """Three master nodes on 127.0.0.1, all 16384 slots assigned, no replicas."""

    def __init__(self, server: str, cli: str) -> None:
        self.workdir = tempfile.mkdtemp(prefix="m2m-cluster-")
        self.ports = [_free_port() for _ in range(3)]
        self.bus_ports = [_free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []
        self.server, self.cli = server, cli

    def start(self) -> None:
        for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
            # The bus port is given: port + 10000 (the default) may be past 65535 or taken.
            self.processes.append(
                subprocess.Popen(
                    [
                        self.server,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        str(bus_port),
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        "2000",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        self.workdir,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            self._wait(port, lambda r: r.ping())
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            timeout=20,
        )
        for port in self.ports:
            self._wait(port, lambda r: r.cluster("info")["cluster_state"] == "ok")

    @staticmethod
    def _wait(port: int, ready: Any) -> None:
        deadline = time.monotonic() + 10
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as r:
            while time.monotonic() < deadline:
                try:
                    if ready(r):
                        return
                except redis.RedisError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"cluster node on port {port} not ready")

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.ports[0], socket_timeout=2)

    def async_client(self) -> redis.asyncio.cluster.RedisCluster:
        return redis.asyncio.cluster.RedisCluster(
            host="127.0.0.1", port=self.ports[0], socket_timeout=2
        )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    server, cli = server_binary(), shutil.which("redis-cli") or shutil.which("valkey-cli")
    require(
        server is not None and cli is not None,
        f"redis-server and redis-cli are not on PATH; {REDIS_INSTALL}",
    )
    assert server is not None
    assert cli is not None
    running = Cluster(server, cli)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def cache_keys(n: int) -> list[CacheKey]:
    salt = random.random()
    return [
        CacheKey("https://issuer.test/t", "cluster-client", f"api-{i}-{salt}", None, ())
        for i in range(n)
    ]


def make_token() -> AccessToken:
    return POLICY.make_token(
        access_token=f"token-{random.random()}",
        token_type="Bearer",
        expires_in=60,
        scope=None,
        sent_at=time.time(),
        rng=random.Random(),
    )


def test_the_entries_of_one_cache_key_share_one_slot_and_keys_spread_over_the_nodes(
    cluster: Cluster,
) -> None:
    codec, client = Codec("m2m", KEY), cluster.client()
    nodes = set()
    try:
        for key in cache_keys(40):
            n = codec.names(key)
            slots = {client.keyslot(name) for name in (n.token, n.lease, n.negative, n.channel)}
            assert len(slots) == 1
            nodes.add(client.get_node_from_key(n.token).name)
    finally:
        client.close()
    assert len(nodes) == 3  # 40 keys: all three nodes hold some (a miss is 3 * (2/3)^40)


def test_sync_caches_fetch_once_per_key_for_the_fleet_on_a_cluster(cluster: Cluster) -> None:
    clients = [cluster.client() for _ in range(3)]
    caches = [RedisTokenCache(client, **OPTIONS) for client in clients]
    fetches: list[CacheKey] = []

    def fetcher(key: CacheKey) -> Any:
        def fetch() -> AccessToken:
            fetches.append(key)
            time.sleep(0.3)  # long enough for the others to find the lease taken and wait
            return make_token()

        return fetch

    keys = cache_keys(6)
    got: dict[CacheKey, set[str]] = {key: set() for key in keys}

    def process(cache: RedisTokenCache, key: CacheKey) -> None:
        token = cache.obtain(key, fetcher(key), policy=POLICY, stale=None)
        got[key].add(token.access_token)

    threads = [threading.Thread(target=process, args=(c, k)) for k in keys for c in caches]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert time.monotonic() - began < 4  # woken by the PUBLISH, not the 5 s poll
    assert sorted(map(str, fetches)) == sorted(map(str, keys))  # one fetch per key
    assert all(len(tokens) == 1 for tokens in got.values())
    assert sum(c.stats.waits_woken for c in caches) >= len(keys)
    assert sum(c.stats.redis_errors for c in caches) == 0

    # A 401: the entry holding that token goes, for every process.
    key = keys[0]
    token = caches[0].obtain(key, fetcher(key), policy=POLICY, stale=None)
    caches[0].invalidate(key, token)
    again = caches[1].obtain(key, fetcher(key), policy=POLICY, stale=None)
    assert again.access_token != token.access_token
    assert sum(c.stats.redis_errors for c in caches) == 0
    for cache, client in zip(caches, clients, strict=True):
        cache.close()
        client.close()


@pytest.mark.anyio
async def test_async_caches_fetch_once_per_key_for_the_fleet_on_a_cluster(
    cluster: Cluster, anyio_backend: str
) -> None:
    # redis.asyncio runs on asyncio only: under trio, a sync cluster client (worker threads).
    clients: list[Any] = [
        cluster.async_client() if anyio_backend == "asyncio" else cluster.client() for _ in range(3)
    ]
    caches = [AsyncRedisTokenCache(client, **OPTIONS) for client in clients]
    fetches: list[CacheKey] = []

    def fetcher(key: CacheKey) -> Any:
        async def fetch() -> AccessToken:
            fetches.append(key)
            await anyio.sleep(0.3)
            return make_token()

        return fetch

    keys = cache_keys(6)
    got: dict[CacheKey, set[str]] = {key: set() for key in keys}

    async def process(cache: AsyncRedisTokenCache, key: CacheKey) -> None:
        token = await cache.obtain(key, fetcher(key), policy=POLICY, stale=None)
        got[key].add(token.access_token)

    try:
        with anyio.fail_after(4):  # woken by the PUBLISH, not the 5 s poll
            async with anyio.create_task_group() as tg:
                for key in keys:
                    for cache in caches:
                        tg.start_soon(process, cache, key)
        assert sorted(map(str, fetches)) == sorted(map(str, keys))
        assert all(len(tokens) == 1 for tokens in got.values())
        assert sum(c.stats.waits_woken for c in caches) >= len(keys)

        key = keys[0]
        token = await caches[0].obtain(key, fetcher(key), policy=POLICY, stale=None)
        await caches[0].invalidate(key, token)
        again = await caches[1].obtain(key, fetcher(key), policy=POLICY, stale=None)
        assert again.access_token != token.access_token
        assert sum(c.stats.redis_errors for c in caches) == 0
    finally:
        for cache, client in zip(caches, clients, strict=True):
            await cache.aclose()
            if anyio_backend == "asyncio":
                await client.aclose()
            else:
                client.close()
