"""OpenTelemetry: what the package records through the SDK's in-memory reader and exporter.

Providers are injected (``meter_provider=``, ``tracer_provider=``), never set globally in
this process (OpenTelemetry allows that once per process): the global providers are tested
in subprocesses, as is a Python without the API installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from m2m_client import (
    AsyncTokenClient,
    BearerAuth,
    ClientCredentials,
    TokenClient,
    TokenEndpointError,
)
from m2m_client.errors import InvalidToken, KeySetUnavailable
from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier

from ._calling import FAST_RETRY, SECRET, FakeClock, TokenEndpoint, credentials, oauth_error

WORKER, WORKER_SECRET = "otel-worker", "otel-worker-Secret-9d1c"


class Otel:
    """An SDK meter provider and tracer provider, each with its in-memory reader."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self._metrics: list[Any] | None = None

    @property
    def providers(self) -> dict[str, Any]:
        return {"meter_provider": self.meter_provider, "tracer_provider": self.tracer_provider}

    def collect(self) -> list[Any]:
        """Every metric recorded so far (read once: the reader is cumulative)."""
        data = self.reader.get_metrics_data()
        self._metrics = [
            metric
            for resource in (data.resource_metrics if data else ())
            for scope in resource.scope_metrics
            for metric in scope.metrics
        ]
        return self._metrics

    def points(self, name: str) -> list[Any]:
        metrics = self._metrics if self._metrics is not None else self.collect()
        return [p for m in metrics if m.name == name for p in m.data.data_points]

    def total(self, name: str, **attributes: Any) -> float:
        """Sum of a counter's points (or count of a histogram's) matching ``attributes``."""
        total = 0.0
        for point in self.points(name):
            attrs = {k.replace(".", "_"): v for k, v in dict(point.attributes).items()}
            if all(attrs.get(k) == v for k, v in attributes.items()):
                total += getattr(point, "value", None) or getattr(point, "count", 0)
        return total

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = list(self.exporter.get_finished_spans())
        return [s for s in spans if name is None or s.name == name]

    def everything(self) -> str:
        """Every exported name, attribute, status, event and link, as one text to search."""
        out: list[str] = []
        for metric in self.collect():
            out.append(metric.name)
            out += [json.dumps(dict(p.attributes), default=str) for p in metric.data.data_points]
        for span in self.spans():
            out.append(span.name)
            out.append(json.dumps(dict(span.attributes or {}), default=str))
            out.append(str(span.status.description))
            out += [e.name + json.dumps(dict(e.attributes or {}), default=str) for e in span.events]
            out += [json.dumps(dict(link.attributes or {}), default=str) for link in span.links]
        return "\n".join(out)


@pytest.fixture
def otel() -> Otel:
    return Otel()


@pytest.fixture
def issuer() -> Iterator[LocalIssuer]:
    issuer = LocalIssuer()
    issuer.add_client(WORKER, WORKER_SECRET, scope="read:data")
    with issuer:
        yield issuer


def issuer_creds(issuer: LocalIssuer, **extra: Any) -> ClientCredentials:
    return ClientCredentials(
        token_url=issuer.token_url, client_id=WORKER, client_secret=WORKER_SECRET, **extra
    )


# --- calling side -------------------------------------------------------------------------


def test_100_calls_over_a_warm_token_record_1_token_request_and_100_acquisitions(
    otel: Otel, issuer: LocalIssuer
) -> None:
    with TokenClient(issuer_creds(issuer), **otel.providers) as tokens:
        for _ in range(100):
            tokens.get_token()
    assert otel.total("m2m_client.token_endpoint.requests") == 1
    assert otel.total("m2m_client.token_endpoint.requests", m2m_client_outcome="ok") == 1
    [request] = otel.points("m2m_client.token_endpoint.requests")
    assert request.attributes["server.address"] == "127.0.0.1"
    assert otel.total("m2m_client.token_endpoint.request.duration") == 1
    assert otel.total("m2m_client.token.acquisition.duration") == 100
    assert otel.total("m2m_client.token.acquisition.duration", m2m_client_outcome="hit") == 99
    assert otel.total("m2m_client.token.acquisition.duration", m2m_client_outcome="fetched") == 1
    [lifetime] = otel.points("m2m_client.token.lifetime")
    assert lifetime.count == 1
    assert 3500 < lifetime.sum <= 3600  # LocalIssuer's default lifetime, as received
    assert len(otel.spans("m2m_client.token_fetch")) == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_warm_bearer_auth_requests_are_hits(otel: Otel, kind: str) -> None:
    def api(request: httpx.Request) -> httpx.Response:
        return (
            TokenEndpoint().issue() if request.url.path == "/oauth/token" else httpx.Response(200)
        )

    transport = httpx.MockTransport(api)
    if kind == "sync":
        with (
            TokenClient(
                credentials(), http_client=httpx.Client(transport=transport), **otel.providers
            ) as tokens,
            httpx.Client(transport=transport, auth=BearerAuth(tokens)) as http,
        ):
            for _ in range(50):
                http.get("https://api.example.com/data")
    else:

        async def main() -> None:
            async with (
                AsyncTokenClient(
                    credentials(),
                    http_client=httpx.AsyncClient(transport=transport),
                    **otel.providers,
                ) as tokens,
                httpx.AsyncClient(transport=transport, auth=BearerAuth(tokens)) as http,
            ):
                for _ in range(50):
                    await http.get("https://api.example.com/data")

        anyio.run(main)
    acquired = "m2m_client.token.acquisition.duration"
    assert otel.total(acquired, m2m_client_outcome="hit") == 49
    assert otel.total(acquired, m2m_client_outcome="fetched") == 1
    assert otel.total("m2m_client.token_endpoint.requests") == 1


@pytest.mark.anyio
async def test_async_100_calls_over_a_warm_token_record_1_request_and_99_hits(
    otel: Otel, issuer: LocalIssuer
) -> None:
    for with_task_group in (False, True):
        client = AsyncTokenClient(issuer_creds(issuer), **otel.providers)
        if with_task_group:
            async with client as tokens:
                for _ in range(100):
                    await tokens.get_token()
        else:
            for _ in range(100):
                await client.get_token()
            await client.aclose()
    assert otel.total("m2m_client.token_endpoint.requests", m2m_client_outcome="ok") == 2
    assert otel.total("m2m_client.token.acquisition.duration", m2m_client_outcome="hit") == 198
    assert otel.total("m2m_client.token.acquisition.duration", m2m_client_outcome="fetched") == 2
    assert len(otel.spans("m2m_client.token_fetch")) == 2


def test_an_outage_records_failed_requests_retries_and_stale_serves(otel: Otel) -> None:
    clock = FakeClock()
    server = TokenEndpoint(expires_in=600)
    with TokenClient(
        credentials(),
        http_client=server.client(),
        clock=clock,
        sleep=clock.sleep,
        retry=FAST_RETRY,
        seed=1,
        **otel.providers,
    ) as tokens:
        first = tokens.get_token()
        # The token endpoint goes down once the token is due for refresh.
        server.script = [httpx.Response(503)] * 3
        clock.now = first.refresh_at + 1
        assert tokens.get_token() is first  # starts the refresh behind, serves the token
        deadline = time.monotonic() + 10
        while tokens.stats.refresh_failures == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tokens.stats.refresh_failures == 1
        for _ in range(3):
            assert tokens.get_token() is first  # served through the outage
    acquired = "m2m_client.token.acquisition.duration"
    assert otel.total(acquired, m2m_client_outcome="refresh_ahead") == 1
    assert otel.total(acquired, m2m_client_outcome="stale") == 3
    assert (
        otel.total(
            "m2m_client.token_endpoint.requests",
            m2m_client_outcome="failed",
            error_type="TransientFailure",
        )
        == 3
    )
    assert otel.total("m2m_client.token_endpoint.retries") == 2
    assert otel.total("m2m_client.token_endpoint.retry.delay") == 2
    [fetch_ok, fetch_failed] = sorted(
        otel.spans("m2m_client.token_fetch"), key=lambda s: s.start_time or 0
    )
    assert fetch_ok.status.is_ok
    assert not fetch_failed.status.is_ok
    assert fetch_failed.attributes is not None
    assert fetch_failed.attributes["error.type"] == "TokenEndpointUnavailable"


def test_a_failed_fetch_is_a_failed_acquisition(otel: Otel) -> None:
    server = TokenEndpoint()
    server.script = [oauth_error(401, "invalid_client", f"bad secret {SECRET}")]
    with TokenClient(credentials(), http_client=server.client(), **otel.providers) as tokens:
        with pytest.raises(TokenEndpointError):
            tokens.get_token()
        with pytest.raises(TokenEndpointError):  # negative cache: no request
            tokens.get_token()
    assert otel.total("m2m_client.token.acquisition.duration", m2m_client_outcome="failed") == 2
    assert otel.total("m2m_client.token_endpoint.requests") == 1


def test_a_background_refresh_is_its_own_span_linked_to_the_request_that_started_it(
    otel: Otel,
) -> None:
    clock = FakeClock()
    server = TokenEndpoint(expires_in=600)
    tracer = otel.tracer_provider.get_tracer("app")
    with TokenClient(
        credentials(), http_client=server.client(), clock=clock, seed=1, **otel.providers
    ) as tokens:
        with tracer.start_as_current_span("first request") as first_request:
            first = tokens.get_token()
        clock.now = first.refresh_at + 1
        with tracer.start_as_current_span("later request") as request:
            tokens.get_token()
        deadline = time.monotonic() + 10
        while len(otel.spans("m2m_client.token_fetch")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    fetch, refresh = otel.spans("m2m_client.token_fetch")
    # The first fetch ran for the caller: a child of its span, in its trace.
    assert fetch.parent is not None
    assert fetch.parent.span_id == first_request.get_span_context().span_id
    assert fetch.attributes == {"m2m_client.background": False}
    # The refresh ran behind: a trace of its own, linked to the request that started it.
    assert refresh.parent is None
    assert refresh.attributes == {"m2m_client.background": True}
    [link] = refresh.links
    assert link.context.span_id == request.get_span_context().span_id


def test_the_http_request_of_a_fetch_runs_inside_the_fetch_span(otel: Otel) -> None:
    # What the httpx instrumentation sees: its span's parent is the current span.
    seen: list[str] = []
    server = TokenEndpoint()

    def reply(request: httpx.Request) -> httpx.Response:
        span = trace.get_current_span()
        seen.append(getattr(span, "name", "?"))
        return server.issue()

    server.script = [reply]
    with TokenClient(credentials(), http_client=server.client(), **otel.providers) as tokens:
        tokens.get_token()
    assert seen == ["m2m_client.token_fetch"]


def test_dpop_nonce_retries_and_401_renewals_are_counted(otel: Otel) -> None:
    issuer = LocalIssuer(dpop_nonce=True)
    issuer.add_client(WORKER, WORKER_SECRET)
    rejected: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        if not rejected:  # the API rejects the first token it sees
            rejected.append(request.headers["authorization"])
            return httpx.Response(401)
        return httpx.Response(200)

    with (
        issuer,
        TokenClient(issuer_creds(issuer, dpop=True), **otel.providers) as tokens,
        httpx.Client(transport=httpx.MockTransport(api), auth=BearerAuth(tokens)) as http,
    ):
        assert http.get("https://api.example.com/data").status_code == 200
    assert otel.total("m2m_client.dpop.nonce_retries") == 1
    assert otel.total("m2m_client.token.renewals") == 1
    assert otel.total("m2m_client.token_endpoint.requests", m2m_client_outcome="ok") == 2


def test_shared_cache_counters_reach_the_operations_counter_and_the_breaker_state(
    otel: Otel,
) -> None:
    from m2m_client._telemetry import resolve

    telemetry = resolve(otel.meter_provider, None)
    assert telemetry is not None

    class Cache:
        pass

    cache = Cache()
    for name in ("shared_hits", "leases_lost", "waits_woken", "breaker_opened", "breaker_opened"):
        telemetry.shared_event(name, cache)
    telemetry.shared_event("no_such_counter", cache)  # unknown: never an attribute value
    assert otel.total("m2m_client.shared_cache.operations") == 5
    ops = {
        p.attributes["m2m_client.operation"]
        for p in otel.points("m2m_client.shared_cache.operations")
    }
    assert ops == {"shared_hits", "leases_lost", "waits_woken", "breaker_opened"}
    assert otel.total("m2m_client.shared_cache.lease_waits", m2m_client_outcome="woken") == 1
    assert otel.total("m2m_client.shared_cache.breaker.open") == 1  # opened once, not twice
    telemetry.shared_event("breaker_closed", cache)
    otel._metrics = None
    assert otel.total("m2m_client.shared_cache.breaker.open") == 0


# --- receiving side -----------------------------------------------------------------------


def test_verifications_record_scheme_outcome_and_the_rejection_reason(
    otel: Otel, issuer: LocalIssuer
) -> None:
    verifier = TokenVerifier(
        issuer=issuer.url, audience=issuer.audience, jwks_url=issuer.jwks_url, **otel.providers
    )
    good = issuer.mint()
    for _ in range(10):
        verifier.verify(good)
    with pytest.raises(InvalidToken):
        verifier.verify(issuer.mint(expires_in=-120))
    with pytest.raises(InvalidToken):
        verifier.verify(issuer.mint(audience="https://other.example.com"))
    total = "m2m_client.verifications"
    assert otel.total(total, m2m_client_scheme="bearer", m2m_client_outcome="accepted") == 10
    assert otel.total(total, m2m_client_outcome="rejected", error_type="expired") == 1
    assert otel.total(total, m2m_client_outcome="rejected", error_type="audience") == 1
    assert otel.total("m2m_client.verification.duration") == 12
    assert otel.total("m2m_client.jwks.fetches", m2m_client_reason="start") == 1
    assert otel.total("m2m_client.jwks.fetches", m2m_client_outcome="ok") == 1
    [age] = otel.points("m2m_client.jwks.age")
    assert 0 <= age.value < 60
    assert age.attributes == {"server.address": "127.0.0.1"}
    # Spans only around network work: one JWKS fetch, none per verification.
    assert [s.name for s in otel.spans()] == ["m2m_client.jwks_fetch"]


def test_dpop_verifications_record_their_scheme_and_the_replay_check(
    otel: Otel, issuer: LocalIssuer
) -> None:
    with TokenClient(issuer_creds(issuer, dpop=True)) as tokens:
        token = tokens.get_token().access_token
        key = tokens._core.dpop
    assert key is not None
    verifier = TokenVerifier(
        issuer=issuer.url,
        audience=issuer.audience,
        jwks_url=issuer.jwks_url,
        dpop="required",
        **otel.providers,
    )
    url = "https://api.example.com/data"
    proof = key.proof("GET", url, now=time.time(), access_token=token)
    verifier.verify(token, dpop_proof=proof, method="GET", url=url)
    with pytest.raises(InvalidToken):  # the same proof again: a replay
        verifier.verify(token, dpop_proof=proof, method="GET", url=url)
    total = "m2m_client.verifications"
    assert otel.total(total, m2m_client_scheme="dpop", m2m_client_outcome="accepted") == 1
    assert otel.total(total, m2m_client_scheme="dpop", m2m_client_outcome="rejected") == 1
    assert otel.total("m2m_client.dpop.replay_check.duration") == 2
    assert token not in otel.everything()
    assert proof.split(".")[1] not in otel.everything()


@pytest.mark.anyio
async def test_async_verifier_records_unknown_kid_refetches(
    otel: Otel, issuer: LocalIssuer
) -> None:
    verifier = AsyncTokenVerifier(
        issuer=issuer.url,
        audience=issuer.audience,
        jwks_url=issuer.jwks_url,
        unknown_kid_cooldown=0,
        **otel.providers,
    )
    await verifier.verify(issuer.mint())
    issuer.rotate_keys()
    await verifier.verify(issuer.mint())
    assert otel.total("m2m_client.jwks.fetches", m2m_client_reason="start") == 1
    assert otel.total("m2m_client.jwks.fetches", m2m_client_reason="unknown_kid") == 1
    assert otel.total("m2m_client.verifications", m2m_client_outcome="accepted") == 2
    assert len(otel.spans("m2m_client.jwks_fetch")) == 2


def test_a_failed_jwks_fetch_is_counted_with_its_error_type(otel: Otel) -> None:
    verifier = TokenVerifier(
        issuer="http://127.0.0.1:9/",
        audience="https://api.example.com",
        jwks_url="http://127.0.0.1:9/jwks",  # discard port: nothing listens
        timeout=2,
        **otel.providers,
    )
    issuer = LocalIssuer(url="https://issuer.example.com/")  # mints only
    with pytest.raises(KeySetUnavailable, match="JWKS"):
        verifier.verify(issuer.mint())
    assert (
        otel.total(
            "m2m_client.jwks.fetches", m2m_client_outcome="failed", error_type="KeySetUnavailable"
        )
        == 1
    )
    [span] = otel.spans("m2m_client.jwks_fetch")
    assert not span.status.is_ok


# --- nothing secret, nothing without an SDK -----------------------------------------------


def test_no_token_secret_assertion_or_claim_value_is_in_any_metric_or_span(
    otel: Otel, issuer: LocalIssuer
) -> None:
    private = issuer.mint(sub="private-subject@clients", tenant="tenant-Value-42")
    tokens_seen: list[str] = [private]
    with TokenClient(issuer_creds(issuer), **otel.providers) as tokens:
        tokens_seen.append(tokens.get_token().access_token)
        tokens_seen.append(tokens.get_token(force_refresh=True).access_token)
    verifier = TokenVerifier(
        issuer=issuer.url, audience=issuer.audience, jwks_url=issuer.jwks_url, **otel.providers
    )
    verifier.verify(private)
    with pytest.raises(InvalidToken):
        verifier.verify(private[:-4] + "AAAA")
    # A refusal quoting the secret in its error_description (a careless server).
    server = TokenEndpoint()
    server.script = [oauth_error(400, "invalid_client", f"secret {SECRET} is wrong")]
    failing = TokenClient(credentials(), http_client=server.client(), **otel.providers)
    with failing, pytest.raises(TokenEndpointError):
        failing.get_token()
    exported = otel.everything()
    assert "m2m_client.token.acquisition.duration" in exported  # the search saw the data
    for value in (
        WORKER_SECRET,
        SECRET,
        "private-subject",
        "tenant-Value-42",
        "is wrong",
        *tokens_seen,
        *(t.split(".")[1] for t in tokens_seen),  # a claims segment alone
        *(t.split(".")[2][:20] for t in tokens_seen),  # a signature
    ):
        assert value not in exported


def test_nothing_is_resolved_without_an_sdk(issuer: LocalIssuer) -> None:
    # This process never sets global providers: they are OpenTelemetry's proxies.
    with TokenClient(issuer_creds(issuer)) as tokens:
        tokens.get_token()
        tokens.get_token()
        assert tokens._core.telemetry is None
    verifier = TokenVerifier(issuer=issuer.url, audience=issuer.audience, jwks_url=issuer.jwks_url)
    verifier.verify(issuer.mint())
    assert verifier._telemetry is None


def _run(*parts: str) -> dict[str, Any]:
    code = "\n".join(textwrap.dedent(part) for part in parts)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


_SCENARIO = """
from m2m_client import ClientCredentials, TokenClient
from m2m_client.testing import LocalIssuer
from m2m_client.verify import TokenVerifier

issuer = LocalIssuer()
issuer.add_client("w", "w-secret")
with issuer:
    creds = ClientCredentials(token_url=issuer.token_url, client_id="w", client_secret="w-secret")
    with TokenClient(creds) as tokens:
        token = tokens.get_token().access_token
        tokens.get_token()
        telemetry = tokens._core.telemetry
    verifier = TokenVerifier(issuer=issuer.url, audience=issuer.audience, jwks_url=issuer.jwks_url)
    verifier.verify(token)
    verifier.verify(token)
"""


def test_without_the_api_installed_everything_works_and_nothing_is_recorded() -> None:
    out = _run(
        """
        import importlib.abc, json, sys

        class NoOtel(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, NoOtel())
        """,
        _SCENARIO,
        """
        import m2m_client._telemetry as t
        print(json.dumps({"api": t.otel_metrics is not None, "client": telemetry is not None,
                          "verifier": verifier._telemetry is not None,
                          "loaded": any(m.startswith("opentelemetry") for m in sys.modules)}))
        """,
    )
    assert out == {"api": False, "client": False, "verifier": False, "loaded": False}


def test_the_global_providers_an_app_configures_are_picked_up() -> None:
    out = _run(
        """
        import json
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        """,
        _SCENARIO.replace(
            "with issuer:",
            # Clients and verifiers made at import time; the SDK configured later, in main().
            """reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(tracer_provider)
with issuer:""",
        ),
        """
        names = sorted(
            m.name for r in reader.get_metrics_data().resource_metrics
            for s in r.scope_metrics for m in s.metrics if s.scope.name == "m2m_client"
        )
        spans = sorted(s.name for s in exporter.get_finished_spans())
        print(json.dumps({"names": names, "spans": spans}))
        """,
    )
    assert "m2m_client.token.acquisition.duration" in out["names"]
    assert "m2m_client.verifications" in out["names"]
    assert all(name.startswith("m2m_client.") for name in out["names"])
    assert out["spans"] == ["m2m_client.jwks_fetch", "m2m_client.token_fetch"]


def test_injected_providers_keep_apart(issuer: LocalIssuer) -> None:
    one, two = Otel(), Otel()
    with (
        TokenClient(issuer_creds(issuer), **one.providers) as a,
        TokenClient(issuer_creds(issuer), **two.providers) as b,
    ):
        a.get_token()
        b.get_token()
        b.get_token()
    assert one.total("m2m_client.token.acquisition.duration") == 1
    assert two.total("m2m_client.token.acquisition.duration") == 2


def test_a_broken_exporter_never_breaks_a_token_fetch(issuer: LocalIssuer) -> None:
    otel = Otel()

    class Broken(SimpleSpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            raise RuntimeError("exporter down")

    otel.tracer_provider.add_span_processor(Broken(otel.exporter))
    with TokenClient(issuer_creds(issuer), **otel.providers) as tokens:
        try:
            tokens.get_token()
        except RuntimeError:
            pytest.fail("an exporter's exception reached the caller")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX only")
def test_a_child_forked_while_instruments_are_being_resolved_can_resolve_them() -> None:
    import os
    import signal

    import m2m_client._telemetry as t

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    with t._resolving:  # another thread of the parent, mid-resolve, at fork()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            signal.alarm(10)  # a deadlock kills the child: a failure, not a hang
            os._exit(0 if t.resolve(provider, None) is not None else 3)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
