"""The rate-limit reader: IETF RateLimit (current and earlier drafts), Auth0, Okta, and garbage."""

from __future__ import annotations

import email.utils
import math

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2m_client import RateLimit
from m2m_client._ratelimit import MAX_WAIT, read_rate_limit

NOW = 1_700_000_000.0
NAMES = [
    "Retry-After",
    "RateLimit",
    "RateLimit-Policy",
    "RateLimit-Reset",
    "RateLimit-Remaining",
    "RateLimit-Limit",
    "X-RateLimit-Reset",
    "X-RateLimit-Remaining",
    "X-RateLimit-Limit",
    "X-Rate-Limit-Reset",
    "X-Rate-Limit-Remaining",
    "X-Rate-Limit-Limit",
]


def read(*pairs: tuple[str, str]) -> RateLimit | None:
    return read_rate_limit(httpx.Headers(list(pairs)), NOW)


def test_nothing_said_is_none() -> None:
    assert read() is None
    assert read(("Content-Type", "application/json")) is None


def test_current_ietf_draft_list_with_policy() -> None:
    got = read(("RateLimit", '"default";r=0;t=30'), ("RateLimit-Policy", '"default";q=100;w=60'))
    assert got == RateLimit(None, 30.0, 0, 100, "default", ("RateLimit",))
    assert got.wait == 30.0
    assert "reset in 30s" in got.describe()
    assert "remaining 0/100" in got.describe()


def test_several_quotas_wait_for_the_longest_exhausted_one() -> None:
    field = '"burst";r=5;t=1, "daily";r=0;t=3600, "hourly";r=0;t=120'
    got = read(("RateLimit", field))
    assert got is not None
    assert (got.reset, got.remaining, got.policy) == (3600.0, 0, "daily")


def test_a_quoted_name_with_a_comma_and_a_token_name() -> None:
    assert read(("RateLimit", '"a,b";r=0;t=7')).reset == 7.0  # type: ignore[union-attr]
    assert read(("RateLimit", "tenant;r=0;t=8")).reset == 8.0  # type: ignore[union-attr]


def test_the_earlier_drafts_dictionary_and_separate_fields() -> None:
    got = read(("RateLimit", "limit=100, remaining=0, reset=30"))
    assert got is not None
    assert (got.reset, got.remaining, got.limit) == (30.0, 0, 100)
    older = read(("RateLimit-Limit", "10"), ("RateLimit-Remaining", "0"), ("RateLimit-Reset", "12"))
    assert older == RateLimit(None, 12.0, 0, 10, None, ("RateLimit-Reset",))


@pytest.mark.parametrize("prefix", ["X-RateLimit", "X-Rate-Limit"])
def test_auth0_and_okta_reset_is_epoch_seconds(prefix: str) -> None:
    got = read(
        (f"{prefix}-Limit", "30"),
        (f"{prefix}-Remaining", "0"),
        (f"{prefix}-Reset", str(int(NOW) + 45)),
    )
    assert got is not None
    assert (got.reset, got.remaining, got.limit) == (45.0, 0, 30)
    assert got.sources == (f"{prefix}-Reset",)


def test_a_small_vendor_reset_is_seconds_from_now_and_a_past_one_is_ignored() -> None:
    assert read(("X-RateLimit-Reset", "20")).reset == 20.0  # type: ignore[union-attr]
    assert read(("X-RateLimit-Reset", str(int(NOW) - 5))) is None


def test_retry_after_wins_over_a_reset() -> None:
    got = read(("Retry-After", "5"), ("RateLimit", '"d";r=0;t=60'))
    assert got is not None
    assert (got.retry_after, got.reset, got.wait) == (5.0, 60.0, 5.0)
    date = email.utils.formatdate(NOW + 42, usegmt=True)
    assert read(("Retry-After", date)).wait == pytest.approx(42.0)  # type: ignore[union-attr]


def test_duplicated_headers_take_the_longest_wait() -> None:
    got = read(("X-RateLimit-Reset", str(int(NOW) + 10)), ("X-RateLimit-Reset", str(int(NOW) + 30)))
    assert got is not None
    assert got.reset == 30.0
    assert read(("Retry-After", "3"), ("Retry-After", "9")).wait == 9.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "pair",
    [
        ("RateLimit", '"d";r=0;t=-5'),
        ("RateLimit", '"d";r=0;t=1e9'),
        ("RateLimit", '"d";r=0;t=\u0663'),
        ("RateLimit", '"d";r=0;t=99999999999999999999'),
        ("RateLimit", '"d";r=0;t=NaN'),
        ("RateLimit", '"unterminated;r=0;t=5'),
        ("RateLimit", "(inner list);t=5"),
        ("RateLimit", "limit=, remaining=x, reset=-1"),
        ("RateLimit-Reset", "soon"),
        ("X-RateLimit-Reset", "-1700000000"),
        ("X-RateLimit-Reset", "1700000000" + "0" * 30),
        ("X-Rate-Limit-Reset", "1.7e9"),
        ("X-Rate-Limit-Reset", "\u00b2\u00b3"),
        ("Retry-After", "-5"),
        ("Retry-After", "5" * 40),
        ("RateLimit", '"d";r=0;t=5' * 200),  # a huge field is not parsed at all
    ],
)
def test_garbage_is_ignored_never_trusted(pair: tuple[str, str]) -> None:
    got = read_rate_limit({pair[0].lower(): pair[1]}, NOW)  # as decoded from latin-1
    assert got is None or got.wait is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(NAMES), st.text(max_size=80)),
        max_size=6,
    ),
    st.floats(min_value=0, max_value=4e9),
)
def test_any_header_values_give_a_bounded_answer_or_none(
    pairs: list[tuple[str, str]], now: float
) -> None:
    headers = {}
    for name, value in pairs:
        headers[name.lower()] = value  # a plain mapping, keyed in lower case
    got = read_rate_limit(headers, now)
    if got is not None:
        for value in (got.retry_after, got.reset):
            assert value is None or (math.isfinite(value) and 0 <= value <= MAX_WAIT)
        assert got.remaining is None or got.remaining >= 0
        assert got.sources
        got.describe()


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6))
def test_well_formed_current_draft_round_trips(reset: int, remaining: int) -> None:
    got = read(("RateLimit", f'"p";r={remaining};t={reset}'))
    assert got is not None
    assert got.reset == reset
    assert got.remaining == remaining


def test_a_mapping_that_raises_is_no_answer() -> None:
    class Broken(dict[str, str]):
        def get(self, key: object, default: object = None) -> str:  # type: ignore[override]
            raise RuntimeError("boom")

    assert read_rate_limit(Broken(), NOW) is None
