"""Claims: the read-only view of a verified token's payload, and the claim checks.

Decision on malformed authorization claims: a token whose ``scope``/``scp`` (string or
list of strings), ``permissions`` (list of strings), roles claim (list of strings or one
string) or client id (string) has another JSON type is rejected as
:class:`~m2m_client.errors.InvalidToken` when it is verified. The properties of a
:class:`Claims` therefore never fail, and a handler never sees a half-understood token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from m2m_client.errors import ExpiredToken, InsufficientPermissions, InvalidToken

__all__ = ["Claims", "ClaimsPolicy", "check_rights", "validate_payload"]

_MISSING = object()


class _FrozenDict(dict[str, Any]):
    """A dict that refuses mutation: verified claims are shared through the cache."""

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise TypeError("verified claims are read-only")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        frozen = _FrozenDict(value)  # shallow C-speed copy; only containers are rebuilt
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                dict.__setitem__(frozen, k, _freeze(v))
        return frozen
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _string_set(value: Any, what: str, *, split: bool, strings: bool = True) -> frozenset[str]:
    if value is _MISSING or value is None:
        return frozenset()
    if strings and isinstance(value, str):
        return frozenset(value.split()) if split else frozenset((value,))
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    kinds = "a string or a list of strings" if strings else "a list of strings"
    raise InvalidToken(f"the token's {what} claim is not {kinds}")


def _lookup(payload: Mapping[str, Any], claim: str) -> Any:
    if claim in payload:
        return payload[claim]
    if "." in claim and not claim.startswith(("http://", "https://")):
        # Dotted paths reach nested claims such as Keycloak's realm_access.roles; exact
        # keys win so that namespaced Auth0 claims ("https://x/roles") stay literal.
        value: Any = payload
        for part in claim.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return _MISSING
            value = value[part]
        return value
    return _MISSING


class Claims(Mapping[str, Any]):
    """Read-only mapping over a verified token's payload, with typed shortcuts.

    >>> claims["https://api.example.com/org"], claims.get("email")
    >>> claims.subject, claims.client_id, claims.scopes, claims.permissions, claims.roles

    Nested JSON objects are read-only dicts and arrays are tuples; :meth:`to_dict`
    returns a plain, mutable copy.
    """

    __slots__ = ("_payload", "client_id", "permissions", "roles", "scopes")

    client_id: str | None
    scopes: frozenset[str]
    permissions: frozenset[str]
    roles: frozenset[str]

    def __init__(self, payload: Mapping[str, Any], *, roles_claim: str = "roles") -> None:
        frozen: _FrozenDict = _freeze(payload if isinstance(payload, dict) else dict(payload))
        self._payload = frozen
        client_id: Any = None
        # azp: Auth0, Entra v2, Keycloak; client_id: RFC 9068, Cognito; appid: Entra v1;
        # cid: Okta. The first present wins.
        for name in ("azp", "client_id", "appid", "cid"):
            if name in frozen:
                client_id = frozen[name]
                break
        if client_id is not None and not isinstance(client_id, str):
            raise InvalidToken("the token's client id claim is not a string")
        self.client_id = client_id
        # RFC 8693 §4.2 / RFC 9068: "scope" is space-delimited; Entra's "scp" is a
        # space-delimited string and Okta's a list. Both are honoured.
        self.scopes = _string_set(frozen.get("scope", _MISSING), "scope", split=True) | (
            _string_set(frozen.get("scp", _MISSING), "scp", split=True)
        )
        self.permissions = _string_set(
            frozen.get("permissions", _MISSING), "permissions", split=False, strings=False
        )
        self.roles = _string_set(_lookup(frozen, roles_claim), "roles", split=False)

    def __getitem__(self, key: str) -> Any:
        return self._payload[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._payload)

    def __len__(self) -> int:
        return len(self._payload)

    def __repr__(self) -> str:
        return f"Claims(subject={self.subject!r}, client_id={self.client_id!r})"

    @property
    def subject(self) -> str | None:
        """The ``sub`` claim: for client-credentials tokens, the client (e.g. ``id@clients``)."""
        sub = self._payload.get("sub")
        return sub if isinstance(sub, str) else None

    @property
    def issuer(self) -> str:
        """The ``iss`` claim (checked to equal the configured issuer)."""
        return str(self._payload.get("iss", ""))

    @property
    def audience(self) -> tuple[str, ...]:
        """The ``aud`` claim as a tuple (a single string becomes one element)."""
        aud = self._payload.get("aud")
        return (aud,) if isinstance(aud, str) else tuple(aud or ())

    @property
    def expires_at(self) -> float:
        """The ``exp`` claim, epoch seconds."""
        return float(self._payload["exp"])

    def to_dict(self) -> dict[str, Any]:
        """A plain, mutable deep copy of the payload (e.g. to return as JSON)."""
        result: dict[str, Any] = _thaw(self._payload)
        return result


class ClaimsPolicy:
    """The claim rules of one verifier (RFC 7519 §4.1, RFC 9068 §4).

    ``audiences=None`` skips the ``aud`` check (Cognito access tokens have none);
    ``expected`` pairs a claim name with the string values it may take.
    """

    __slots__ = ("audiences", "expected", "issuer", "leeway", "required", "roles_claim")

    def __init__(
        self,
        *,
        issuer: str,
        audiences: frozenset[str] | None,
        leeway: float,
        required: tuple[str, ...],
        roles_claim: str,
        expected: tuple[tuple[str, frozenset[str]], ...] = (),
    ) -> None:
        self.issuer = issuer
        self.audiences = audiences
        self.leeway = leeway
        self.required = required
        self.roles_claim = roles_claim
        self.expected = expected


def _number(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    # bool is an int subclass: {"exp": true} must not mean 1970-01-01T00:00:01.
    if type(value) not in (int, float) or not math.isfinite(value):
        raise InvalidToken(f"the token's '{name}' claim is not a number")
    return float(value)


def validate_payload(payload: dict[str, Any], policy: ClaimsPolicy, now: float) -> Claims:
    """Check registered claims and build the Claims view; raise InvalidToken/ExpiredToken."""
    if payload.get("iss") != policy.issuer:
        raise InvalidToken("the token was issued by another issuer")
    audiences = policy.audiences
    if audiences is not None:
        aud = payload.get("aud")
        if isinstance(aud, str):
            aud_ok = aud in audiences
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            aud_ok = not audiences.isdisjoint(aud)
        else:
            raise InvalidToken(
                "the token's 'aud' claim is missing or not a string or list of strings"
            )
        if not aud_ok:
            raise InvalidToken("the token is not meant for this audience")
    exp = _number(payload, "exp")
    if exp is None:
        raise InvalidToken("the token has no 'exp' claim")
    leeway = policy.leeway
    if now >= exp + leeway:
        raise ExpiredToken("the token has expired")
    nbf = _number(payload, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise InvalidToken("the token is not valid yet ('nbf' is in the future)")
    iat = _number(payload, "iat")
    if iat is not None and now + leeway < iat:
        raise InvalidToken("the token was issued in the future ('iat'); check clocks")
    for name in policy.required:
        if name not in payload:
            raise InvalidToken(f"the token lacks the required claim {name!r}")
    for name, allowed in policy.expected:
        value = payload.get(name, _MISSING)
        if value is _MISSING:
            raise InvalidToken(f"the token lacks the expected claim {name!r}")
        # Only the claim name is reported: the value is attacker-chosen and may be huge.
        if type(value) is not str or value not in allowed:
            raise InvalidToken(f"the token's {name!r} claim does not have an accepted value")
    return Claims(payload, roles_claim=policy.roles_claim)


def check_rights(
    claims: Claims,
    *,
    scopes: Iterable[str] = (),
    permissions: Iterable[str] = (),
    roles: Iterable[str] = (),
) -> None:
    """Raise InsufficientPermissions naming every missing scope, permission and role."""
    missing: list[str] = []
    parts: list[str] = []
    for kind, needed, granted in (
        ("scope", scopes, claims.scopes),
        ("permission", permissions, claims.permissions),
        ("role", roles, claims.roles),
    ):
        lacking = [item for item in dict.fromkeys(needed) if item not in granted]
        if lacking:
            missing.extend(lacking)
            parts.append(
                f"{kind}s {', '.join(lacking)}" if len(lacking) > 1 else f"{kind} {lacking[0]}"
            )
    if missing:
        raise InsufficientPermissions(
            "the token lacks " + "; ".join(parts), required=tuple(missing)
        )
