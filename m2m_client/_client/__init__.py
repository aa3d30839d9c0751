"""The token clients: a policy core with no I/O, and a sync and an async shell around it.

* ``_core``: which token a caller gets and who fetches (typed decisions), negative cache;
* ``_exchanges``: the discovery and token requests a fetch makes, and their retries;
* ``_shell``: construction, invalidation and fork handling shared by both clients;
* ``_sync`` / ``_async``: :class:`TokenClient` (threads) and :class:`AsyncTokenClient` (anyio).

Single flight itself lives in :mod:`m2m_client._singleflight`.
"""

from ._async import AsyncTokenClient
from ._decisions import TokenClientStats, TokenEvent, TokenSummary
from ._sync import TokenClient

__all__ = ["AsyncTokenClient", "TokenClient", "TokenClientStats", "TokenEvent", "TokenSummary"]
