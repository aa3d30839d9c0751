"""Configuration of a client-credentials client: one validated, immutable object.

Every invalid value raises :class:`~m2m_client.errors.ConfigurationError` naming the field
(and, from :meth:`ClientCredentials.from_env`, the environment variable); never pydantic's
``ValidationError``, and never the value of a secret.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ._dpop import DPoPKey
from ._jose import MIN_RSA_BITS
from ._urls import check_url
from .assertions import AssertionSource, as_source
from .errors import ConfigurationError

__all__ = ["AuthMethod", "ClientCredentials", "SigningAlgorithm"]

AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt"]
SigningAlgorithm = Literal["RS256", "PS256", "ES256"]


# Parameters the client itself controls: letting `extra_params` override them would
# silently change the grant or the client authentication (RFC 6749 §4.4.2, RFC 7523 §2.2).
_RESERVED_PARAMS = frozenset(
    {
        "grant_type",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "scope",
        "audience",
        "resource",
    }
)

# Variables read by from_env, in priority order per field (M2M_* wins over AUTH0_*).
_ENV: dict[str, tuple[str, ...]] = {
    "token_url": ("M2M_TOKEN_URL", "AUTH0_DOMAIN"),
    "issuer": ("M2M_ISSUER", "AUTH0_DOMAIN"),
    "client_id": ("M2M_CLIENT_ID", "AUTH0_CLIENT_ID"),
    "client_secret": ("M2M_CLIENT_SECRET", "AUTH0_CLIENT_SECRET"),
    "client_secret_file": ("M2M_CLIENT_SECRET_FILE",),
    "private_key": ("M2M_PRIVATE_KEY",),
    # A file is read again when it changes (issue 21): the key rotates without a restart.
    "private_key_file": ("M2M_PRIVATE_KEY_FILE",),
    "client_assertion": ("M2M_CLIENT_ASSERTION_FILE",),
    "private_key_id": ("M2M_PRIVATE_KEY_ID",),
    "signing_algorithm": ("M2M_SIGNING_ALGORITHM",),
    "auth_method": ("M2M_AUTH_METHOD",),
    "audience": ("M2M_AUDIENCE", "AUTH0_AUDIENCE"),
    "resource": ("M2M_RESOURCE",),
    "scope": ("M2M_SCOPE",),
    "timeout": ("M2M_TIMEOUT",),
    # M2M_DPOP_KEY_FILE (a PEM private key) wins: it implies DPoP with that key.
    "dpop": ("M2M_DPOP_KEY_FILE", "M2M_DPOP"),
}


# The words M2M_DPOP (or a string dpop=) accepts, as pydantic's lax booleans do.
_DPOP_WORDS = {
    **dict.fromkeys(("true", "1", "yes", "on", "y", "t"), True),
    **dict.fromkeys(("false", "0", "no", "off", "n", "f"), False),
}


# Lets __init__ name the environment variables when called from from_env (pydantic calls
# a custom __init__ even from model_validate, so a parameter cannot carry this).
_ENV_SOURCES: ContextVar[dict[str, str] | None] = ContextVar("_ENV_SOURCES", default=None)


class _FieldProblem(ValueError):
    """A cross-field check failed; carries the field to blame in the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def validate_endpoint_url(value: str, *, what: str = "URL") -> str:
    """Accept https URLs; plain http only on loopback or ``M2M_INSECURE_HTTP_HOSTS`` hosts.

    Client credentials travel to this URL (RFC 6749 §2.3.1 requires TLS); userinfo is
    refused because it would end up in logs. Raises ``ValueError`` (see ``_urls.check_url``).
    """
    return check_url(value, what=what)


def _split_scope(value: str) -> list[str]:
    return [s for s in value.replace(",", " ").split() if s]


# --- field validators (module functions, attached to the fields in ClientCredentials) ---


def _check_url(value: str | None) -> str | None:
    return None if value is None else validate_endpoint_url(value)


def _check_assertion_audience(value: str | None) -> str | None:
    if value is None or value in ("issuer", "token_endpoint"):
        return value
    return validate_endpoint_url(value)


def _normalise_scope(value: object) -> object:
    if value is None:
        return ()
    items: list[object]
    if isinstance(value, str):
        items = list(_split_scope(value))
    elif isinstance(value, list | tuple | set | frozenset):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise ValueError("every scope must be a string")
            items.extend(_split_scope(item))
    else:
        raise ValueError("must be a string or a list of strings")
    # RFC 6749 §3.3: scope is a set; keep first-seen order for the request.
    return tuple(dict.fromkeys(items))


def _check_dpop(value: object) -> object:
    # pydantic's own message names its union internals ("dpop.bool", "is-instance[...]");
    # say which values work instead.
    if isinstance(value, bool | DPoPKey):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _DPOP_WORDS:
        return _DPOP_WORDS[value.strip().lower()]
    shown = repr(value) if isinstance(value, str) and len(value) <= 20 else type(value).__name__
    raise ValueError(
        f"{shown} is not accepted: use true or false (also 1/0, yes/no, on/off), or a "
        "DPoPKey (from the environment: M2M_DPOP_KEY_FILE=<PEM private key>)"
    )


def _check_assertion(value: object) -> object:
    return None if value is None else as_source(value)


def _check_file(value: object) -> object:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"must be a path, not {type(value).__name__}")
    path = Path(value)
    read_credential_file(path)  # now, so that a wrong path fails at start-up
    return path


def _check_extra(value: dict[str, str]) -> dict[str, str]:
    clash = sorted(_RESERVED_PARAMS & value.keys())
    if clash:
        raise ValueError(f"may not set {', '.join(clash)}; use the dedicated fields")
    return value


class ClientCredentials(BaseModel):
    """Everything needed to get client-credentials tokens from one authorization server.

    Give ``token_url``, or ``issuer`` alone to find the token endpoint by discovery
    (OpenID Connect, then RFC 8414). Authenticate with ``client_secret`` or with
    ``private_key`` (PEM; RFC 7523 ``private_key_jwt``)::

        creds = ClientCredentials(
            token_url="https://tenant.example.com/oauth/token",
            client_id="worker", client_secret="s3cret",
            audience="https://api.example.com", scope="read:data",
        )
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", hide_input_in_errors=True, arbitrary_types_allowed=True
    )

    token_url: str | None = None
    """Token endpoint. Takes precedence over discovery when ``issuer`` is also set."""
    issuer: str | None = None
    """Issuer identifier; the token endpoint is discovered from its metadata."""
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    private_key: SecretStr | None = None
    """PEM private key (RSA or EC P-256) for ``private_key_jwt``."""
    client_secret_file: Path | None = None
    """A file holding the secret (Docker/Kubernetes secrets): read again when it changes,
    and once more when the server answers ``invalid_client``."""
    private_key_file: Path | None = None
    """A PEM file holding ``private_key``: read again when it changes, and once more on
    ``invalid_client``."""
    client_assertion: AssertionSource | None = None
    """A client assertion someone else signs (issue 21): a path (read again when it
    changes), a sync or async callable returning the JWT, or a source from
    :mod:`m2m_client.assertions`. Sent as an RFC 7523 ``jwt-bearer`` client assertion."""
    private_key_id: str | None = None
    """``kid`` put in the client assertion header."""
    signing_algorithm: SigningAlgorithm | None = None
    """Client assertion algorithm; defaults to RS256 for RSA keys, ES256 for EC keys."""
    assertion_audience: str | None = None
    """``aud`` of the ``private_key_jwt`` assertion: ``"issuer"``, ``"token_endpoint"`` or
    an explicit URL. Default (``None``): the issuer identifier when ``issuer`` is set
    (draft-ietf-oauth-rfc7523bis), except for Entra ID and Okta hosts, which want the token
    endpoint; without ``issuer``, the token endpoint (RFC 7523 §3). docs/no-stored-secret.md
    says which server wants what."""
    auth_method: AuthMethod | None = None
    """Defaults to client_secret_basic with a secret, private_key_jwt with a key."""
    audience: str | None = None
    """Sent as ``audience`` (Auth0 and others)."""
    resource: str | None = None
    """Sent as ``resource`` (RFC 8707)."""
    scope: tuple[str, ...] = ()
    """Scopes requested; accepts a space/comma separated string or a list."""
    extra_params: dict[str, str] = Field(default_factory=dict)
    """Additional form parameters for the token request."""
    timeout: float = Field(default=10.0, gt=0, le=300)
    """Seconds allowed for one request to the authorization server."""
    dpop: bool | DPoPKey = False
    """DPoP (RFC 9449) sender-constrained tokens: ``True`` makes a fresh ES256 key per
    token client object; a :class:`~m2m_client.DPoPKey` (``DPoPKey.from_pem(...)``) is a
    key you keep, e.g. one a fleet sharing cached tokens shares."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            sources = _ENV_SOURCES.get()
            # from None: the message already names every field and variable; pydantic's
            # traceback in front of it only buries the one line a user needs.
            raise _configuration_error(exc, sources or {}, from_env=sources is not None) from None

    def __repr__(self) -> str:
        return (
            f"ClientCredentials(token_url={self.token_url!r}, issuer={self.issuer!r}, "
            f"client_id={self.client_id!r}, auth_method={self.auth_method!r}, "
            f"audience={self.audience!r}, resource={self.resource!r}, scope={self.scope!r}"
            f"{f', dpop={self.dpop!r}' if self.dpop is not False else ''})"
        )

    __str__ = __repr__

    # The rules of each field (module functions above), then the rules between fields.
    _urls = field_validator("token_url", "issuer")(_check_url)
    _aud = field_validator("assertion_audience")(_check_assertion_audience)
    _scope = field_validator("scope", mode="before")(_normalise_scope)
    _dpop = field_validator("dpop", mode="before")(_check_dpop)
    _assertion = field_validator("client_assertion", mode="before")(_check_assertion)
    _files = field_validator("client_secret_file", "private_key_file", mode="before")(_check_file)
    _extra = field_validator("extra_params")(_check_extra)

    @model_validator(mode="after")
    def _consistent(self) -> ClientCredentials:
        _check_consistency(self)  # the rules between fields, and the derived defaults
        return self

    @property
    def endpoint_id(self) -> str:
        """The token URL, or the issuer when the token URL comes from discovery."""
        return self.token_url or self.issuer or ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientCredentials:
        """Read ``M2M_*`` variables, falling back to Auth0's ``AUTH0_*`` names.

        ``AUTH0_DOMAIN=tenant.auth0.com`` means token URL ``https://tenant.auth0.com/oauth/token``
        and issuer ``https://tenant.auth0.com/``. ``M2M_PRIVATE_KEY_FILE`` names a PEM file.
        Each ``M2M_*`` variable wins over its ``AUTH0_*`` twin; ``AUTH0_DOMAIN`` is not read
        once ``M2M_TOKEN_URL`` or ``M2M_ISSUER`` is set. Twins set to different values: a
        ``UserWarning`` naming both (never their values).
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        sources: dict[str, str] = {}
        ignored = _auth0_overridden(env)
        for field, names in _ENV.items():
            for name in names:
                raw = env.get(name)
                if raw is None or raw.strip() == "" or name in ignored:
                    continue
                sources[field] = name
                data[field] = _from_env_value(field, name, raw.strip())
                break
        _azure_workload_identity(env, data, sources)
        _warn_unknown_variables(env)
        marker = _ENV_SOURCES.set(sources)
        try:
            return cls(**data)
        except ConfigurationError as exc:
            # A misspelt variable is the likely cause: say so here, where the user looks.
            hints = _typo_hints(env)
            if not hints:
                raise
            raise ConfigurationError(f"{exc}; {hints}") from None
        finally:
            _ENV_SOURCES.reset(marker)


def _check_consistency(creds: ClientCredentials) -> None:
    """The rules between fields; fills in the derived ``auth_method`` and ``signing_algorithm``."""
    if creds.token_url is None and creds.issuer is None:
        raise _FieldProblem("token_url", "token_url or issuer is required")
    method = creds.auth_method
    for one, two in (
        ("client_secret", "client_secret_file"),
        ("private_key", "private_key_file"),
    ):
        if getattr(creds, one) is not None and getattr(creds, two) is not None:
            raise _FieldProblem(two, f"give {one} or {two}, not both")
    if creds.client_assertion is not None:
        others = [
            name
            for name in (
                "client_secret",
                "client_secret_file",
                "private_key",
                "private_key_file",
            )
            if getattr(creds, name) is not None
        ]
        if others:
            raise _FieldProblem(
                "client_assertion", f"a client assertion replaces {others[0]}: give one"
            )
        if method not in (None, "private_key_jwt"):
            raise _FieldProblem(
                "auth_method", "a client assertion is sent as private_key_jwt (RFC 7523)"
            )
        creds.__dict__["auth_method"] = "private_key_jwt"
        return
    has_secret = bool(
        creds.client_secret is not None and creds.client_secret.get_secret_value()
    ) or (creds.client_secret_file is not None)
    has_key = bool(creds.private_key is not None and creds.private_key.get_secret_value()) or (
        creds.private_key_file is not None
    )
    if method is None:
        if has_secret and has_key:
            raise _FieldProblem(
                "auth_method", "both a secret and a private key given: set auth_method"
            )
        if not has_secret and not has_key:
            raise _FieldProblem("client_secret", "client_secret or private_key is required")
        method = "private_key_jwt" if has_key else "client_secret_basic"
        creds.__dict__["auth_method"] = method
    if creds.assertion_audience == "issuer" and creds.issuer is None:
        raise _FieldProblem("assertion_audience", '"issuer" needs issuer to be set')
    if method == "private_key_jwt":
        if not has_key:
            raise _FieldProblem("private_key", "private_key_jwt needs private_key")
        if creds.private_key is not None:
            pem, field = creds.private_key.get_secret_value(), "private_key"
        else:
            assert creds.private_key_file is not None  # has_key
            pem, field = read_credential_file(creds.private_key_file), "private_key_file"
        _, creds.__dict__["signing_algorithm"] = load_private_key(
            pem, creds.signing_algorithm, field
        )
    elif not has_secret:
        raise _FieldProblem("client_secret", f"{method} needs client_secret")


AZURE_AUTHORITY = "https://login.microsoftonline.com"


def _azure_workload_identity(
    env: Mapping[str, str], data: dict[str, Any], sources: dict[str, str]
) -> None:
    """Azure workload identity (issue 21): a pod with ``AZURE_FEDERATED_TOKEN_FILE``,
    ``AZURE_CLIENT_ID`` and ``AZURE_TENANT_ID`` needs no ``M2M_*`` besides ``M2M_SCOPE``.

    The token URL is ``{AZURE_AUTHORITY_HOST}/{tenant}/oauth2/v2.0/token`` (Entra ID v2), the
    federated token file the client assertion. Any ``M2M_*`` variable set wins; a client
    secret or key from ``M2M_*`` means the Azure variables are not used at all.
    """

    def value(name: str) -> str | None:
        raw = env.get(name)
        return raw.strip() if raw is not None and raw.strip() else None

    token_file = value("AZURE_FEDERATED_TOKEN_FILE")
    credential = ("client_secret", "client_secret_file", "private_key", "private_key_file")
    if token_file is None or "client_assertion" in data or any(f in data for f in credential):
        return
    data["client_assertion"], sources["client_assertion"] = token_file, "AZURE_FEDERATED_TOKEN_FILE"
    client_id = value("AZURE_CLIENT_ID")
    if "client_id" not in data and client_id:
        data["client_id"], sources["client_id"] = client_id, "AZURE_CLIENT_ID"
    tenant = value("AZURE_TENANT_ID")
    if "token_url" not in data and "issuer" not in data:
        if tenant is None:
            raise ConfigurationError(
                "ClientCredentials.token_url: AZURE_FEDERATED_TOKEN_FILE is set but "
                "AZURE_TENANT_ID is not (or set M2M_TOKEN_URL)"
            )
        authority = (value("AZURE_AUTHORITY_HOST") or AZURE_AUTHORITY).rstrip("/")
        data["token_url"] = f"{authority}/{tenant}/oauth2/v2.0/token"
        sources["token_url"] = "AZURE_AUTHORITY_HOST/AZURE_TENANT_ID"
    if not data.get("scope"):
        # Entra's client credentials grant requires scope=<resource>/.default.
        raise ConfigurationError(
            "ClientCredentials.scope: Azure workload identity needs a scope: set M2M_SCOPE "
            "(for Entra ID, '<application ID URI>/.default')"
        )


# Auth0's names and the M2M_* variables that replace them. AUTH0_DOMAIN stands for the
# endpoint (token URL and issuer): once either M2M_TOKEN_URL or M2M_ISSUER is set it is not
# read at all, or a leftover AUTH0_DOMAIN would fill token_url (which wins over discovery)
# and send the client secret to Auth0 instead of the issuer the operator named.
_AUTH0_REPLACED_BY: dict[str, tuple[str, ...]] = {
    "AUTH0_DOMAIN": ("M2M_TOKEN_URL", "M2M_ISSUER"),
    "AUTH0_CLIENT_ID": ("M2M_CLIENT_ID",),
    "AUTH0_CLIENT_SECRET": ("M2M_CLIENT_SECRET",),
    "AUTH0_AUDIENCE": ("M2M_AUDIENCE",),
}


def _auth0_overridden(env: Mapping[str, str]) -> set[str]:
    """The ``AUTH0_*`` variables not read because an ``M2M_*`` one replaces them.

    A conflict (both set, to different values) is a warning naming both variables, never
    their values: the ``M2M_*`` value is used. Not an error: Auth0's own SDKs read
    ``AUTH0_CLIENT_ID`` / ``AUTH0_CLIENT_SECRET`` for another application (user login) of
    the same tenant, so both sets legitimately live in one environment.
    """
    ignored: set[str] = set()

    def value(name: str) -> str | None:
        raw = env.get(name)
        return raw.strip() if raw is not None and raw.strip() else None

    for auth0, replacements in _AUTH0_REPLACED_BY.items():
        theirs = value(auth0)
        if theirs is None:
            continue
        for m2m in replacements:
            ours = value(m2m)
            if ours is None:
                continue
            ignored.add(auth0)
            if not _equivalent(auth0, theirs, m2m, ours):
                if auth0 == "AUTH0_CLIENT_ID":
                    # AUTH0_CLIENT_SECRET is that other client's secret: never this one's.
                    ignored.add("AUTH0_CLIENT_SECRET")
                warnings.warn(
                    f"environment variables {m2m} and {auth0} are both set and differ: "
                    f"{m2m} is used and {auth0} is ignored; unset the one you do not mean",
                    UserWarning,
                    stacklevel=3,
                )
    return ignored


def _equivalent(auth0: str, theirs: str, m2m: str, ours: str) -> bool:
    if auth0 != "AUTH0_DOMAIN":
        return theirs == ours
    field = "token_url" if m2m == "M2M_TOKEN_URL" else "issuer"
    derived = str(_from_env_value(field, auth0, theirs))
    return derived.rstrip("/") == ours.rstrip("/")


def _from_env_value(field: str, name: str, raw: str) -> object:
    if name == "AUTH0_DOMAIN":
        host = raw.removeprefix("https://").removeprefix("http://").strip("/")
        return f"https://{host}/oauth/token" if field == "token_url" else f"https://{host}/"
    if name == "M2M_DPOP_KEY_FILE":
        try:
            pem = Path(raw).read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"dpop: cannot read the file named by M2M_DPOP_KEY_FILE ({exc.strerror})"
            ) from None
        try:
            return DPoPKey.from_pem(pem)
        except ConfigurationError as exc:
            raise ConfigurationError(f"dpop (M2M_DPOP_KEY_FILE): {exc}") from None
    if name == "M2M_PRIVATE_KEY":
        # Environments often hold PEM with literal "\n"; real newlines are required.
        return raw.replace("\\n", "\n")
    return raw


MAX_CREDENTIAL_FILE_BYTES = 64 * 1024
"""A secret or a PEM key is at most a few KiB; a larger file is refused, not read."""


def read_credential_file(path: Path) -> str:
    """The stripped text of a secret or key file; ``ValueError`` says why not (never what)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CREDENTIAL_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the file {str(path)!r} ({exc.strerror})") from None
    if len(data) > MAX_CREDENTIAL_FILE_BYTES:
        raise ValueError(f"the file {str(path)!r} is larger than {MAX_CREDENTIAL_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"the file {str(path)!r} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"the file {str(path)!r} is empty")
    return text


def load_private_key(
    pem: str, algorithm: SigningAlgorithm | None, field: str = "private_key"
) -> tuple[Any, SigningAlgorithm]:
    """The ``private_key_jwt`` signing key of ``pem`` and the algorithm it signs with.

    The one set of rules for a client's key, applied at construction and to every key a
    ``private_key_file`` is rotated to: unencrypted PEM, RSA of 2048 bits or more or EC
    P-256, and matching ``algorithm`` when given. A ``ValueError`` (naming ``field`` or
    ``signing_algorithm``, never the key) says which rule failed.
    """
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        loaded = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        # The cryptography message is generic, but never risk echoing key material.
        raise _FieldProblem(field, "is not an unencrypted PEM private key") from exc
    if isinstance(loaded, rsa.RSAPrivateKey):
        if loaded.key_size < MIN_RSA_BITS:
            raise _FieldProblem(field, f"RSA keys must have at least {MIN_RSA_BITS} bits")
        if algorithm is None:
            return loaded, "RS256"
        if algorithm not in ("RS256", "PS256"):
            raise _FieldProblem("signing_algorithm", f"{algorithm} does not match an RSA key")
        return loaded, algorithm
    if isinstance(loaded, ec.EllipticCurvePrivateKey):
        if not isinstance(loaded.curve, ec.SECP256R1):
            raise _FieldProblem(field, "EC keys must use the P-256 curve (ES256)")
        if algorithm not in (None, "ES256"):
            raise _FieldProblem("signing_algorithm", f"{algorithm} does not match an EC P-256 key")
        return loaded, "ES256"
    raise _FieldProblem(field, "must be an RSA or EC P-256 private key")


def _configuration_error(
    exc: ValidationError, sources: Mapping[str, str], *, from_env: bool = False
) -> ConfigurationError:
    problems: list[str] = []
    for error in exc.errors(include_input=False, include_url=False):
        cause = (error.get("ctx") or {}).get("error")
        loc = error.get("loc") or ()
        field = cause.field if isinstance(cause, _FieldProblem) else ".".join(map(str, loc))
        message = str(cause) if isinstance(cause, ValueError) else error["msg"]
        message = message.removeprefix("Value error, ")
        where = f"ClientCredentials.{field}" if field else "ClientCredentials"
        top = field.split(".")[0] if field else ""
        if top in sources:
            where += f" (environment variable {sources[top]})"
        elif from_env and top == "token_url":
            where += " (set M2M_TOKEN_URL, or M2M_ISSUER for discovery, or AUTH0_DOMAIN)"
        elif from_env and top in _ENV:
            where += f" (set {' or '.join(_ENV[top])})"
        problems.append(f"{where}: {message}")
    return ConfigurationError("; ".join(problems) or "invalid ClientCredentials")


# M2M_* names other parts of m2m-client (or its examples) read, so that from_env does not
# call them unknown. Add yours here when you read a new M2M_* variable.
_OTHER_ENV_VARIABLES = {
    "M2M_API_URL",  # examples: the API a worker calls
    "M2M_ROLES_CLAIM",  # examples: where the API reads roles
    "M2M_INSECURE_HTTP_HOSTS",  # _urls.py: hosts allowed over plain http
    "M2M_CACHE_KEY",  # cache/: the shared cache's encryption key (by convention)
    "M2M_REDIS_URL",  # the CLI and the examples: the fleet-shared token cache
    "M2M_TEST_STACK",  # this project's test suite
}


def _closest_known(name: str) -> str | None:
    """The known M2M_* variable ``name`` is probably a misspelling of, if any."""
    known = {name for names in _ENV.values() for name in names} | _OTHER_ENV_VARIABLES
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_variables(env: Mapping[str, str]) -> list[str]:
    known = {name for names in _ENV.values() for name in names} | _OTHER_ENV_VARIABLES
    return [name for name in sorted(env) if name.startswith("M2M_") and name not in known]


def _typo_hints(env: Mapping[str, str]) -> str:
    """``"M2M_CLIENT_SECRT is set: did you mean M2M_CLIENT_SECRET?"`` for each likely typo."""
    hints = []
    for name in _unknown_variables(env):
        close = _closest_known(name)
        if close is not None and not (env.get(close) or "").strip():
            hints.append(f"{name} is set: did you mean {close}?")
    return " ".join(hints)


def _warn_unknown_variables(env: Mapping[str, str]) -> None:
    for name in _unknown_variables(env):
        close = _closest_known(name)
        hint = f"; did you mean {close}?" if close else ""
        warnings.warn(
            f"environment variable {name} is not read by ClientCredentials.from_env{hint}",
            UserWarning,
            stacklevel=3,
        )
