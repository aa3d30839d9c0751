"""What a token endpoint says about its rate limit, read defensively. Pure: no I/O, no clock.

Read beside ``Retry-After`` (RFC 9110 §10.2.3) on a 429 or 503 answer:

* IETF ``RateLimit`` / ``RateLimit-Policy`` (draft-ietf-httpapi-ratelimit-headers, -08 on):
  structured-field lists (RFC 9651), e.g. ``RateLimit: "default";r=0;t=30`` and
  ``RateLimit-Policy: "default";q=100;w=60`` (``r`` remaining, ``t`` seconds to reset,
  ``q`` quota, ``w`` window). The earlier drafts' forms are tolerated: the dictionary
  ``RateLimit: limit=100, remaining=0, reset=30`` and the separate ``RateLimit-Limit`` /
  ``RateLimit-Remaining`` / ``RateLimit-Reset`` fields (seconds).
* Auth0 ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` and Okta ``X-Rate-Limit-*``:
  ``Reset`` is a Unix time in seconds (a value below 10**9 is taken as seconds from now,
  as some servers send).

``Retry-After`` wins over a reset time (the drafts say so: it is the answer to this
request); a reset time is used only when no ``Retry-After`` is given. With several quotas,
the wait is the longest reset among the exhausted ones (``r=0``). Anything malformed,
negative, non-ASCII or beyond :data:`MAX_WAIT` is ignored, never trusted and never raised.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ._retry import parse_retry_after

__all__ = ["MAX_WAIT", "RateLimit", "read_rate_limit"]

MAX_WAIT = 366 * 24 * 3600.0
"""A reset further away than this (a year) is garbage, not a wait."""
_EPOCH_FLOOR = 1_000_000_000  # 2001-09-09: a smaller Reset is seconds from now
_MAX_FIELD = 1024  # a header longer than this is not parsed (a huge field costs nothing)
_NUMBER = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,6})?", re.ASCII)
_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]{0,63}", re.ASCII)
_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]{0,127}", re.ASCII)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """What a token endpoint's answer said about its rate limit (each part optional).

    ``retry_after`` and ``reset`` are seconds from when the answer was read; ``wait`` is the
    one the client honours. ``sources`` names the header fields that were read.
    """

    retry_after: float | None = None
    reset: float | None = None
    remaining: int | None = None
    limit: int | None = None
    policy: str | None = None
    sources: tuple[str, ...] = ()

    @property
    def wait(self) -> float | None:
        """Seconds to wait before asking again: ``Retry-After``, else the reset time."""
        return self.retry_after if self.retry_after is not None else self.reset

    def describe(self) -> str:
        """One line for logs and events, e.g. ``reset in 30s, remaining 0/100 (RateLimit)``."""
        parts = []
        if self.retry_after is not None:
            parts.append(f"Retry-After {self.retry_after:g}s")
        if self.reset is not None:
            parts.append(f"reset in {self.reset:g}s")
        if self.remaining is not None:
            quota = f"/{self.limit}" if self.limit is not None else ""
            parts.append(f"remaining {self.remaining}{quota}")
        if self.policy:
            parts.append(f"policy {self.policy}")
        return ", ".join(parts) + f" ({', '.join(self.sources)})"


def _number(text: str) -> float | None:
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _seconds(value: float | None) -> float | None:
    return value if value is not None and 0 <= value <= MAX_WAIT else None


def _count(value: float | None) -> int | None:
    return int(value) if value is not None and value == int(value) and value < 10**12 else None


def _split_members(field: str) -> list[str]:
    """Split a structured-field list on the commas outside quoted strings."""
    members: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in field:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            members.append("".join(current))
            current = []
            continue
        current.append(char)
    members.append("".join(current))
    return [m.strip() for m in members if m.strip()]


def _item(member: str) -> tuple[str, dict[str, str]] | None:
    """``"name";r=0;t=30`` -> ("name", {"r": "0", "t": "30"}); None if it is not one."""
    head, *params = member.split(";")
    head = head.strip()
    if head.startswith('"'):
        if len(head) < 2 or not head.endswith('"') or not head.isascii():
            return None
        name = head[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    elif _TOKEN.fullmatch(head):
        name = head
    else:
        return None
    found: dict[str, str] = {}
    for param in params:
        key, _, value = param.strip().partition("=")
        if _KEY.fullmatch(key):
            found.setdefault(key, value.strip())
    return name[:64], found


def _ietf(rate_limit: str) -> tuple[float | None, int | None, str | None]:
    """(reset, remaining, policy name) from the current drafts' ``RateLimit`` list."""
    resets: list[tuple[float, int | None, str]] = []
    for member in _split_members(rate_limit):
        item = _item(member)
        if item is None:
            continue
        name, params = item
        reset = _seconds(_number(params.get("t", "")))
        if reset is not None:
            resets.append((reset, _count(_number(params.get("r", ""))), name))
    if not resets:
        return None, None, None
    exhausted = [r for r in resets if r[1] in (0, None)] or resets
    reset, remaining, name = max(exhausted, key=lambda r: r[0])
    return reset, remaining, name


def _quota(policy_field: str, name: str | None) -> int | None:
    for member in _split_members(policy_field):
        item = _item(member)
        if item is not None and (name is None or item[0] == name):
            return _count(_number(item[1].get("q", "")))
    return None


def _dictionary(field: str) -> dict[str, str]:
    """The earlier drafts' ``limit=100, remaining=0, reset=30``."""
    found: dict[str, str] = {}
    for member in _split_members(field):
        key, sep, value = member.partition("=")
        key = key.strip().lower()
        if sep and key in ("limit", "remaining", "reset"):
            found.setdefault(key, value.split(";")[0].strip())
    return found


def _largest(field: str) -> float | None:
    """The largest number among a field's comma-separated values (duplicated headers)."""
    values = [_number(part) for part in field.split(",")[:8]]
    numbers = [v for v in values if v is not None]
    return max(numbers) if numbers else None


def _reset_time(field: str, now: float) -> float | None:
    value = _largest(field)
    if value is None:
        return None
    return _seconds(value - now if value >= _EPOCH_FLOOR else value)


def _field(headers: Mapping[str, str], name: str) -> str | None:
    try:
        value = headers.get(name)
    except Exception:  # a Mapping that cannot answer is no rate-limit answer
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_FIELD:
        return None
    return value


def _retry_after(headers: Mapping[str, str], now: float) -> float | None:
    field = _field(headers, "retry-after")
    if field is None:
        return None
    wait = parse_retry_after(field, now)
    if wait is None and "," in field:  # the same header sent twice: "30, 30"
        wait = _largest(field)
    return _seconds(wait)


def read_rate_limit(headers: Mapping[str, str], now: float) -> RateLimit | None:
    """What ``headers`` say about the rate limit, or ``None`` when they say nothing usable.

    ``headers`` is case-insensitive (httpx's) or keyed in lower case; ``now`` is the wall
    clock in seconds since the epoch (for the epoch-based resets and HTTP-dates).
    """
    sources: list[str] = []
    retry_after = _retry_after(headers, now)
    if retry_after is not None:
        sources.append("Retry-After")
    reset: float | None = None
    remaining: int | None = None
    limit: int | None = None
    policy: str | None = None

    field = _field(headers, "ratelimit")
    policy_field = _field(headers, "ratelimit-policy") or ""
    if field is not None:
        older = _dictionary(field)
        if older:
            reset = _seconds(_number(older.get("reset", "")))
            remaining = _count(_number(older.get("remaining", "")))
            limit = _count(_number(older.get("limit", "")))
        else:
            reset, remaining, policy = _ietf(field)
            limit = _quota(policy_field, policy) if policy_field else None
        if reset is not None:
            sources.append("RateLimit")
    if reset is None:
        older_reset = _field(headers, "ratelimit-reset")
        if older_reset is not None:
            reset = _seconds(_largest(older_reset))
            if reset is not None:
                sources.append("RateLimit-Reset")
                remaining = _count(_largest(_field(headers, "ratelimit-remaining") or ""))
                limit = _count(_largest(_field(headers, "ratelimit-limit") or ""))
    for vendor in ("x-ratelimit", "x-rate-limit"):  # Auth0, Okta
        if reset is not None:
            break
        vendor_reset = _field(headers, f"{vendor}-reset")
        if vendor_reset is not None:
            reset = _reset_time(vendor_reset, now)
            if reset is not None:
                name = "X-RateLimit-Reset" if vendor == "x-ratelimit" else "X-Rate-Limit-Reset"
                sources.append(name)
                remaining = _count(_largest(_field(headers, f"{vendor}-remaining") or ""))
                limit = _count(_largest(_field(headers, f"{vendor}-limit") or ""))
    if not sources:
        return None
    return RateLimit(retry_after, reset, remaining, limit, policy, tuple(sources))
