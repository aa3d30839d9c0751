"""The token clients: sans-IO decisions, and a sync and an async shell that carry them out.

* ``_decisions``: the state both clients share (cache, flights, failure memory) and every
  decision on it: which token a caller gets and who fetches (:class:`Decision`), what a
  flight's outcome changes, what a 401 does (``Renewals``);
* ``_events``: what a client reports (``on_event``, OpenTelemetry, counters);
* ``_exchanges``: the discovery and token requests a fetch makes, and their retries;
* ``_fetch``: those requests sent with blocking I/O or anyio;
* ``_shell``: construction, the warm path, invalidation, fork handling, and the seam auths
  use (``_AuthSeam``), shared by both clients;
* ``_sync`` / ``_async``: :class:`TokenClient` (threads) and :class:`AsyncTokenClient` (anyio),
  which differ only in how they wait and where background work runs.

Single flight itself lives in :mod:`m2m_client._singleflight`.
"""

from ._async import AsyncTokenClient
from ._events import TokenClientStats, TokenEvent, TokenSummary
from ._sync import TokenClient

__all__ = ["AsyncTokenClient", "TokenClient", "TokenClientStats", "TokenEvent", "TokenSummary"]
