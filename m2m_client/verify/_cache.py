"""The verified-token cache: a token seen again costs a dict lookup, not a signature check."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ._claims import Claims
from ._jwks import KeySet, VerificationKey

__all__ = ["VerifiedTokens"]


class VerifiedTokens:
    """token -> (claims, exp, fingerprint of the key that verified it); oldest evicted first.

    Keyed by the whole token string. An ES256 token has two accepted spellings ((r, s) and
    (r, n - s)), so it may take two entries; both verdicts are right, and normalising the
    key would put a parse on the hot path. A verdict never outlives its key: entries whose
    key left the set are dropped when the set changes (:meth:`prune`).
    """

    __slots__ = ("_entries", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: dict[str, tuple[Claims, float, str]] = {}

    def get(self, token: object, now: float) -> Claims | None:
        """Claims of a cached token still before its ``exp`` (wall clock)."""
        if type(token) is not str:
            return None
        entry = self._entries.get(token)
        if entry is None:
            return None
        if now < entry[1]:
            return entry[0]
        # Past exp (maybe still within leeway): let a full verification decide, so the
        # cache can never change an outcome.
        self._entries.pop(token, None)
        return None

    def remember(
        self,
        token: str,
        claims: Claims,
        key: VerificationKey,
        current: Callable[[], KeySet | None],
    ) -> None:
        """Cache a verdict unless its key has left the set meanwhile.

        Checked after inserting: a refresh that replaces the set and prunes between our
        check and our insert would otherwise leave a verdict of a withdrawn key behind.
        """
        if self.size == 0:
            return
        entries = self._entries
        if len(entries) >= self.size:
            # Another thread may evict concurrently (sync verifier).
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del entries[next(iter(entries))]
        entries[token] = (claims, claims.expires_at, key.fingerprint)
        keys = current()
        if keys is None or key.fingerprint not in keys.fingerprint:
            entries.pop(token, None)

    def prune(self, fingerprints: frozenset[str]) -> int:
        """Drop every entry whose key is not in ``fingerprints``; return how many."""
        stale = [t for t, entry in list(self._entries.items()) if entry[2] not in fingerprints]
        for token in stale:
            self._entries.pop(token, None)
        return len(stale)

    def clear(self) -> None:
        self._entries = {}

    def __len__(self) -> int:
        return len(self._entries)
