"""What the OpenTelemetry instrumentation costs on the two hot paths, in one run (~1 minute).

    .venv/bin/pip install -e '.[dev]'     # opentelemetry-api and -sdk
    .venv/bin/python benchmarks/bench_otel.py [--baseline REF]

(a) a warm ``BearerAuth`` request (httpx, in-process transport) and (b) a repeated-token
``TokenVerifier.verify()``, each for three candidates that take turns within every pass:

* ``baseline``: the package as it was before the instrumentation (``--baseline``, a git ref;
  its ``m2m_client`` is extracted with ``git archive`` and imported under another name);
* ``api, no SDK``: this checkout with ``opentelemetry-api`` installed and no SDK configured
  (the global providers are OpenTelemetry's proxies): what every user without an SDK pays;
* ``baseline again``: a second object of the baseline (an A/A control: the noise floor);
* ``SDK``: this checkout with an SDK meter provider and tracer provider injected (an
  in-memory metric reader, no span processor).

Ratios are medians of the per-pass ratios to the baseline of the same pass (2 shared noisy
cores: pairing cancels most of the drift), not ratios of separately taken medians.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

import m2m_client
from m2m_client.testing import LocalIssuer
from m2m_client.verify import TokenVerifier

BASELINE_REF = "56bcc3d"  # main just before issue 22
TOKEN_URL = "https://as.example.com/oauth/token"
API = "https://api.example.com/data"


def baseline_package(ref: str) -> Any:
    """``m2m_client`` as of ``ref``, imported as ``m2m_client_baseline``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "m2m_client"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    target = Path(tempfile.mkdtemp(prefix="m2m-baseline-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    package = target / "m2m_client_baseline"
    (target / "m2m_client").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\bm2m_client\b(?=[.\s,;)]|$)", "m2m_client_baseline", text))
    sys.path.insert(0, str(target))
    return importlib.import_module("m2m_client_baseline")


def sdk_providers() -> dict[str, Any]:
    return {
        "meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()]),
        "tracer_provider": TracerProvider(),
    }


def api_handler(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/oauth/token":
        body = {"access_token": "t1", "token_type": "Bearer", "expires_in": 3600}
        return httpx.Response(200, json=body)
    return httpx.Response(200, content=b"ok")


def bearer_candidates(base: Any) -> dict[str, Callable[[], Any]]:
    transport = httpx.MockTransport(api_handler)
    out: dict[str, Callable[[], Any]] = {}
    for name, package, extra in (
        ("baseline", base, {}),
        ("baseline again", base, {}),
        ("api, no SDK", m2m_client, {}),
        ("SDK", m2m_client, sdk_providers()),
    ):
        creds = package.ClientCredentials(token_url=TOKEN_URL, client_id="b", client_secret="s")
        tokens = package.TokenClient(creds, http_client=httpx.Client(transport=transport), **extra)
        http = httpx.Client(transport=transport, auth=package.BearerAuth(tokens))
        http.get(API)  # warm: the token is cached
        out[name] = lambda http=http: http.get(API)
    return out


def verify_candidates(base: Any) -> dict[str, Callable[[], Any]]:
    issuer = LocalIssuer(url="https://issuer.bench/")
    token = issuer.mint()
    out: dict[str, Callable[[], Any]] = {}
    baseline_verifier = importlib.import_module("m2m_client_baseline.verify").TokenVerifier
    for name, cls, extra in (
        ("baseline", baseline_verifier, {}),
        ("baseline again", baseline_verifier, {}),
        ("api, no SDK", TokenVerifier, {}),
        ("SDK", TokenVerifier, sdk_providers()),
    ):
        verifier = cls(
            issuer=issuer.url,
            audience=issuer.audience,
            jwks_url=issuer.jwks_url,
            http_client=httpx.Client(transport=issuer.transport()),
            **extra,
        )
        verifier.verify(token)  # warm: the key set and the verdict are cached
        out[name] = lambda verifier=verifier: verifier.verify(token)
    return out


def compare(title: str, candidates: dict[str, Callable[[], Any]], passes: int, n: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates.items())
    for i in range(passes):
        # Take turns within each pass, starting with another candidate each time: the
        # first of a pass is not always the one that finds the caches cold.
        for name, call in order[i % len(order) :] + order[: i % len(order)]:
            start = time.perf_counter()
            for _ in range(n):
                call()
            times[name].append((time.perf_counter() - start) / n)
    base = times["baseline"]
    print(f"\n{title}: median µs per call ({passes} passes x {n} calls)")
    print(f"  {'candidate':<14}{'µs':>10}{'vs baseline':>14}")
    for name, samples in times.items():
        ratio = statistics.median(s / b for s, b in zip(samples, base, strict=True))
        print(f"  {name:<14}{statistics.median(samples) * 1e6:>10.2f}{ratio:>13.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE_REF, help="git ref before the change")
    parser.add_argument("--passes", type=int, default=21)
    args = parser.parse_args()
    base = baseline_package(args.baseline)
    compare("warm BearerAuth request (sync httpx)", bearer_candidates(base), args.passes, 2000)
    compare("repeated-token TokenVerifier.verify()", verify_candidates(base), args.passes, 20000)


if __name__ == "__main__":
    main()
