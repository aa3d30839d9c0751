"""Minting access tokens: the claims LocalIssuer puts in a token (RFC 9068, Auth0's shape)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from m2m_client.testing._keys import IssuerKeys
from m2m_client.testing._responses import words


class IssuerMinting(IssuerKeys):
    """LocalIssuer's methods that mint tokens and name their roles claim."""

    audience: str
    token_lifetime: int
    clock: Callable[[], float]
    _roles_claim: str | None

    @property
    def url(self) -> str:
        raise NotImplementedError

    def roles_claim_for(self, audience: str | None = None) -> str:
        """The claim that holds roles in tokens for ``audience`` (see the class docstring)."""
        if self._roles_claim is not None:
            return self._roles_claim
        return f"{audience or self.audience}/roles"

    @property
    def roles_claim(self) -> str:
        """The roles claim for the default audience."""
        return self.roles_claim_for(None)

    def mint(
        self,
        sub: str = "test-client@clients",
        audience: str | Sequence[str] | None = None,
        scope: str | Iterable[str] | None = None,
        permissions: Iterable[str] | None = None,
        roles: Iterable[str] | None = None,
        expires_in: int | None = None,
        **extra_claims: Any,
    ) -> str:
        """Sign an access token directly, without a token request.

        A negative ``expires_in`` makes an already expired token. ``extra_claims`` are added
        last, so they can also replace any standard claim (``iss=``, ``nbf=``, ``azp=`` ...).

        >>> issuer.mint(permissions=["read:dashboard"], roles=["admin"], tenant="acme")
        """
        now = int(self.clock())
        aud: str | list[str] = audience if isinstance(audience, str) else list(audience or ())
        aud = aud or self.audience
        client_id = sub.removesuffix("@clients")
        lifetime = self.token_lifetime if expires_in is None else expires_in
        claims: dict[str, Any] = {
            "iss": self.url,
            "sub": sub,
            "aud": aud,
            "iat": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
            "azp": client_id,
            "client_id": client_id,
        }
        scopes = words(scope)
        if scopes:
            claims["scope"] = " ".join(scopes)
        if permissions is not None:
            claims["permissions"] = list(permissions)
        claims.update(extra_claims)
        if roles is not None:
            roles_claim = self.roles_claim_for(aud if isinstance(aud, str) else aud[0])
            _put_claim(claims, roles_claim, list(roles), replace=roles_claim not in extra_claims)
        return self.sign(claims)


def _put_claim(claims: dict[str, Any], name: str, value: Any, *, replace: bool) -> None:
    # The verifier's rule (verify/_claims.py): a dotted name that is not a URL is a path into
    # nested objects (Keycloak's realm_access.roles); a namespaced Auth0 claim stays literal.
    if "." not in name or name.startswith(("http://", "https://")):
        if replace:
            claims[name] = value
        return
    *parents, leaf = name.split(".")
    node = claims
    for part in parents:
        child = node.get(part)
        node[part] = child = dict(child) if isinstance(child, Mapping) else {}
        node = child
    if replace or leaf not in node:
        node[leaf] = value
