"""The seam between a token client and a fleet-shared second cache level (Redis / Valkey).

The in-process cache stays the hot path. Only the one in-process flight owner talks to the
shared level, through :meth:`SharedTokenCache.obtain`: it returns a token another process
already fetched, or runs ``fetch`` itself while holding the fleet-wide lease.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from ._token import AccessToken, CacheKey, RefreshPolicy

__all__ = ["AsyncSharedTokenCache", "SharedTokenCache"]


@runtime_checkable
class SharedTokenCache(Protocol):
    """A second cache level shared by many processes (used by :class:`TokenClient`)."""

    def obtain(
        self,
        key: CacheKey,
        fetch: Callable[[], AccessToken],
        *,
        policy: RefreshPolicy,
        stale: AccessToken | None,
    ) -> AccessToken:
        """A token for ``key`` that is not yet due for refresh, fetched once for the fleet.

        ``stale`` is a token the caller will not take (refresh-ahead, ``force_refresh``, or
        one that got a 401): a shared entry holding the same token counts as a miss.
        ``policy`` rebuilds refresh points from the entry's remaining lifetime.
        Errors of ``fetch`` propagate; failures of the shared store never do (the caller
        then fetches for itself).
        """
        ...

    def invalidate(self, key: CacheKey, token: AccessToken) -> None:
        """Delete the shared entry if it still holds ``token`` (after a 401)."""
        ...


@runtime_checkable
class AsyncSharedTokenCache(Protocol):
    """The async twin of :class:`SharedTokenCache` (used by :class:`AsyncTokenClient`)."""

    async def obtain(
        self,
        key: CacheKey,
        fetch: Callable[[], Awaitable[AccessToken]],
        *,
        policy: RefreshPolicy,
        stale: AccessToken | None,
    ) -> AccessToken:
        """See :meth:`SharedTokenCache.obtain`."""
        ...

    async def invalidate(self, key: CacheKey, token: AccessToken) -> None:
        """See :meth:`SharedTokenCache.invalidate`."""
        ...
