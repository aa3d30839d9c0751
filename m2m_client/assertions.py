"""Client assertions from the platform: no stored secret (issue 21).

A source hands out an RFC 7523 client assertion (a JWT someone else signed: the kubelet's
projected service-account token, Azure workload identity's federated token, GitHub Actions'
OIDC token) which the token client sends as ``client_assertion`` with
``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer``::

    ClientCredentials(
        token_url="https://idp.example.com/oauth/token",
        client_id="worker",
        client_assertion="/var/run/secrets/tokens/idp-token",  # a FileAssertion
    )

``client_assertion`` also takes a sync or async callable returning the JWT, or a source
object from this module. Every source:

* never hands out an assertion whose ``exp`` is within ``margin`` seconds: it reads again,
  then raises :class:`~m2m_client.errors.AssertionExpired`;
* raises :class:`~m2m_client.errors.CredentialUnavailable` naming itself (a path, a callable's
  name, a URL) when it cannot be read, never what it holds;
* shows neither the assertion nor any token in ``repr()``.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from ._token import jwt_expiry
from .errors import AssertionExpired, ConfigurationError, CredentialUnavailable

__all__ = [
    "AssertionSource",
    "CallableAssertion",
    "FileAssertion",
    "GitHubActionsAssertion",
    "SpiffeAssertion",
    "asserted_identity",
]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_MARGIN = 30.0
"""Seconds before its ``exp`` an assertion is no longer sent: the request's flight time plus
clock skew. The kubelet rewrites a projected token at 80 % of its life (at least 10 minutes),
so a file it maintains is never this close to its end."""
MAX_ASSERTION_BYTES = 16 * 1024
"""A JWT assertion is 1-2 KiB; a larger file is not one (and is not read into memory)."""


def asserted_identity(assertion: str) -> tuple[str, str, str] | None:
    """``(iss, sub, aud)`` of a JWT assertion, read WITHOUT verification.

    Only to decide which cached tokens the assertion's holder shares (the server verifies
    it). ``aud`` as a list is normalised (sorted, JSON). ``None`` when it is not a JWT with a
    JSON object payload.
    """
    parts = assertion.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    aud = payload.get("aud")
    if isinstance(aud, list):
        aud = json.dumps(sorted(str(a) for a in aud))
    return (str(payload.get("iss")), str(payload.get("sub")), str(aud))


class AssertionSource:
    """Base of every assertion source. Subclasses implement :meth:`_read` (and may override
    :meth:`_aread` for real async I/O); this class adds the expiry rule and a cached value."""

    assertion_type: str = JWT_BEARER
    """Sent as ``client_assertion_type``."""

    def __init__(self, *, margin: float = DEFAULT_MARGIN) -> None:
        if not 0 <= margin <= 3600:
            raise ConfigurationError("assertion margin must be between 0 and 3600 seconds")
        self.margin = float(margin)
        self._value: str | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        """Where the assertion comes from (a path, a name, a URL): safe to log."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def _usable(self, value: str, now: float) -> bool:
        exp = jwt_expiry(value)
        return exp is None or exp - now > self.margin

    def _stale(self, now: float) -> bool:
        """The cached value must be read again (subclasses add their own reasons)."""
        return self._value is None or not self._usable(self._value, now)

    def _read(self) -> str:
        raise NotImplementedError

    async def _aread(self) -> str:
        return self._read()

    def _accept(self, value: object, now: float) -> str:
        if not isinstance(value, str) or not value.strip():
            raise CredentialUnavailable(
                f"client assertion from {self.describe()}: got no assertion "
                f"(a non-empty string is required, got {type(value).__name__})"
            )
        value = value.strip()
        if not self._usable(value, now):
            raise AssertionExpired(
                f"client assertion from {self.describe()} expires within {self.margin:g} s "
                "even after reading it again: not sent (is the platform still rotating it?)"
            )
        self._value = value
        return value

    def peek(self) -> str | None:
        """The last assertion read, without I/O (``None`` before the first read)."""
        return self._value

    def get(self, now: float, *, reload: bool = False) -> str:
        """A usable assertion at ``now``: the cached one, or read again."""
        with self._lock:
            if not reload and not self._stale(now):
                assert self._value is not None
                return self._value
            return self._accept(self._read(), now)

    async def aget(self, now: float, *, reload: bool = False) -> str:
        """:meth:`get` for async clients (an async callable is awaited here)."""
        if not reload and not self._stale(now):
            assert self._value is not None
            return self._value
        return self._accept(await self._aread(), now)


class FileAssertion(AssertionSource):
    """An assertion in a file the platform rewrites (Kubernetes projected token, Azure's
    ``AZURE_FEDERATED_TOKEN_FILE``). Read again whenever the file's inode, size or mtime
    changes: the kubelet's atomic symlink swap (``..data`` pointing to a new directory) gives
    the path a new inode, so every rotation is seen at the next token request."""

    def __init__(self, path: str | os.PathLike[str], *, margin: float = DEFAULT_MARGIN) -> None:
        super().__init__(margin=margin)
        self.path = Path(path)
        self._signature: tuple[int, int, int, int] | None = None

    def describe(self) -> str:
        return f"file {str(self.path)!r}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileAssertion):
            return NotImplemented
        return (self.path, self.margin) == (other.path, other.margin)

    def __hash__(self) -> int:
        return hash((FileAssertion, self.path, self.margin))

    def _stale(self, now: float) -> bool:
        if super()._stale(now):
            return True
        try:
            st = os.stat(self.path)  # follows the symlink: a swap is a new inode
        except OSError:
            return True  # _read says why
        return _signature(st) != self._signature

    def _read(self) -> str:
        try:
            # One open file for stat and read: the signature describes what was read.
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(MAX_ASSERTION_BYTES + 1)
        except OSError as exc:
            raise CredentialUnavailable(
                f"client assertion from {self.describe()}: cannot read it ({exc.strerror})"
            ) from None
        if len(data) > MAX_ASSERTION_BYTES:
            raise CredentialUnavailable(
                f"client assertion from {self.describe()}: larger than {MAX_ASSERTION_BYTES} "
                "bytes, not a JWT"
            )
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise CredentialUnavailable(
                f"client assertion from {self.describe()}: not ASCII text, not a JWT"
            ) from None
        self._signature = _signature(st)
        return text


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class CallableAssertion(AssertionSource):
    """An assertion from your own function, sync or async (``AsyncTokenClient`` only for an
    async one). Its result is kept while usable (until ``margin`` seconds before its ``exp``),
    so the function runs about once per assertion lifetime, not once per token request."""

    def __init__(
        self, function: Callable[[], str | Awaitable[str]], *, margin: float = DEFAULT_MARGIN
    ) -> None:
        super().__init__(margin=margin)
        if not callable(function):
            raise ConfigurationError("client_assertion callable is not callable")
        self.function = function

    def describe(self) -> str:
        name = getattr(self.function, "__qualname__", None) or type(self.function).__name__
        return f"callable {name}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CallableAssertion):
            return NotImplemented
        return self.function is other.function and self.margin == other.margin

    def __hash__(self) -> int:
        return hash((CallableAssertion, id(self.function), self.margin))

    def _call(self) -> object:
        try:
            return self.function()
        except Exception as exc:
            # The type only: the function's own message is not ours to vouch for.
            raise CredentialUnavailable(
                f"client assertion from {self.describe()}: it raised {type(exc).__name__}"
            ) from exc

    def _read(self) -> str:
        value = self._call()
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()  # never awaited: no "coroutine was never awaited" warning
            raise ConfigurationError(
                f"client assertion from {self.describe()} is async: use AsyncTokenClient"
            )
        return value  # type: ignore[return-value]  # _accept checks the type

    async def _aread(self) -> str:
        value = self._call()
        if inspect.isawaitable(value):
            try:
                value = await value
            except Exception as exc:
                raise CredentialUnavailable(
                    f"client assertion from {self.describe()}: it raised {type(exc).__name__}"
                ) from exc
        return value  # type: ignore[return-value]


class GitHubActionsAssertion(AssertionSource):
    """GitHub Actions' OIDC token as the assertion (the job needs ``permissions: id-token:
    write``). Requests ``ACTIONS_ID_TOKEN_REQUEST_URL`` with the bearer
    ``ACTIONS_ID_TOKEN_REQUEST_TOKEN`` and ``audience=<audience>``; the answer is
    ``{"value": "<JWT>"}``. The token is kept while usable."""

    def __init__(
        self,
        audience: str | None = None,
        *,
        margin: float = DEFAULT_MARGIN,
        timeout: float = 10.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(margin=margin)
        self.audience = audience
        self.timeout = timeout
        self._environ = environ

    def describe(self) -> str:
        return f"GitHub Actions OIDC (audience={self.audience!r})"

    def _request(self) -> urllib.request.Request:
        env = os.environ if self._environ is None else self._environ
        url, bearer = (
            env.get("ACTIONS_ID_TOKEN_REQUEST_URL"),
            env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
        )
        if not url or not bearer:
            raise CredentialUnavailable(
                f"client assertion from {self.describe()}: ACTIONS_ID_TOKEN_REQUEST_URL and "
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN are not set (does the job have "
                "'permissions: id-token: write'?)"
            )
        if self.audience:
            sep = "&" if urllib.parse.urlsplit(url).query else "?"
            url += sep + urllib.parse.urlencode({"audience": self.audience})
        return urllib.request.Request(  # noqa: S310  # the runner's URL, https in Actions
            url, headers={"Authorization": f"bearer {bearer}", "Accept": "application/json"}
        )

    def _read(self) -> str:
        request = self._request()
        try:
            # No redirects: urllib would forward the bearer request token to any host.
            opener = urllib.request.build_opener(_NoRedirect)
            with opener.open(request, timeout=self.timeout) as answer:
                body = answer.read(64 * 1024 + 1)
        except urllib.error.HTTPError as exc:
            exc.close()  # its body is an open socket
            raise CredentialUnavailable(
                f"client assertion from {self.describe()}: HTTP {exc.code}"
            ) from None
        except (OSError, ValueError) as exc:
            raise CredentialUnavailable(
                f"client assertion from {self.describe()}: request failed ({type(exc).__name__})"
            ) from None
        try:
            data: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        value = data.get("value") if isinstance(data, dict) else None
        if not isinstance(value, str):
            raise CredentialUnavailable(
                f"client assertion from {self.describe()}: the answer has no string 'value'"
            )
        return value

    async def _aread(self) -> str:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self._read)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx is then raised as an HTTPError


JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
"""``client_assertion_type`` of a JWT-SVID for servers that want it (draft-ietf-oauth-spiffe-
client-auth); most accept a JWT-SVID as a plain ``jwt-bearer`` assertion."""


def _import_spiffe() -> Any:
    try:
        with warnings.catch_warnings():
            # spiffe's own import-time noise (cryptography's DSA deprecation), not ours.
            warnings.simplefilter("ignore")
            import spiffe
    except ImportError:
        raise ConfigurationError(
            "SpiffeAssertion needs the spiffe package: pip install 'm2m-client[spiffe]'"
        ) from None
    return spiffe


class SpiffeAssertion(AssertionSource):
    """A JWT-SVID from the SPIFFE Workload API (SPIRE agent) as the assertion, through the
    ``spiffe`` package (``pip install 'm2m-client[spiffe]'``).

    ``audience``: the ``aud`` to ask for (your authorization server). ``socket_path``: the
    Workload API socket (``unix:///run/spire/agent.sock``; default ``SPIFFE_ENDPOINT_SOCKET``).
    ``spiffe_id``: which of the workload's identities, when it has several.
    ``assertion_type="jwt-spiffe"`` sends ``client_assertion_type`` ``...:jwt-spiffe`` for
    servers that want it; the default is ``jwt-bearer``. The SVID is kept while usable."""

    def __init__(
        self,
        audience: str,
        *,
        socket_path: str | None = None,
        spiffe_id: str | None = None,
        assertion_type: str = "jwt-bearer",
        margin: float = DEFAULT_MARGIN,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(margin=margin)
        _import_spiffe()
        if not audience:
            raise ConfigurationError("SpiffeAssertion needs an audience")
        if assertion_type not in ("jwt-bearer", "jwt-spiffe"):
            raise ConfigurationError("assertion_type must be 'jwt-bearer' or 'jwt-spiffe'")
        self.audience, self.socket_path, self.spiffe_id = audience, socket_path, spiffe_id
        self.timeout = timeout
        self.assertion_type = JWT_SPIFFE if assertion_type == "jwt-spiffe" else JWT_BEARER

    def describe(self) -> str:
        where = self.socket_path or "SPIFFE_ENDPOINT_SOCKET"
        return f"SPIFFE Workload API {where} (audience={self.audience!r})"

    def _read(self) -> str:
        spiffe = _import_spiffe()
        try:
            subject = spiffe.SpiffeId(self.spiffe_id) if self.spiffe_id else None
            with spiffe.WorkloadApiClient(socket_path=self.socket_path) as client:
                svid = client.fetch_jwt_svid(
                    audience={self.audience}, subject=subject, timeout=self.timeout
                )
        except Exception as exc:  # spiffe's errors, grpc's, argument errors: all one thing here
            raise CredentialUnavailable(
                f"client assertion from {self.describe()}: {type(exc).__name__}"
            ) from None
        return str(svid.token)

    async def _aread(self) -> str:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self._read)


def as_source(value: object) -> AssertionSource:
    """``client_assertion=`` as a source: a path, a callable, or a source object."""
    if isinstance(value, AssertionSource):
        return value
    if isinstance(value, str | os.PathLike):
        if isinstance(value, str) and value.startswith("eyJ") and value.count(".") == 2:
            # Looks like a JWT itself: refuse, never echo it.
            raise ValueError(
                "looks like a JWT, not a path: a fixed assertion expires; pass the path of "
                "the file that holds it, or a callable"
            )
        return FileAssertion(value)
    if callable(value):
        return CallableAssertion(value)
    raise ValueError(
        f"must be a path, a callable or an m2m_client.assertions source, not {type(value).__name__}"
    )
