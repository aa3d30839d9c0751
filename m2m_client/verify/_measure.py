"""The verifiers' OpenTelemetry wiring: installed per instance at the first slow path.

Without an SDK nothing here runs after the first look-up: ``verify`` stays the class's own
method, not one check added. With one, :func:`start_telemetry` stores measured wrappers on the
instance (shadowing ``verify`` and ``verify_cached``), each recording its verdict.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any

from m2m_client._telemetry import Telemetry, resolve
from m2m_client.errors import VerificationError

__all__ = ["jwks_span", "resolve_telemetry", "start_telemetry"]


def resolve_telemetry(verifier: Any) -> Telemetry | None:
    """The verifier's telemetry, its providers resolved at the first call (then cleared)."""
    providers = verifier._providers
    if providers is not None:
        verifier._providers = None
        verifier._telemetry = resolve(*providers)
    telemetry: Telemetry | None = verifier._telemetry
    return telemetry


def jwks_span(verifier: Any, reason: str) -> contextlib.AbstractContextManager[None]:
    """A span (and duration) around one JWKS fetch; nothing without an SDK."""
    telemetry = resolve_telemetry(verifier)
    if telemetry is None:
        return contextlib.nullcontext()
    return telemetry.jwks_fetch(reason, verifier)


def start_telemetry(verifier: Any) -> bool:
    """Resolve the providers (once); with an SDK, make ``verify`` (and ``verify_cached``)
    measured ones, per instance. ``True`` if the measured ones were installed."""
    telemetry = resolve_telemetry(verifier)
    if telemetry is None:
        return False
    cls: Any = type(verifier)
    is_async = inspect.iscoroutinefunction(cls.verify)
    # Stored on the instance: they shadow the class's methods from now on.
    vars(verifier)["verify"] = _measured(cls.verify, verifier, telemetry, is_async=is_async)
    if hasattr(cls, "verify_cached"):
        vars(verifier)["verify_cached"] = _measured(
            cls.verify_cached, verifier, telemetry, is_async=False
        )
    return True


def _measured(method: Any, verifier: Any, telemetry: Telemetry, *, is_async: bool) -> Any:
    """``method`` bound to ``verifier``, recording each verdict (a ``None`` from the FastAPI
    hot path, no cached verdict, is not one: the full verification that follows is)."""

    def record(started: float, dpop_proof: object, error: VerificationError | None) -> None:
        scheme = "bearer" if dpop_proof is None else "dpop"
        telemetry.verified(scheme, time.perf_counter() - started, error)

    if is_async:

        async def measured_async(token: str, *, dpop_proof: Any = None, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                claims = await method(verifier, token, dpop_proof=dpop_proof, **kwargs)
            except VerificationError as exc:
                record(started, dpop_proof, exc)
                raise
            record(started, dpop_proof, None)
            return claims

        return measured_async

    def measured(token: str, *, dpop_proof: Any = None, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            claims = method(verifier, token, dpop_proof=dpop_proof, **kwargs)
        except VerificationError as exc:
            record(started, dpop_proof, exc)
            raise
        if claims is not None:
            record(started, dpop_proof, None)
        return claims

    return measured
