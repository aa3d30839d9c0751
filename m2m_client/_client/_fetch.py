"""What a fetch does on the network: discovery (once, for every cache key), then the token
request, each retried within the fetch's one :class:`Budget`. One fetcher per shell kind."""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NoReturn, TypeVar

import anyio
import tenacity

from m2m_client._discovery import MAX_METADATA_BYTES, Discovery
from m2m_client._http import AsyncDriver, Call, SyncDriver, async_driver, sync_driver
from m2m_client._loops import LoopRef, current_loop
from m2m_client._stacks import AsyncHttpClient, SyncHttpClient
from m2m_client._token import AccessToken, CacheKey
from m2m_client.errors import ConfigurationError, DiscoveryError, TokenEndpointUnavailable

from ._decisions import Budget, _ClientCore
from ._exchanges import Retried, discovery_flow, retry_kwargs, token_exchange

__all__ = ["AsyncFetcher", "SyncFetcher"]


logger = logging.getLogger("m2m_client")
T = TypeVar("T")
_DISCOVERY_WAIT = "gave up waiting for the discovery in progress"
# Discovery is one flow (_exchanges.discovery_flow) run by the driver pair; its steps are
# Calls, each a retried metadata request, and each fetcher fills only its driver's side.


async def _sync_only() -> NoReturn:
    raise AssertionError("a SyncFetcher's step run by the async driver")


def _async_only() -> NoReturn:
    raise AssertionError("an AsyncFetcher's step run by the sync driver")


class _Fetcher:
    """State both fetchers share: the token URL once known, the driver, the discovery."""

    def __init__(self, core: _ClientCore, discovery: Discovery | None) -> None:
        self.core, self.discovery = core, discovery
        self.token_url = core.credentials.token_url
        self.timeout = core.credentials.timeout

    def discovered(self, token_url: str) -> str:
        self.token_url = token_url
        logger.info("discovered token endpoint %s", token_url)
        self.core.emit("discovery_completed")
        return token_url


class SyncFetcher(_Fetcher):
    """Runs a flight's requests with blocking I/O (:class:`SyncDriver`)."""

    def __init__(
        self,
        core: _ClientCore,
        discovery: Discovery | None,
        http_client: SyncHttpClient | None,
        sleep: Callable[[float], None],
    ) -> None:
        super().__init__(core, discovery)
        self.http_client, self.sleep = http_client, sleep
        self.driver: SyncDriver | None = self._open()  # checks http_client now
        self.discovery_lock = threading.Lock()

    def after_fork(self) -> None:
        self.driver, self.discovery_lock = None, threading.Lock()

    def close(self) -> None:
        driver, self.driver = self.driver, None
        if driver is not None:
            driver.close()

    def fetch(self, key: CacheKey, budget: Budget) -> AccessToken:
        token_url = self.token_url
        if token_url is None:
            if not self.discovery_lock.acquire(timeout=budget.remaining()):
                raise TokenEndpointUnavailable(_DISCOVERY_WAIT)
            try:  # one discovery for every cache key
                token_url = self.token_url or self.discovered(self._discover(key, budget))
            finally:
                self.discovery_lock.release()
        return self._exchange(key, token_exchange(self.core, key, token_url), budget)

    def _discover(self, key: CacheKey, budget: Budget) -> str:
        assert self.discovery is not None
        run = partial(self._exchange, key, budget=budget)
        flow = discovery_flow(self.discovery, lambda step: Call(partial(run, step), _sync_only))
        driver = self.driver or self._open()
        return driver.run(flow, limit=MAX_METADATA_BYTES, refuse=DiscoveryError)

    def _exchange(self, key: CacheKey, step: Retried[T], budget: Budget) -> T:
        kwargs = retry_kwargs(self.core, key, step, budget.started)
        result: T = tenacity.Retrying(sleep=self.sleep, **kwargs)(self._attempt, step, budget)
        return result

    def _attempt(self, step: Retried[T], budget: Budget) -> T:
        driver = self.driver or self._open()
        return driver.run(step.attempt(), deadline=budget.deadline, **step.limits)

    def _open(self) -> SyncDriver:
        self.core.check_open("TokenClient")
        self.driver = sync_driver(self.http_client, timeout=self.timeout, owner="TokenClient")
        return self.driver


class AsyncFetcher(_Fetcher):
    """Runs a flight's requests with anyio (:class:`AsyncDriver`).

    Without a caller's ``http_client``, each flight opens its own HTTP client in the loop
    that runs it and closes it at the end (discovery, the token request and retries still
    share its connections): a pool never outlives its event loop, so one token client serves
    ``asyncio.run()`` after ``asyncio.run()``, trio after asyncio, and threads with a loop
    each. A caller's client belongs to the first loop that uses it (:meth:`check_loop`).
    """

    def __init__(
        self,
        core: _ClientCore,
        discovery: Discovery | None,
        http_client: AsyncHttpClient | None,
        sleep: Callable[[float], Awaitable[Any]],
    ) -> None:
        super().__init__(core, discovery)
        self.http_client, self.sleep = http_client, sleep
        self.driver: AsyncDriver | None = self._open()  # checks http_client now
        if http_client is None:
            self.driver = None  # made per flight (see the class docstring)
        self.client_loop = LoopRef(None)  # the loop the caller's http_client belongs to
        self.discovery_lock: anyio.Lock | None = None  # made in the loop that needs it
        self.discovery_lock_loop = LoopRef(None)

    def after_fork(self) -> None:
        self.driver, self.discovery_lock = None, None

    async def aclose(self) -> None:
        driver, self.driver = self.driver, None
        if driver is not None:
            await driver.aclose()

    def check_loop(self) -> None:
        """Refuse a token request from a loop other than the one the caller's
        ``http_client`` was first used in (its connections and locks belong to that loop)."""
        if self.http_client is None:
            return
        loop = current_loop()
        bound = self.client_loop.get()
        if bound is None:
            self.client_loop = LoopRef(loop)
        elif bound is not loop:
            raise ConfigurationError(
                "this AsyncTokenClient's http_client belongs to the event loop it was first "
                "used in, and a token was asked for from another event loop (another thread, "
                "another asyncio.run() or trio.run()); create the AsyncTokenClient without "
                "http_client (it then connects from the loop that asks), or one per loop"
            )

    async def fetch(self, key: CacheKey, budget: Budget) -> AccessToken:
        self.core.check_open("AsyncTokenClient")
        driver = self.driver or self._open()
        try:
            return await self._fetch(driver, key, budget)
        finally:
            if driver is not self.driver:  # this flight's own client
                with anyio.CancelScope(shield=True):
                    await driver.aclose()

    async def _fetch(self, driver: AsyncDriver, key: CacheKey, budget: Budget) -> AccessToken:
        token_url = self.token_url
        if token_url is None:
            lock = self._discovery_lock()
            with anyio.move_on_after(budget.remaining()) as waited:
                await lock.acquire()
            if waited.cancelled_caught:
                raise TokenEndpointUnavailable(_DISCOVERY_WAIT)
            try:  # one discovery for every cache key
                token_url = self.token_url or self.discovered(
                    await self._discover(driver, key, budget)
                )
            finally:
                lock.release()
        step = token_exchange(self.core, key, token_url)
        return await self._exchange(driver, key, step, budget)

    def _discovery_lock(self) -> anyio.Lock:
        # An anyio lock belongs to one loop: another loop gets its own (two loops may then
        # discover at once; the endpoint is cached after the first).
        if self.discovery_lock is None or not self.discovery_lock_loop.is_current():
            self.discovery_lock = anyio.Lock()
            self.discovery_lock_loop = LoopRef(current_loop())
        return self.discovery_lock

    async def _discover(self, driver: AsyncDriver, key: CacheKey, budget: Budget) -> str:
        assert self.discovery is not None
        run = partial(self._exchange, driver, key, budget=budget)
        flow = discovery_flow(self.discovery, lambda step: Call(_async_only, partial(run, step)))
        return await driver.run(flow, limit=MAX_METADATA_BYTES, refuse=DiscoveryError)

    async def _exchange(
        self, driver: AsyncDriver, key: CacheKey, step: Retried[T], budget: Budget
    ) -> T:
        kwargs = retry_kwargs(self.core, key, step, budget.started)
        retrying = tenacity.AsyncRetrying(sleep=self.sleep, **kwargs)
        result: T = await retrying(self._attempt, driver, step, budget)
        return result

    async def _attempt(self, driver: AsyncDriver, step: Retried[T], budget: Budget) -> T:
        return await driver.run(step.attempt(), deadline=budget.deadline, **step.limits)

    def _open(self) -> AsyncDriver:
        self.core.check_open("AsyncTokenClient")
        driver = async_driver(self.http_client, timeout=self.timeout, owner="AsyncTokenClient")
        if self.http_client is not None:
            self.driver = driver
        return driver
