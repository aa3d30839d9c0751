"""Load: many threads / tasks across two token expiries, against a real loopback token endpoint.

The wall clock is fake and moved between phases (so two expiries pass in seconds); the HTTP,
the threads and the tasks are real. Phases: cold cache, first token expired, fresh again, in
refresh-ahead, fresh again. Expected: no error, exactly one token request per token lifetime
(1 + 2), nothing left behind (no flight, no negative entry), and memory that does not grow
with the number of calls. The chaos variants add random API 401s and ``force_refresh``.
"""

from __future__ import annotations

import random
import threading
import time
import tracemalloc
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from m2m_client import AccessToken, AsyncTokenClient, ClientCredentials, TokenClient
from tests.unit._calling import NOW, loopback_token_endpoint

THREADS, CALLS_PER_THREAD = 64, 500
TASKS, CALLS_PER_TASK = 2_000, 10
PHASES = 5
MEMORY_BOUND = 2 * 1024 * 1024  # growth over a whole run, bytes


class PhaseClock:
    """Wall time set by the test between phases, from the cached token's own schedule."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now

    def enter(self, phase: int, token: AccessToken | None) -> None:
        if token is None:
            return
        if phase == 1:
            self.now = token.usable_until + 1  # expired: every caller waits for one flight
        elif phase == 3:
            self.now = token.refresh_at + 0.5  # refresh-ahead: one background refresh
        else:
            self.now = token.issued_at + 1  # fresh


class Chaos:
    """Random API 401s (what BearerAuth reports) and force_refresh calls, counted."""

    def __init__(self, enabled: bool, seed: int) -> None:
        self.enabled = enabled
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.forced = 0
        self.rejections = 0
        self.dropped = 0

    def event(self, event: Any) -> None:
        if event.kind == "token_invalidated":
            with self.lock:
                self.dropped += 1

    def roll(self) -> tuple[bool, bool]:
        if not self.enabled:
            return False, False
        with self.lock:
            force = self.rng.random() < 0.0005
            reject = self.rng.random() < 0.01
            self.forced += force
            self.rejections += reject
            return force, reject


def _run_threads(tokens: TokenClient, clock: PhaseClock, chaos: Chaos) -> list[BaseException]:
    errors: list[BaseException] = []
    key = tokens._core.default_key

    def phase_change() -> None:
        phase_change.phase += 1  # type: ignore[attr-defined]
        clock.enter(phase_change.phase, tokens._core.cache_get(key))  # type: ignore[attr-defined]

    phase_change.phase = 0  # type: ignore[attr-defined]
    barrier = threading.Barrier(THREADS, action=phase_change)

    def worker() -> None:
        try:
            for i in range(CALLS_PER_THREAD):
                if i and i % (CALLS_PER_THREAD // PHASES) == 0:
                    barrier.wait(30)
                force, reject = chaos.roll()
                token = tokens.get_token(force_refresh=force)
                if reject:
                    tokens.token_refused(key, token)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


def _settle(tokens: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while len(tokens._core.flights) and time.monotonic() < deadline:
        time.sleep(0.01)


def _check(tokens: Any, chaos: Chaos, errors: list[BaseException], grown: int) -> None:
    print(  # shown with -s: the figures docs/reliability.md quotes
        f"token requests {tokens.stats.token_requests}, 401s {chaos.rejections}, "
        f"drops {chaos.dropped}, forced {chaos.forced}, memory growth {grown / 1024:.0f} KiB"
    )
    assert errors == []
    stats = tokens.stats
    assert stats.fetch_failures == stats.refresh_failures == 0
    assert stats.token_requests == stats.tokens_fetched
    if not chaos.enabled:
        assert stats.token_requests == 3  # one per token lifetime: cold, expiry, refresh
    else:
        # 401-driven renewals are rate-limited (one per key per 5 s): a handful at most.
        assert chaos.dropped <= 10 < chaos.rejections
        assert 3 <= stats.token_requests <= 3 + chaos.forced + chaos.dropped
    assert len(tokens._core.flights) == 0
    assert tokens._core.failures.negative == {}
    assert grown < MEMORY_BOUND


def _credentials(url: str) -> ClientCredentials:
    return ClientCredentials(token_url=url, client_id="load", client_secret="load-secret")


@pytest.mark.parametrize("chaos", [False, True], ids=["plain", "chaos"])
def test_64_threads_x_500_calls_across_two_expiries(chaos: bool) -> None:
    clock, noise = PhaseClock(), Chaos(chaos, seed=8)
    with (
        loopback_token_endpoint() as url,
        TokenClient(_credentials(url), clock=clock, on_event=noise.event) as tokens,
    ):
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        errors = _run_threads(tokens, clock, noise)
        _settle(tokens)
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        _check(tokens, noise, errors, grown)


@pytest.mark.anyio
@pytest.mark.parametrize("chaos", [False, True], ids=["plain", "chaos"])
async def test_2000_tasks_across_two_expiries(chaos: bool) -> None:
    clock, noise = PhaseClock(), Chaos(chaos, seed=13)
    errors: list[BaseException] = []
    with loopback_token_endpoint() as url:
        async with AsyncTokenClient(_credentials(url), clock=clock, on_event=noise.event) as tokens:
            key = tokens._core.default_key

            async def worker(calls: int) -> None:
                try:
                    for _ in range(calls):
                        force, reject = noise.roll()
                        token = await tokens.get_token(force_refresh=force)
                        if reject:
                            await tokens.token_refused(key, token)
                        await anyio.lowlevel.checkpoint()
                except Exception as exc:
                    errors.append(exc)

            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for phase in range(PHASES):
                clock.enter(phase, tokens._core.cache_get(key))
                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        for _ in range(TASKS):
                            tg.start_soon(worker, CALLS_PER_TASK // PHASES)
                flight = tokens._core.flights.get(key)
                if flight is not None:  # let a background refresh land
                    with anyio.fail_after(10):
                        await flight.done.wait()
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            _check(tokens, noise, errors, grown)
