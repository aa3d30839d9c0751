"""What a fetch does on the network: discovery (once, for every cache key), then the token
request, each retried within the fetch's one :class:`Budget`. One fetcher per shell kind."""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import tenacity

from m2m_client._discovery import Discovery
from m2m_client._http import AsyncDriver, SyncDriver, async_driver, sync_driver
from m2m_client._oauth import is_invalid_client
from m2m_client._stacks import AsyncHttpClient, SyncHttpClient
from m2m_client._token import AccessToken, CacheKey
from m2m_client.errors import M2MError, TokenEndpointUnavailable

from ._core import Budget, _ClientCore
from ._exchanges import Exchange, discovery_steps, retry_kwargs, token_exchange

__all__ = ["AsyncFetcher", "SyncFetcher"]


def _log_reread() -> None:
    logger.info("token endpoint answered invalid_client; the credential changed: sending again")


logger = logging.getLogger("m2m_client")
T = TypeVar("T")
_DISCOVERY_WAIT = "gave up waiting for the discovery in progress"


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
        steps, answer = discovery_steps(self.discovery), None
        try:
            while True:
                step = steps.send(answer)
                try:
                    answer = self._exchange(key, step, budget)
                except M2MError as exc:
                    answer = exc  # type: ignore[assignment]
        except StopIteration as done:
            return str(done.value)

    def _exchange(self, key: CacheKey, step: Exchange[T], budget: Budget) -> T:
        kwargs = retry_kwargs(self.core, key, step, budget.started)
        result: T = tenacity.Retrying(sleep=self.sleep, **kwargs)(self._attempt, step, budget)
        return result

    def _attempt(self, step: Exchange[T], budget: Budget) -> T:
        driver, sent_at = self.driver or self._open(), self.core.clock()
        if step.prepare is not None:
            step.prepare(sent_at, False)
        answer = driver.send(step.build(sent_at), deadline=budget.deadline, **step.limits)
        if step.again is not None and step.again(answer):  # once: a DPoP nonce challenge
            sent_at = self.core.clock()
            answer = driver.send(step.build(sent_at), deadline=budget.deadline, **step.limits)
            step.again(answer)
        if (
            step.prepare is not None
            and is_invalid_client(answer.status, answer.body)
            and step.prepare(self.core.clock(), True)  # once: a credential rotated unseen
        ):
            _log_reread()
            sent_at = self.core.clock()
            answer = driver.send(step.build(sent_at), deadline=budget.deadline, **step.limits)
        return step.interpret(answer, sent_at)

    def _open(self) -> SyncDriver:
        self.core.check_open("TokenClient")
        self.driver = sync_driver(self.http_client, timeout=self.timeout, owner="TokenClient")
        return self.driver


class AsyncFetcher(_Fetcher):
    """Runs a flight's requests with anyio (:class:`AsyncDriver`)."""

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
        self.discovery_lock: anyio.Lock | None = None  # made in the loop that needs it

    def after_fork(self) -> None:
        self.driver, self.discovery_lock = None, None

    async def aclose(self) -> None:
        driver, self.driver = self.driver, None
        if driver is not None:
            await driver.aclose()

    async def fetch(self, key: CacheKey, budget: Budget) -> AccessToken:
        token_url = self.token_url
        if token_url is None:
            self.discovery_lock = lock = self.discovery_lock or anyio.Lock()
            with anyio.move_on_after(budget.remaining()) as waited:
                await lock.acquire()
            if waited.cancelled_caught:
                raise TokenEndpointUnavailable(_DISCOVERY_WAIT)
            try:  # one discovery for every cache key
                token_url = self.token_url or self.discovered(await self._discover(key, budget))
            finally:
                lock.release()
        step = token_exchange(self.core, key, token_url)
        return await self._exchange(key, step, budget)

    async def _discover(self, key: CacheKey, budget: Budget) -> str:
        assert self.discovery is not None
        steps, answer = discovery_steps(self.discovery), None
        try:
            while True:
                step = steps.send(answer)
                try:
                    answer = await self._exchange(key, step, budget)
                except M2MError as exc:
                    answer = exc  # type: ignore[assignment]
        except StopIteration as done:
            return str(done.value)

    async def _exchange(self, key: CacheKey, step: Exchange[T], budget: Budget) -> T:
        kwargs = retry_kwargs(self.core, key, step, budget.started)
        retrying = tenacity.AsyncRetrying(sleep=self.sleep, **kwargs)
        result: T = await retrying(self._attempt, step, budget)
        return result

    async def _attempt(self, step: Exchange[T], budget: Budget) -> T:
        driver, sent_at = self.driver or self._open(), self.core.clock()
        if step.aprepare is not None:
            await step.aprepare(sent_at, False)
        answer = await driver.send(step.build(sent_at), deadline=budget.deadline, **step.limits)
        if step.again is not None and step.again(answer):  # once: a DPoP nonce challenge
            sent_at = self.core.clock()
            answer = await driver.send(step.build(sent_at), deadline=budget.deadline, **step.limits)
            step.again(answer)
        if (
            step.aprepare is not None
            and is_invalid_client(answer.status, answer.body)
            and await step.aprepare(self.core.clock(), True)  # once: rotated unseen
        ):
            _log_reread()
            sent_at = self.core.clock()
            answer = await driver.send(step.build(sent_at), deadline=budget.deadline, **step.limits)
        return step.interpret(answer, sent_at)

    def _open(self) -> AsyncDriver:
        self.core.check_open("AsyncTokenClient")
        self.driver = async_driver(self.http_client, timeout=self.timeout, owner="AsyncTokenClient")
        return self.driver
