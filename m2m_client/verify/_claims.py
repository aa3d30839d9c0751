"""Claims: the read-only view of a verified token's payload, and the claim checks.

Decision on malformed authorization claims: a token whose ``scope``/``scp`` (string or
list of strings), ``permissions`` (list of strings), roles claim (list of strings or one
string) or client id (string) has another JSON type is rejected as
:class:`~m2m_client.errors.InvalidToken` when it is verified. The properties of a
:class:`Claims` therefore never fail, and a handler never sees a half-understood token.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from m2m_client.errors import (
    ConfigurationError,
    ExpiredToken,
    InsufficientPermissions,
    InvalidToken,
)

__all__ = [
    "Claims",
    "ClaimsPolicy",
    "check_rights",
    "hint_roles_elsewhere",
    "names",
    "validate_payload",
]

_MISSING = object()
_NONE: frozenset[str] = frozenset()

logger = logging.getLogger("m2m_client.verify")

# Configuration hints logged at WARNING once each (a flood of refused tokens must not flood
# the log): (kind, configured, found) triples, bounded.
_HINTS_LOGGED: set[tuple[str, str, str]] = set()
_HINTS_LOCK = threading.Lock()
_MAX_HINTS = 64


def _once(kind: str, configured: str, found: str) -> bool:
    """``True`` the first time this hint is due (then never again in this process)."""
    entry = (kind, configured, found)
    with _HINTS_LOCK:
        if entry in _HINTS_LOGGED or len(_HINTS_LOGGED) >= _MAX_HINTS:
            return False
        _HINTS_LOGGED.add(entry)
        return True


#: Deepest nesting of objects and arrays accepted in a payload. Real tokens nest two or
#: three levels (Keycloak's resource_access.<client>.roles); a bound keeps a small signed
#: token of deeply nested lists from exhausting the stack.
MAX_CLAIM_DEPTH = 32


class _FrozenDict(dict[str, Any]):
    """A dict that refuses mutation: verified claims are shared through the cache."""

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise TypeError("verified claims are read-only")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    # Pickle and copy rebuild through the constructor, never through __setitem__.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_FrozenDict, (dict(self),))

    def __copy__(self) -> _FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _FrozenDict:
        return self  # immutable all the way down (nested values are frozen too)


# The JSON types a value is left as it is for (exact types, a C-speed pre-check), the
# containers rebuilt read-only, and isinstance(value, str) for map() over a list.
_SCALARS = frozenset({str, int, float, bool, type(None)})
_CONTAINERS = (dict, list)
_is_str = str.__instancecheck__


def _freeze(value: Any, depth: int = 0) -> Any:
    if depth > MAX_CLAIM_DEPTH:
        raise InvalidToken(
            f"the token's claims are nested more than {MAX_CLAIM_DEPTH} levels deep",
            reason="claim_type",
        )
    if isinstance(value, dict):
        frozen = _FrozenDict(value)  # shallow C-speed copy; only containers are rebuilt
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                dict.__setitem__(frozen, k, _freeze(v, depth + 1))
        return frozen
    if isinstance(value, list):
        return tuple(_freeze(v, depth + 1) if isinstance(v, (dict, list)) else v for v in value)
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
    if isinstance(value, (list, tuple)) and all(map(_is_str, value)):
        return frozenset(value)
    kinds = "a string or a list of strings" if strings else "a list of strings"
    raise InvalidToken(f"the token's {what} claim is not {kinds}", reason="claim_type")


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
        # _freeze's first level inline (every new token builds a Claims): a C-speed copy,
        # then only the containers among the values are rebuilt.
        frozen = _FrozenDict(payload)
        if not _SCALARS.issuperset(map(type, frozen.values())):
            for name, value in payload.items():
                if isinstance(value, _CONTAINERS):
                    dict.__setitem__(frozen, name, _freeze(value, 1))
        self._payload = frozen
        client_id: Any = None
        # azp: Auth0, Entra v2, Keycloak; client_id: RFC 9068, Cognito; appid: Entra v1;
        # cid: Okta. The first present wins.
        for name in ("azp", "client_id", "appid", "cid"):
            if name in frozen:
                client_id = frozen[name]
                break
        if client_id is not None and not isinstance(client_id, str):
            raise InvalidToken("the token's client id claim is not a string", reason="claim_type")
        self.client_id = client_id
        # RFC 8693 §4.2 / RFC 9068: "scope" is space-delimited; Entra's "scp" is a
        # space-delimited string and Okta's a list. Both are honoured. Absent (or null)
        # claims, the usual case, skip the general conversion (every new token builds this).
        get = frozen.get
        scope, scp = get("scope"), get("scp")
        if scp is None and type(scope) is str:
            self.scopes = frozenset(scope.split())
        else:
            self.scopes = _string_set(scope, "scope", split=True) | (
                _string_set(scp, "scp", split=True)
            )
        permissions = get("permissions")
        self.permissions = (
            _NONE
            if permissions is None
            else _string_set(permissions, "permissions", split=False, strings=False)
        )
        roles = get(roles_claim, _MISSING)
        if roles is _MISSING and "." in roles_claim:
            roles = _lookup(frozen, roles_claim)
        self.roles = (
            _NONE
            if roles is None or roles is _MISSING
            else _string_set(roles, "roles", split=False)
        )

    def __getitem__(self, key: str) -> Any:
        return self._payload[key]

    # Mapping's mixins go through __getitem__ and a KeyError for an absent claim; these
    # ask the dict directly (`"cnf" in claims` runs on every request under a DPoP policy).
    def __contains__(self, key: object) -> bool:
        return key in self._payload

    def get(self, key: str, default: Any = None) -> Any:
        return self._payload.get(key, default)

    # Claims are immutable: a copy is the object itself, and pickling (to hand claims to a
    # worker process) rebuilds from the parts without running the checks again.
    def __copy__(self) -> Claims:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Claims:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_claims,
            (dict(self._payload), self.client_id, self.scopes, self.permissions, self.roles),
        )

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


def _rebuild_claims(
    payload: dict[str, Any],
    client_id: str | None,
    scopes: frozenset[str],
    permissions: frozenset[str],
    roles: frozenset[str],
) -> Claims:
    claims = Claims.__new__(Claims)
    claims._payload = _freeze(payload)
    claims.client_id = client_id
    claims.scopes, claims.permissions, claims.roles = scopes, permissions, roles
    return claims


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


#: Largest NumericDate accepted (year 10000): beyond it float() loses the seconds anyway,
#: and a 400-digit integer would overflow it.
_MAX_DATE = 253_402_300_800


def _date(value: Any, name: str) -> float | None:
    """A NumericDate claim's value (None: absent); the common in-range int is taken inline."""
    if value is _MISSING:
        return None
    # bool is an int subclass: {"exp": true} must not mean 1970-01-01T00:00:01. null is
    # refused rather than read as "absent" (panva/jose does the same).
    if type(value) is int:
        if not -_MAX_DATE <= value <= _MAX_DATE:
            raise InvalidToken(f"the token's '{name}' claim is out of range", reason="claim_type")
        return float(value)
    if type(value) is not float or not math.isfinite(value) or abs(value) > _MAX_DATE:
        raise InvalidToken(f"the token's '{name}' claim is not a number", reason="claim_type")
    return value


def _refuse_issuer(iss: Any, policy: ClaimsPolicy) -> InvalidToken:
    if (
        isinstance(iss, str)
        and iss.rstrip("/") == policy.issuer.rstrip("/")
        and _once("issuer", policy.issuer, iss)
    ):
        # Not an attack but a configuration slip that refuses every token: say so once.
        logger.warning(
            "the verifier's issuer %r differs from the tokens' iss %r only by a trailing "
            "slash, so every token is refused; set issuer= to exactly the iss",
            policy.issuer,
            iss,
        )
    return InvalidToken("the token was issued by another issuer", reason="issuer")


def validate_payload(payload: dict[str, Any], policy: ClaimsPolicy, now: float) -> Claims:
    """Check registered claims and build the Claims view; raise InvalidToken/ExpiredToken.

    One pass of dict lookups, the usual shapes (string ``aud``, integer dates) inline:
    every new token runs this.
    """
    get = payload.get
    iss = get("iss")
    if iss != policy.issuer:
        raise _refuse_issuer(iss, policy)
    audiences = policy.audiences
    if audiences is not None:
        aud = get("aud")
        if isinstance(aud, str):
            aud_ok = aud in audiences
        elif isinstance(aud, list) and all(map(_is_str, aud)):
            aud_ok = not audiences.isdisjoint(aud)
        else:
            raise InvalidToken(
                "the token's 'aud' claim is missing or not a string or list of strings",
                reason="audience",
            )
        if not aud_ok:
            raise InvalidToken("the token is not meant for this audience", reason="audience")
    # NumericDates: an int within range is used as it is (exact in a float, so comparisons
    # agree with _date's); anything else, absent included, goes through _date.
    exp = get("exp", _MISSING)
    if type(exp) is not int or not -_MAX_DATE <= exp <= _MAX_DATE:
        exp = _date(exp, "exp")
    nbf = get("nbf", _MISSING)
    if nbf is _MISSING:
        nbf = None
    elif type(nbf) is not int or not -_MAX_DATE <= nbf <= _MAX_DATE:
        nbf = _date(nbf, "nbf")
    iat = get("iat", _MISSING)
    if iat is _MISSING:
        iat = None
    elif type(iat) is not int or not -_MAX_DATE <= iat <= _MAX_DATE:
        iat = _date(iat, "iat")
    if exp is None:
        raise InvalidToken("the token has no 'exp' claim", reason="missing_claim")
    leeway = policy.leeway
    if now >= exp + leeway:
        raise ExpiredToken("the token has expired")
    if nbf is not None and now + leeway < nbf:
        raise InvalidToken(
            "the token is not valid yet ('nbf' is in the future)", reason="not_yet_valid"
        )
    if iat is not None and now + leeway < iat:
        raise InvalidToken(
            "the token was issued in the future ('iat'); check clocks", reason="not_yet_valid"
        )
    # RFC 7519 §4.1.2 / §4.1.7: sub and jti are strings. A number or list would be
    # compared, logged and stored by applications that assume a string: refuse, not guess.
    sub = get("sub", "")
    if type(sub) is not str:
        raise InvalidToken("the token's 'sub' claim is not a string", reason="claim_type")
    jti = get("jti", "")
    if type(jti) is not str:
        raise InvalidToken("the token's 'jti' claim is not a string", reason="claim_type")
    for name in policy.required:
        if name not in payload:
            raise InvalidToken(
                f"the token lacks the required claim {name!r}", reason="missing_claim"
            )
    for name, allowed in policy.expected:
        value = get(name, _MISSING)
        if value is _MISSING:
            raise InvalidToken(
                f"the token lacks the expected claim {name!r}", reason="missing_claim"
            )
        # Only the claim name is reported: the value is attacker-chosen and may be huge.
        if type(value) is not str or value not in allowed:
            raise InvalidToken(
                f"the token's {name!r} claim does not have an accepted value",
                reason="claim_value",
            )
    return Claims(payload, roles_claim=policy.roles_claim)


def names(value: str | Iterable[str], what: str, *, split: bool = False) -> tuple[str, ...]:
    """A list of names from a list or one bare string.

    A bare string is one name (``roles="admin"``), never a list of its characters; for
    scopes it is space-delimited as in OAuth (RFC 6749 §3.3), so ``"read write"`` is two.
    """
    if isinstance(value, str):
        if split:
            return tuple(value.split())
        if not value:
            raise ConfigurationError(f"{what} must hold only non-empty strings")
        return (value,)
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigurationError(f"{what} must be a string or a list of strings")
    items = tuple(value)
    if not all(isinstance(item, str) and item for item in items):
        raise ConfigurationError(f"{what} must hold only non-empty strings")
    return items


def hint_roles_elsewhere(claims: Claims, roles_claim: str, lacking: Iterable[str]) -> None:
    """Log once where the lacking roles are, when another claim than ``roles_claim`` has them.

    LocalIssuer and Auth0 put roles in ``<audience>/roles``, Keycloak in
    ``realm_access.roles``: a verifier left at ``roles_claim="roles"`` answers 403 to every
    role check, and the log is where its operator looks.
    """
    wanted = set(lacking)
    payload = claims._payload
    candidates: list[tuple[str, Any]] = [
        (name, value) for name, value in payload.items() if name.lower().endswith("roles")
    ]
    for outer in ("realm_access", "resource_access"):
        value = payload.get(outer)
        if not isinstance(value, Mapping):
            continue
        if outer == "realm_access":
            candidates.append(("realm_access.roles", value.get("roles")))
        else:
            for client, entry in value.items():
                if isinstance(entry, Mapping):
                    candidates.append((f"resource_access.{client}.roles", entry.get("roles")))
    for name, value in candidates:
        if name == roles_claim or not isinstance(value, list | tuple):
            continue
        if wanted.intersection(item for item in value if isinstance(item, str)) and _once(
            "roles", roles_claim, name
        ):
            logger.warning(
                "403: the token lacks roles in roles_claim=%r, but claim %r has them; "
                "set roles_claim=%r if that is where your authorization server puts roles",
                roles_claim,
                name,
                name,
            )
            return


def check_rights(
    claims: Claims,
    *,
    scopes: str | Iterable[str] = (),
    permissions: str | Iterable[str] = (),
    roles: str | Iterable[str] = (),
) -> None:
    """Raise InsufficientPermissions naming every missing scope, permission and role."""
    missing: list[str] = []
    parts: list[str] = []
    missing_scopes: tuple[str, ...] = ()
    for kind, needed, granted in (
        ("scope", names(scopes, "scopes", split=True), claims.scopes),
        ("permission", names(permissions, "permissions"), claims.permissions),
        ("role", names(roles, "roles"), claims.roles),
    ):
        lacking = [item for item in dict.fromkeys(needed) if item not in granted]
        if lacking:
            if kind == "scope":
                missing_scopes = tuple(lacking)
            missing.extend(lacking)
            parts.append(
                f"{kind}s {', '.join(lacking)}" if len(lacking) > 1 else f"{kind} {lacking[0]}"
            )
    if missing:
        raise InsufficientPermissions(
            "the token lacks " + "; ".join(parts),
            required=tuple(missing),
            missing_scopes=missing_scopes,
        )
