"""OpenTelemetry metrics and traces, through ``opentelemetry-api`` only (extra ``[otel]``).

The package's decision points already report what happened (the client core's ``emit``, the
shared cache's counters, the verifier's verdicts); each calls one method here. Nothing here is
on a hot path unless an SDK is configured: clients and verifiers hold ``None`` until their
first slow-path call resolves the providers (the injected ones, else the global ones), and stay
``None`` when the API is not installed or the providers are OpenTelemetry's no-op/proxy ones,
so a warm ``get_token`` or a repeated ``verify()`` pays one ``is None`` check.

Attribute values come from bounded sets (outcome words, exception class names, the reason
words of :class:`~m2m_client.errors.InvalidToken`, a host name from the configuration): never
a token, secret, assertion, claim or server-supplied text. Names: docs/observability.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from . import _fork

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
except ImportError:  # the [otel] extra is not installed: everything stays a no-op
    otel_context = otel_metrics = otel_trace = None  # type: ignore[assignment]

__all__ = ["NAME", "Telemetry", "error_type", "resolve", "server_address"]

logger = logging.getLogger("m2m_client")

NAME = "m2m_client"
"""The meter's and the tracer's name; every instrument name starts with ``m2m_client.``."""

OUTCOME = "m2m_client.outcome"
_DURATION_BUCKETS = (
    0.00001, 0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DELAY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
_LIFETIME_BUCKETS = (60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0, 86400.0)
_VERIFY_BUCKETS = (
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
)  # fmt: skip

# Attribute sets built once: the recording calls of the hot paths allocate nothing.
_ACQUIRED = {
    o: {OUTCOME: o}
    for o in ("hit", "refresh_ahead", "waited", "shared_hit", "stale", "fetched", "failed")
}
_SCHEMES = ("bearer", "dpop")
_ACCEPTED = {s: {"m2m_client.scheme": s, OUTCOME: "accepted"} for s in _SCHEMES}
_SHARED_OPS = frozenset(
    (
        "shared_hits", "negative_hits", "fetches", "coalesced", "leases_won", "leases_lost",
        "leases_expired", "waits_woken", "waits_polled", "wait_timeouts", "redis_errors",
        "redis_round_trips", "fallbacks", "breaker_opened", "breaker_closed",
        "undecodable_entries",
    )
)  # fmt: skip
_LEASE_WAITS = {"waits_woken": "woken", "waits_polled": "polled", "wait_timeouts": "timed_out"}

# Every instrument, read once by Telemetry: (key, kind, name, unit, description, buckets).
# The names, units and descriptions are a public contract (docs/observability.md).
_INSTRUMENTS: tuple[tuple[str, str, str, str, str, tuple[float, ...] | None], ...] = (
    # --- calling side
    ("acquisition", "histogram", "m2m_client.token.acquisition.duration", "s",
     "How long get_token took, by what happened (m2m_client.outcome).", _DURATION_BUCKETS),
    ("requests", "counter", "m2m_client.token_endpoint.requests", "{request}",
     "Token requests sent to the token endpoint, by outcome.", None),
    ("request_duration", "histogram", "m2m_client.token_endpoint.request.duration", "s",
     "Duration of one token request (send to interpreted answer).", _REQUEST_BUCKETS),
    ("retries", "counter", "m2m_client.token_endpoint.retries", "{retry}",
     "Token or metadata requests retried after a transient failure.", None),
    ("retry_delay", "histogram", "m2m_client.token_endpoint.retry.delay", "s",
     "The wait before each retry (backoff or what the server asked).", _DELAY_BUCKETS),
    ("rate_limited", "counter", "m2m_client.token_endpoint.rate_limited", "{response}",
     "429/503 answers that asked the client to wait.", None),
    ("lifetime", "histogram", "m2m_client.token.lifetime", "s",
     "Lifetime left in each token the client received.", _LIFETIME_BUCKETS),
    ("renewals", "counter", "m2m_client.token.renewals", "{token}",
     "Cached tokens dropped after the API answered 401 (or invalidate()).", None),
    ("nonce_retries", "counter", "m2m_client.dpop.nonce_retries", "{request}",
     "Token requests re-sent at once with the server's DPoP nonce.", None),
    ("shared_ops", "counter", "m2m_client.shared_cache.operations", "{operation}",
     "Shared (Redis) token cache counters, by m2m_client.operation.", None),
    ("lease_waits", "counter", "m2m_client.shared_cache.lease_waits", "{wait}",
     "Waits for another process's lease, by how they ended.", None),
    ("breaker_open", "up_down_counter", "m2m_client.shared_cache.breaker.open", "{breaker}",
     "Shared caches whose circuit breaker is open (Redis bypassed).", None),
    # --- receiving side
    ("verifications", "counter", "m2m_client.verifications", "{token}",
     "Tokens verified, by scheme and outcome; error.type is the reason.", None),
    ("verification_duration", "histogram", "m2m_client.verification.duration", "s",
     "Duration of one verify() (cached verdicts included).", _VERIFY_BUCKETS),
    ("jwks_fetches", "counter", "m2m_client.jwks.fetches", "{fetch}",
     "Key set (JWKS) fetches, by m2m_client.reason and outcome.", None),
    ("replay_duration", "histogram", "m2m_client.dpop.replay_check.duration", "s",
     "Duration of one DPoP proof replay-cache check.", _VERIFY_BUCKETS),
    ("jwks_age", "observable_gauge", "m2m_client.jwks.age", "s",
     "Seconds since each verifier's key set was last fetched.", None),
)  # fmt: skip


def _is_noop(provider: object) -> bool:
    # The global providers before an SDK is set are proxies; NoOp* are the explicit no-ops.
    name = type(provider).__name__
    return name.startswith("NoOp") or name in ("_ProxyMeterProvider", "ProxyTracerProvider")


def error_type(error: BaseException | str | None) -> str:
    """``error.type``: an exception's class name (a bounded set), never its message."""
    if isinstance(error, BaseException):
        return type(error).__name__
    if isinstance(error, str):  # an event's "TypeName: message"
        return error.split(":", 1)[0][:64] or "_OTHER"
    return "_OTHER"


def server_address(url: str | None) -> str | None:
    """The host of a configured URL (``server.address``); never a path or query."""
    if not url:
        return None
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


_resolved: dict[tuple[int, int], tuple[object, object, Telemetry]] = {}
_resolving = threading.Lock()


@_fork.at_fork
def _after_fork_in_child() -> None:
    global _resolving
    _resolving = threading.Lock()  # a thread of the parent may have held it at fork()


def resolve(
    meter_provider: object | None = None, tracer_provider: object | None = None
) -> Telemetry | None:
    """The instruments for these providers (default: the global ones), or ``None`` when
    nothing would be recorded (no API, or no-op providers). One :class:`Telemetry` per
    provider pair, so many clients share one set of instruments."""
    if otel_metrics is None or otel_trace is None:
        return None
    mp = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
    tp = tracer_provider if tracer_provider is not None else otel_trace.get_tracer_provider()
    mp_used = None if _is_noop(mp) else mp
    tp_used = None if _is_noop(tp) else tp
    if mp_used is None and tp_used is None:
        return None
    key = (id(mp_used), id(tp_used))
    with _resolving:  # one set of instruments (and one gauge callback) per provider pair
        entry = _resolved.get(key)
        if entry is not None and entry[0] is mp_used and entry[1] is tp_used:
            return entry[2]
        if len(_resolved) >= 64:  # a bound: tests and apps that make providers by the dozen
            _resolved.clear()
        telemetry = Telemetry(mp_used, tp_used)
        _resolved[key] = (mp_used, tp_used, telemetry)
        return telemetry


class Telemetry:
    """The instruments and the tracer for one provider pair; one method per event."""

    def __init__(self, meter_provider: Any, tracer_provider: Any) -> None:
        self.tracer = (
            None if tracer_provider is None else tracer_provider.get_tracer(NAME, _version())
        )
        self.metered = meter_provider is not None
        self._keysets: weakref.WeakSet[Any] = weakref.WeakSet()
        self._breakers: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._i: dict[str, Any] = {}
        if meter_provider is not None:
            meter = meter_provider.get_meter(NAME, _version())
            for key, kind, name, unit, description, buckets in _INSTRUMENTS:
                options: dict[str, Any] = {"unit": unit, "description": description}
                if buckets is not None:
                    options["explicit_bucket_boundaries_advisory"] = buckets
                if kind == "observable_gauge":
                    options["callbacks"] = [self._keyset_ages]
                self._i[key] = getattr(meter, f"create_{kind}")(name, **options)

    # --- calling side ------------------------------------------------------------------

    def acquired(self, outcome: str, seconds: float) -> None:
        if self.metered:
            self._i["acquisition"].record(seconds, _ACQUIRED[outcome])

    def token_request(self, seconds: float, error: BaseException | None, url: str | None) -> None:
        if not self.metered:
            return
        attributes: dict[str, str] = {OUTCOME: "ok" if error is None else "failed"}
        if error is not None:
            attributes["error.type"] = error_type(error)
        host = server_address(url)
        if host:
            attributes["server.address"] = host
        self._i["requests"].add(1, attributes)
        self._i["request_duration"].record(seconds, attributes)

    def token_received(self, seconds_left: float) -> None:
        if self.metered:
            self._i["lifetime"].record(max(seconds_left, 0.0))

    def nonce_retry(self) -> None:
        if self.metered:
            self._i["nonce_retries"].add(1)

    def client_event(self, kind: str, fields: Mapping[str, Any], source: object = None) -> None:
        """One :class:`~m2m_client.TokenEvent` (its kind and fields, before it is built)."""
        if not self.metered:
            return
        if kind == "retry":
            attributes = {"error.type": error_type(fields.get("error"))}
            self._i["retries"].add(1, attributes)
            delay = fields.get("delay")
            if isinstance(delay, int | float):
                self._i["retry_delay"].record(float(delay), attributes)
        elif kind == "token_invalidated":
            self._i["renewals"].add(1)
        elif kind == "rate_limited":
            self._i["rate_limited"].add(1)
        elif kind == "shared_cache":
            self.shared_event(str(fields.get("detail")), source)

    def shared_event(self, name: str, source: object) -> None:
        if name not in _SHARED_OPS:
            return  # a counter this version does not know: never an unbounded value
        self._i["shared_ops"].add(1, {"m2m_client.operation": name})
        ended = _LEASE_WAITS.get(name)
        if ended is not None:
            self._i["lease_waits"].add(1, {OUTCOME: ended})
        if name in ("breaker_opened", "breaker_closed") and source is not None:
            # One up/down step per breaker state change; a cache seen by several clients
            # reports each change to each of them, so it is counted once per source.
            state = 1 if name == "breaker_opened" else 0
            try:
                previous = self._breakers.get(source, 0)
                if state != previous:
                    self._breakers[source] = state
                    self._i["breaker_open"].add(state - previous)
            except TypeError:  # a source that cannot be weakly referenced: not counted
                pass

    def fetch_span(self, link: Any = None) -> contextlib.AbstractContextManager[Any]:
        """A span around one token fetch; a background refresh is a root span linked to
        the span of the request that started it."""
        if link is None:
            return _span(self.tracer, "m2m_client.token_fetch", {"m2m_client.background": False})
        return _span(
            self.tracer,
            "m2m_client.token_fetch",
            {"m2m_client.background": True},
            parent=otel_context.Context(),  # a trace of its own, not the caller's
            links=[otel_trace.Link(link)],
        )

    def link(self) -> Any:
        """The current span's context, to link a background fetch to (or ``None``)."""
        if self.tracer is None:
            return None
        context = otel_trace.get_current_span().get_span_context()
        return context if context.is_valid else None

    # --- receiving side ----------------------------------------------------------------

    def verified(self, scheme: str, seconds: float, error: BaseException | None) -> None:
        if not self.metered:
            return
        if error is None:
            attributes = _ACCEPTED[scheme]
        else:
            reason = getattr(error, "reason", None)
            attributes = {
                "m2m_client.scheme": scheme,
                OUTCOME: "rejected",
                "error.type": reason if isinstance(reason, str) else error_type(error),
            }
        self._i["verifications"].add(1, attributes)
        self._i["verification_duration"].record(seconds, attributes)

    def replay_checked(self, seconds: float) -> None:
        if self.metered:
            self._i["replay_duration"].record(seconds)

    @contextlib.contextmanager
    def jwks_fetch(self, reason: str, verifier: Any) -> Iterator[None]:
        """Count a key set fetch and trace it (spans only around network work)."""
        host = server_address(verifier.issuer)
        attributes: dict[str, Any] = {"m2m_client.reason": reason}
        if host:
            attributes["server.address"] = host
        with _span(self.tracer, "m2m_client.jwks_fetch", attributes) as span:
            try:
                yield
            except BaseException as exc:
                self._jwks_counted(attributes, exc)
                raise
            error = verifier._core.keys.last_error
            if span is not None and error is not None:
                _quietly(_failed, span, error)
            self._jwks_counted(attributes, error)
        if error is None:
            verifier._keys_loaded_at = time.monotonic()
            self._keysets.add(verifier)

    def _jwks_counted(self, attributes: dict[str, Any], error: BaseException | None) -> None:
        if not self.metered:
            return
        counted = dict(attributes, **{OUTCOME: "ok" if error is None else "failed"})
        if error is not None:
            counted["error.type"] = error_type(error)
        self._i["jwks_fetches"].add(1, counted)

    def _keyset_ages(self, options: Any) -> Iterator[Any]:
        now = time.monotonic()
        for verifier in list(self._keysets):
            loaded = getattr(verifier, "_keys_loaded_at", None)
            if loaded is None:
                continue
            host = server_address(verifier.issuer)
            yield otel_metrics.Observation(now - loaded, {"server.address": host} if host else {})


@contextlib.contextmanager
def _span(
    tracer: Any, name: str, attributes: dict[str, Any], parent: Any = None, links: Any = None
) -> Iterator[Any]:
    """The current span while the block runs (``None`` without a tracer). A failing SDK or
    exporter is logged, never raised into the fetch it observes."""
    span = token = None
    if tracer is not None:
        try:
            span = tracer.start_span(
                name, context=parent, kind=otel_trace.SpanKind.INTERNAL,
                attributes=attributes, links=links,
            )  # fmt: skip
            token = otel_context.attach(otel_trace.set_span_in_context(span))
        except Exception:
            logger.exception("m2m_client: OpenTelemetry could not start span %s", name)
    try:
        yield span
    except BaseException as exc:
        if span is not None:
            _quietly(_failed, span, exc)
        raise
    finally:
        if token is not None:
            _quietly(otel_context.detach, token)
        if span is not None:
            _quietly(span.end)


def _quietly(function: Any, *args: Any) -> None:
    try:
        function(*args)
    except Exception:
        logger.exception(
            "m2m_client: OpenTelemetry raised in %s", getattr(function, "__name__", "?")
        )


def _failed(span: Any, error: BaseException) -> None:
    # The class name only: a message may quote the server (error_description).
    span.set_attribute("error.type", error_type(error))
    span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, error_type(error)))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("m2m-client")
    except Exception:
        return "0"
